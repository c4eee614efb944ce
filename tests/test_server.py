"""The asyncio SPOP server on loopback sockets, with HAProxy played by a test peer."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from spoa.server import NOOP_ACTIONS, Limits, SpopServer, parse_listen, static_handler
from spoa.spop import (
    FrameType,
    Message,
    Notify,
    Scope,
    SetVar,
    Status,
    UnsetVar,
    encode_actions,
    encode_frame,
)
from spoa.spop.testing import haproxy_disconnect, haproxy_hello, notify
from tests.spop_peer import Peer, actions, kv, running_server

ROOT = Path(__file__).resolve().parent.parent
ROUTE = Message(
    "route",
    {"method": "GET", "path": "/_matrix/client/v3/sync", "src": IPv4Address("10.0.0.1")},
)
BACKEND = [SetVar(Scope.TXN, "backend", "sync")]
constant = static_handler(BACKEND)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def by_stream_id(event: Notify) -> list[SetVar]:
    return [SetVar(Scope.TXN, "sid", str(event.stream_id))]


async def connected(server: SpopServer) -> Peer:
    peer = await Peer.connect(server.addresses[0])
    await peer.hello()
    return peer


# -- handshake ------------------------------------------------------------------


def test_hello_is_answered_with_the_negotiated_frame_size() -> None:
    async def scenario() -> None:
        async with running_server(constant, Limits(max_frame_size=4096)) as server:
            peer = await Peer.connect(server.addresses[0])
            items = await peer.hello(max_frame_size=16380)
            assert items == {"version": "2.0", "max-frame-size": 4096, "capabilities": "pipelining"}

    run(scenario())


def test_healthcheck_gets_agent_hello_then_the_connection_closes() -> None:
    async def scenario() -> None:
        async with running_server(constant) as server:
            peer = await Peer.connect(server.addresses[0])
            items = await peer.hello(healthcheck=True)
            assert items["version"] == "2.0"
            assert await peer.eof()
            assert server.stats.healthchecks == 1

    run(scenario())


def test_haproxy_disconnect_is_answered_and_closed() -> None:
    async def scenario() -> None:
        async with running_server(constant) as server:
            peer = await connected(server)
            await peer.send(haproxy_disconnect(Status.TIMEOUT, "idle"))
            frame = await peer.frame()
            assert frame.type == FrameType.AGENT_DISCONNECT
            assert kv(frame)["status-code"] == 0
            assert await peer.eof()

    run(scenario())


def test_a_disconnect_message_cannot_write_lines_into_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    forged = "bye\n2026-12-01 00:00:00 ERROR spoa: forged line\r\x1b[2J" + "x" * 16000

    async def scenario() -> None:
        async with running_server(constant) as server:
            for _ in range(40):
                peer = await connected(server)
                await peer.send(haproxy_disconnect(Status.IO, forged))
                await peer.frame()
                assert await peer.eof()

    with caplog.at_level(logging.DEBUG, logger="spoa.server"):
        run(scenario())
    closes = [r.getMessage() for r in caplog.records if "closed connection" in r.getMessage()]
    # Rate-limited (5 in 10 s), one line each, escaped, cut short.
    assert len(closes) == 5
    for line in closes:
        assert "\n" not in line and "\r" not in line and "\x1b" not in line
        assert "bye\\x0a2026" in line and "\\x1b[2J" in line
        assert len(line) < 400 and line.endswith("(cut)")


def test_routine_idle_closes_are_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with running_server(constant) as server:
            for status in (Status.TIMEOUT, Status.NORMAL):
                peer = await connected(server)
                await peer.send(haproxy_disconnect(status, "a timeout occurred"))
                await peer.frame()
                assert await peer.eof()

    with caplog.at_level(logging.DEBUG, logger="spoa.server"):
        run(scenario())
    closes = [r for r in caplog.records if "closed connection" in r.getMessage()]
    assert len(closes) == 2 and all(r.levelno == logging.DEBUG for r in closes)


# -- NOTIFY / ACK ---------------------------------------------------------------------


def test_notify_gets_an_ack_with_the_handlers_actions() -> None:
    async def scenario() -> None:
        async with running_server(constant) as server:
            peer = await connected(server)
            await peer.send(notify(12345, 3, [ROUTE]))
            frame = await peer.frame()
            assert (frame.type, frame.stream_id, frame.frame_id) == (FrameType.ACK, 12345, 3)
            assert actions(frame) == BACKEND

    run(scenario())


def test_handler_gets_the_decoded_messages() -> None:
    seen: list[Notify] = []

    def handler(event: Notify) -> bytes:
        seen.append(event)
        return encode_actions(BACKEND)

    async def scenario() -> None:
        async with running_server(handler) as server:
            peer = await connected(server)
            await peer.send(notify(1, 1, [ROUTE, Message("other", {})]))
            await peer.frame()

    run(scenario())
    assert seen == [Notify(1, 1, [ROUTE, Message("other", {})])]


def test_frames_split_at_every_byte_boundary_are_answered() -> None:
    stream = haproxy_hello() + notify(300, 1, [ROUTE]) + notify(301, 1, [ROUTE])

    async def scenario() -> None:
        async with running_server(by_stream_id) as server:
            for cut in range(1, len(stream)):
                peer = await Peer.connect(server.addresses[0])
                await peer.send(stream[:cut])
                await asyncio.sleep(0.002)
                await peer.send(stream[cut:])
                hello, first, second = await peer.frames(3)
                assert hello.type == FrameType.AGENT_HELLO
                assert [first.stream_id, second.stream_id] == [300, 301]
                assert actions(second) == [SetVar(Scope.TXN, "sid", "301")]
                peer.close()

    run(scenario())


def test_frames_sent_one_byte_at_a_time_are_answered() -> None:
    stream = haproxy_hello() + notify(7, 1, [ROUTE])

    async def scenario() -> None:
        async with running_server(by_stream_id) as server:
            peer = await Peer.connect(server.addresses[0])
            for i in range(len(stream)):
                await peer.send(stream[i : i + 1])
                await asyncio.sleep(0.001)
            _, ack = await peer.frames(2)
            assert ack.stream_id == 7

    run(scenario())


def test_twenty_pipelined_notifies_are_answered_out_of_order() -> None:
    async def slower_for_lower_ids(event: Notify) -> list[SetVar]:
        await asyncio.sleep((21 - event.stream_id) * 0.01)
        return by_stream_id(event)

    async def scenario() -> None:
        async with running_server(slower_for_lower_ids) as server:
            peer = await connected(server)
            await peer.send(b"".join(notify(sid, 1, [ROUTE]) for sid in range(1, 21)))
            acks = await peer.frames(20)
            assert [a.stream_id for a in acks] == list(range(20, 0, -1))
            for ack in acks:
                assert actions(ack) == [SetVar(Scope.TXN, "sid", str(ack.stream_id))]

    run(scenario())


def test_a_backlog_gets_answers_for_its_newest_frames_only() -> None:
    """After a stall, HAProxy waits for at most peer_window frames; the rest are stale."""

    async def scenario() -> None:
        async with running_server(by_stream_id, Limits(peer_window=20)) as server:
            peer = await connected(server)
            await peer.send(b"".join(notify(sid, 1, [ROUTE]) for sid in range(1, 201, 2)))
            acks = await peer.frames(20)
            assert [a.stream_id for a in acks] == list(range(161, 201, 2))
            assert server.stats.stale_notifies == 80
            # No more answers for the stale ones, and the connection goes on.
            await peer.send(notify(301, 1, [ROUTE]))
            (ack,) = await peer.frames(1)
            assert ack.stream_id == 301
            proto = next(iter(server._connections))
            assert proto._conn.in_flight == 0

    run(scenario())


def test_a_backlog_arriving_in_several_reads_is_answered_once_whole() -> None:
    async def scenario() -> None:
        async with running_server(by_stream_id, Limits(peer_window=20)) as server:
            peer = await connected(server)
            frames = [notify(sid, 1, [ROUTE]) for sid in range(1, 401, 2)]
            for start in range(0, 200, 50):  # four writes, back to back
                peer.writer.write(b"".join(frames[start : start + 50]))
            await peer.writer.drain()
            acks = await peer.frames(20)
            assert [a.stream_id for a in acks] == list(range(361, 401, 2))
            with pytest.raises(TimeoutError):
                await peer.frames(1, timeout=0.3)
            assert server.stats.stale_notifies == 180

    run(scenario())


def test_without_a_peer_window_every_frame_of_a_backlog_is_answered() -> None:
    async def scenario() -> None:
        async with running_server(by_stream_id, Limits(peer_window=0)) as server:
            peer = await connected(server)
            await peer.send(b"".join(notify(sid, 1, [ROUTE]) for sid in range(1, 201, 2)))
            assert len(await peer.frames(100)) == 100

    run(scenario())


def test_acks_ready_together_go_out_in_one_write() -> None:
    writes: list[int] = []

    async def scenario() -> None:
        async with running_server(constant) as server:
            peer = await connected(server)
            proto = next(iter(server._connections))
            transport = proto._transport
            assert transport is not None
            original = transport.write

            def counting_write(data: bytes | bytearray | memoryview) -> None:
                writes.append(len(data))
                original(data)

            transport.write = counting_write  # type: ignore[method-assign]
            await peer.send(b"".join(notify(sid, 1, [ROUTE]) for sid in range(1, 21)))
            await peer.frames(20)

    run(scenario())
    assert len(writes) == 1


def test_in_flight_limit_stops_reading_until_answers_go_out() -> None:
    running = 0
    most = 0

    async def handler(event: Notify) -> list[SetVar]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1
        return by_stream_id(event)

    async def scenario() -> None:
        async with running_server(handler, Limits(max_in_flight=3)) as server:
            peer = await connected(server)
            await peer.send(b"".join(notify(sid, 1, [ROUTE]) for sid in range(1, 31)))
            acks = await peer.frames(30)
            assert sorted(a.stream_id for a in acks) == list(range(1, 31))

    run(scenario())
    assert most == 3


# -- handler failures: always an ACK -----------------------------------------------------


def failing(event: Notify) -> bytes:
    if event.stream_id % 2:
        raise RuntimeError("boom")
    return encode_actions(BACKEND)


@pytest.mark.parametrize(
    "handler",
    [
        failing,
        lambda event: 42,
        lambda event: [object()],
        lambda event: [SetVar(Scope.TXN, "big", "x" * 20000)],
    ],
    ids=["raises", "returns-int", "returns-junk-actions", "answer-too-big"],
)
def test_handler_failure_still_acks_with_noop_and_keeps_the_connection(
    handler: Callable[[Notify], object],
) -> None:
    async def scenario() -> None:
        async with running_server(handler) as server:  # type: ignore[arg-type]
            peer = await connected(server)
            await peer.send(notify(1, 1, [ROUTE]))
            ack = await peer.frame()
            assert ack.type == FrameType.ACK and ack.stream_id == 1
            assert actions(ack) == [UnsetVar(Scope.TXN, "noop")]
            await peer.send(notify(2, 1, [ROUTE]))
            assert (await peer.frame()).stream_id == 2
            assert server.stats.handler_errors >= 1

    run(scenario())


def test_async_handler_failure_and_timeout_still_ack() -> None:
    async def handler(event: Notify) -> object:
        await asyncio.sleep(0)
        if event.stream_id == 1:
            raise RuntimeError("boom")
        if event.stream_id == 2:
            await asyncio.sleep(60)
        if event.stream_id == 4:
            return [object()]  # actions that cannot be encoded
        if event.stream_id == 5:
            return [SetVar(Scope.TXN, "big", "x" * 20000)]  # too big for a frame
        if event.stream_id == 6:
            return 42
        return encode_actions(BACKEND)

    async def scenario() -> None:
        async with running_server(handler, Limits(handler_timeout=0.2)) as server:  # type: ignore[arg-type]
            peer = await connected(server)
            await peer.send(b"".join(notify(sid, 1, [ROUTE]) for sid in range(1, 7)))
            acks = {a.stream_id: actions(a) for a in await peer.frames(6)}
            noop = [UnsetVar(Scope.TXN, "noop")]
            assert acks[1] == acks[2] == acks[4] == acks[5] == acks[6] == noop
            assert acks[3] == BACKEND
            assert server.stats.handler_errors == 5

    run(scenario())


def test_empty_answer_becomes_the_noop_action() -> None:
    async def scenario() -> None:
        async with running_server(lambda event: []) as server:
            peer = await connected(server)
            await peer.send(notify(1, 1, [ROUTE]))
            ack = await peer.frame()
            assert ack.payload == NOOP_ACTIONS
            assert server.stats.handler_errors == 0

    run(scenario())


# -- protocol errors: one connection dies, the others live ----------------------------------


async def error_closes_only_that_connection(bad: bytes, status: Status) -> None:
    async with running_server(by_stream_id) as server:
        good = await connected(server)
        victim = await connected(server)
        await victim.send(notify(1, 1, [ROUTE]) + bad)
        ack, disconnect = await victim.frames(2)
        assert ack.type == FrameType.ACK
        assert disconnect.type == FrameType.AGENT_DISCONNECT
        assert kv(disconnect)["status-code"] == status
        assert await victim.eof()
        await good.send(notify(9, 1, [ROUTE]))
        assert (await good.frame()).stream_id == 9
        assert server.stats.protocol_errors == {status: 1}


def test_oversized_frame_gets_status_3_and_close_others_unaffected() -> None:
    run(error_closes_only_that_connection((20000).to_bytes(4, "big"), Status.TOO_BIG))


def test_garbage_gets_status_4_and_close_others_unaffected() -> None:
    garbage = encode_frame(FrameType.NOTIFY, 2, 1, b"\x05route\x01\x04path\x0f")
    run(error_closes_only_that_connection(garbage, Status.INVALID))


def test_garbage_before_hello_gets_status_4() -> None:
    async def scenario() -> None:
        async with running_server(constant) as server:
            peer = await Peer.connect(server.addresses[0])
            await peer.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            frame = await peer.frame()
            assert frame.type == FrameType.AGENT_DISCONNECT
            assert kv(frame)["status-code"] in (Status.TOO_BIG, Status.INVALID)
            assert await peer.eof()

    run(scenario())


def test_abrupt_close_mid_frame_is_harmless() -> None:
    async def scenario() -> None:
        async with running_server(constant) as server:
            peer = await connected(server)
            await peer.send(notify(1, 1, [ROUTE])[:10])
            peer.writer.transport.abort()
            other = await connected(server)
            await other.send(notify(1, 1, [ROUTE]))
            assert (await other.frame()).type == FrameType.ACK
            assert server.stats.protocol_errors == {}

    run(scenario())


# -- limits -------------------------------------------------------------------------------


def test_connections_beyond_the_limit_get_status_13_but_healthchecks_pass() -> None:
    async def scenario() -> None:
        async with running_server(constant, Limits(max_connections=2)) as server:
            first = await connected(server)
            second = await connected(server)
            extra = await Peer.connect(server.addresses[0])
            await extra.send(haproxy_hello())
            frame = await extra.frame()
            assert frame.type == FrameType.AGENT_DISCONNECT
            assert kv(frame)["status-code"] == Status.RESOURCE
            assert await extra.eof()
            check = await Peer.connect(server.addresses[0])
            assert (await check.hello(healthcheck=True))["version"] == "2.0"
            await first.send(notify(1, 1, [ROUTE]))
            assert (await first.frame()).type == FrameType.ACK
            assert server.stats.connections_refused == 1
            second.close()

    run(scenario())


def test_connection_without_hello_is_closed_after_the_hello_timeout() -> None:
    async def scenario() -> None:
        async with running_server(constant, Limits(hello_timeout=0.3)) as server:
            peer = await Peer.connect(server.addresses[0])
            assert await peer.eof(timeout=3)

    run(scenario())


def test_idle_connection_is_closed_with_status_2_after_the_idle_timeout() -> None:
    async def scenario() -> None:
        async with running_server(constant, Limits(idle_timeout=0.3)) as server:
            peer = await connected(server)
            frame = await peer.frame(timeout=3)
            assert frame.type == FrameType.AGENT_DISCONNECT
            assert kv(frame)["status-code"] == Status.TIMEOUT
            assert await peer.eof()

    run(scenario())


def test_busy_connection_is_not_idle() -> None:
    async def scenario() -> None:
        async with running_server(constant, Limits(idle_timeout=0.4)) as server:
            peer = await connected(server)
            for sid in range(8):
                await peer.send(notify(sid, 1, [ROUTE]))
                assert (await peer.frame()).type == FrameType.ACK
                await asyncio.sleep(0.1)

    run(scenario())


@pytest.mark.parametrize(
    "field",
    ["max_connections", "max_frame_size", "max_in_flight", "hello_timeout", "drain_timeout"],
)
def test_limits_reject_nonsense(field: str) -> None:
    with pytest.raises(ValueError):
        Limits(**{field: 0})


def test_listen_addresses_parse() -> None:
    assert parse_listen("127.0.0.1:12345") == ("127.0.0.1", 12345)
    assert parse_listen("[::1]:9") == ("::1", 9)
    assert parse_listen(":9") == ("127.0.0.1", 9)
    assert parse_listen("unix:/run/spoa.sock") == ("unix", "/run/spoa.sock")
    assert parse_listen("/run/spoa.sock") == ("unix", "/run/spoa.sock")
    for bad in ("localhost", "host:port", "1.2.3.4:70000", "unix:"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_unix_socket_listener_serves() -> None:
    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "agent.sock")
            async with running_server(constant, listen=[f"unix:{path}"]) as server:
                assert server.addresses == [f"unix:{path}"]
                peer = await connected(server)
                await peer.send(notify(1, 1, [ROUTE]))
                assert actions(await peer.frame()) == BACKEND
            assert not os.path.exists(path)

    run(scenario())


def test_ipv6_listener_serves() -> None:
    async def scenario() -> None:
        async with running_server(constant, listen=["[::1]:0"]) as server:
            peer = await connected(server)
            await peer.send(notify(1, 1, [ROUTE]))
            assert actions(await peer.frame()) == BACKEND

    run(scenario())


def test_noop_answer_must_hold_an_action() -> None:
    with pytest.raises(ValueError):
        SpopServer(constant, noop_actions=b"")


# -- shutdown ---------------------------------------------------------------------------


def test_drain_answers_in_flight_frames_then_disconnects() -> None:
    async def slow(event: Notify) -> list[SetVar]:
        await asyncio.sleep(0.2)
        return by_stream_id(event)

    async def scenario() -> None:
        server = SpopServer(slow)
        await server.start(["127.0.0.1:0"])
        peer = await connected(server)
        await peer.send(b"".join(notify(sid, 1, [ROUTE]) for sid in range(1, 11)))
        await asyncio.sleep(0.05)
        drain = asyncio.create_task(server.drain())
        frames = await peer.frames(11)
        assert sorted(f.stream_id for f in frames[:10]) == list(range(1, 11))
        assert all(f.type == FrameType.ACK for f in frames[:10])
        assert frames[10].type == FrameType.AGENT_DISCONNECT
        assert kv(frames[10])["status-code"] == Status.NORMAL
        assert await peer.eof()
        await drain
        with pytest.raises(OSError):
            await Peer.connect(server.addresses[0])

    run(scenario())


def start_agent_process(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        found = re.search(r"listening for SPOP on (\S+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise AssertionError("agent did not start")


def test_sigterm_drains_a_real_agent_process_without_losing_an_ack() -> None:
    proc, address = start_agent_process("-m", "tests.agents.path_agent", "--delay-ms", "300")

    async def scenario() -> None:
        peer = await Peer.connect(address)
        await peer.hello()
        frames = [
            notify(sid, 1, [Message("route", {"path": f"/to/b{sid}"})]) for sid in range(1, 21)
        ]
        await peer.send(b"".join(frames))
        await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        got = await peer.frames(21)
        acks = {f.stream_id: actions(f)[0] for f in got if f.type == FrameType.ACK}
        assert acks == {sid: SetVar(Scope.TXN, "backend", f"b{sid}") for sid in range(1, 21)}
        assert got[-1].type == FrameType.AGENT_DISCONNECT
        assert await peer.eof()

    try:
        run(scenario())
        assert proc.wait(10) == 0
    finally:
        proc.kill()


def test_spoa_serve_exits_0_on_sigterm_and_answers_until_then() -> None:
    proc, address = start_agent_process(
        "-m", "spoa", "serve", "--listen", "127.0.0.1:0", "--static-class", "sync", "--http", "off"
    )

    async def scenario() -> None:
        peer = await Peer.connect(address)
        await peer.hello()
        await peer.send(notify(1, 1, [ROUTE]))
        ack = await peer.frame()
        assert SetVar(Scope.TXN, "backend", "sync") in actions(ack)
        proc.send_signal(signal.SIGTERM)
        frame = await peer.frame()
        assert frame.type == FrameType.AGENT_DISCONNECT
        assert await peer.eof()

    try:
        run(scenario())
        assert proc.wait(10) == 0
    finally:
        proc.kill()


def test_spoa_serve_reports_a_busy_port_and_exits_non_zero() -> None:
    async def scenario() -> None:
        async with running_server(constant) as server:
            result = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "spoa",
                    "serve",
                    "--static-class",
                    "main",
                    "--http",
                    "off",
                    "--listen",
                    server.addresses[0],
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert result.returncode == 2
            assert "cannot listen" in result.stderr

    run(scenario())
