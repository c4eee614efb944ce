"""The asyncio SPOP server: sockets, timers and shutdown around ``spoa.spop``.

The protocol lives in :class:`spoa.spop.Connection`; this module only moves
bytes between it and the sockets, calls the handler for every NOTIFY, and
enforces the limits of :class:`Limits`.

The handler is any callable taking a :class:`~spoa.spop.Notify` and returning
the ACK's actions: a list of :class:`~spoa.spop.SetVar` /
:class:`~spoa.spop.UnsetVar`, or their encoding as ``bytes`` (precompute it:
that is the fast path), or an awaitable of either. Synchronous results are
answered before the next read; awaitables are answered when they finish, in
any order. A handler that raises, returns garbage, times out or answers more
than fits a frame still gets its NOTIFY an ACK, with the no-op action, so
HAProxy moves on (fail open); the connection is never dropped for it.

Writes: every ACK ready after one read goes out in a single ``write()`` of
whole frames, which also keeps each frame in one piece on the wire.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias, cast

from .spop import (
    DEFAULT_FRAME_SIZE,
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    Action,
    Connection,
    ConnectionState,
    Event,
    HaproxyDisconnect,
    HaproxyHello,
    LocalProtocolError,
    Notify,
    ProtocolViolation,
    Scope,
    Status,
    UnsetVar,
    encode_actions,
)
from .stats import ServerStats

log = logging.getLogger("spoa.server")

HandlerResult: TypeAlias = bytes | Sequence[Action]
Handler: TypeAlias = Callable[[Notify], HandlerResult | Awaitable[HandlerResult]]

#: Sent when a handler has nothing to say or failed. HAProxy 3.1.x waits for
#: the processing timeout on an ACK without actions, so every ACK carries at
#: least one; unsetting a variable nobody reads changes nothing.
NOOP_ACTIONS: Final = encode_actions((UnsetVar(Scope.TXN, "noop"),))


def _limit(default: Any, help: str) -> Any:
    """A field of :class:`Limits`: its default and its ``spoa serve`` help."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound the server enforces, with its default (``spoa serve`` has a flag for each)."""

    max_connections: int = _limit(
        1024,
        "connections from HAProxy at once; a HELLO beyond it is refused with AGENT-DISCONNECT "
        "status 13 (health checks are always answered)",
    )
    max_frame_size: int = _limit(
        DEFAULT_FRAME_SIZE,
        "largest frame the agent announces (256..16 MiB); HAProxy uses the smaller of its own "
        "and this",
    )
    #: HAProxy sends at most 20 per connection.
    max_in_flight: int = _limit(
        256,
        "NOTIFY frames decoded and not yet answered per connection; beyond it the agent stops "
        "reading that connection",
    )
    #: 20: fixed in 3.1+, ``max-waiting-frames`` in 2.6-3.0. More unanswered at
    #: once means a backlog (the agent was stalled): all but the newest this
    #: many are for requests HAProxy gave up on.
    peer_window: int = _limit(
        20,
        "NOTIFYs HAProxy keeps waiting per connection (20); in a backlog beyond it the older "
        "ones are not answered (0: answer all)",
    )
    hello_timeout: float = _limit(10.0, "seconds from accept to HAPROXY-HELLO")
    #: HAProxy closes idle connections itself.
    idle_timeout: float = _limit(
        300.0,
        "seconds without a byte from HAProxy before closing (status 2); keep it above "
        "HAProxy's own idle timeout",
    )
    #: HAProxy gave up on such a frame long before.
    handler_timeout: float = _limit(
        5.0,
        "seconds an asynchronous handler may take before its NOTIFY is answered with the "
        "no-op action",
    )
    drain_timeout: float = _limit(10.0, "seconds SIGTERM waits for in-flight frames")

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if not MIN_FRAME_SIZE <= self.max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be within {MIN_FRAME_SIZE}..{MAX_FRAME_SIZE}")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if self.peer_window < 0:
            raise ValueError("peer_window must be 0 (off) or more")
        for name in ("hello_timeout", "idle_timeout", "handler_timeout", "drain_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


#: The most of a peer's text that reaches the log.
PEER_TEXT_MAX: Final = 200
_UNPRINTABLE: Final = re.compile(r"[^\x20-\x5b\x5d-\x7e]")


def peer_text(text: str) -> str:
    """Text a peer sent, safe for one log line: printable ASCII, escaped, cut short.

    Every other character (newlines and other controls, non-ASCII, the
    surrogate escapes of undecodable bytes) is written as a \\xNN, \\uNNNN
    escape, so a peer cannot forge log lines or terminal sequences.
    """
    cut = len(text) > PEER_TEXT_MAX
    shown = _UNPRINTABLE.sub(_escape, text[:PEER_TEXT_MAX])
    return f'"{shown}"' + (" (cut)" if cut else "")


def _escape(found: re.Match[str]) -> str:
    code = ord(found.group())
    if code == 0x5C:
        return "\\\\"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class RateLimitedLog:
    """Log at most ``burst`` lines per ``interval`` seconds, then summarise."""

    def __init__(self, logger: logging.Logger, burst: int = 5, interval: float = 10.0) -> None:
        self._logger = logger
        self._burst = burst
        self._interval = interval
        self._window_start = 0.0
        self._count = 0
        self._suppressed = 0

    def __call__(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._interval:
            if self._suppressed:
                self._logger.log(
                    level,
                    "%d similar messages suppressed in the last %.0fs",
                    self._suppressed,
                    self._interval,
                )
            self._window_start = now
            self._count = 0
            self._suppressed = 0
        if self._count < self._burst:
            self._count += 1
            self._logger.log(level, msg, *args, exc_info=exc_info)
        else:
            self._suppressed += 1


class _SpopProtocol(asyncio.Protocol):
    """One HAProxy connection: feeds bytes to a Connection, answers events."""

    def __init__(self, server: SpopServer) -> None:
        self._server = server
        self._loop = server.loop
        self._handler = server.handler
        self._stats = server.stats
        self._noop = server.noop_actions
        self._max_in_flight = server.limits.max_in_flight
        self._window = server.limits.peer_window
        #: Backlog mode: the newest NOTIFYs, answered once the backlog is read.
        self._backlog: list[Notify] = []
        self._backlog_flush: asyncio.TimerHandle | None = None
        self._conn = Connection(server.limits.max_frame_size)
        self._transport: asyncio.Transport | None = None
        self._tasks: dict[asyncio.Future[HandlerResult], tuple[Notify, float]] = {}
        self._closing = False
        self._draining = False
        self._paused_for_flight = False
        self._paused_for_write = False
        self.peer = "?"
        self.accepted_at = self.last_activity = self._loop.time()

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self._server._attach(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._backlog_flush is not None:
            self._backlog_flush.cancel()
            self._backlog_flush = None
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()
        self._server._detach(self)

    def pause_writing(self) -> None:
        self._paused_for_write = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_for_write = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self._loop.time()
        self._conn.receive_data(data)
        self._drive()

    def eof_received(self) -> bool | None:
        # HAProxy 3.x closes idle connections without DISCONNECT: normal.
        return None

    # -- the work ----------------------------------------------------------

    def _drive(self) -> None:
        """Decode what is buffered and answer it, in one write."""
        conn = self._conn
        out: list[bytes] = []
        while not self._closing:
            room = self._max_in_flight - conn.in_flight
            if room <= 0:
                break
            events = conn.next_events(room)
            if not events:
                break
            if self._window and (len(events) > self._window or self._backlog):
                events = self._hold_backlog(events)
            notifies = 0
            fast = 0
            handler = self._handler
            ack = conn.ack
            for event in events:
                if type(event) is Notify:
                    notifies += 1
                    try:
                        result = handler(event)
                    except Exception:
                        self._handler_failed("handler raised")
                        out.append(self._ack(event, self._noop))
                        continue
                    # The hot path: precomputed bytes that fit the frame.
                    if type(result) is bytes and result:
                        try:
                            out.append(ack(event.stream_id, event.frame_id, result))
                            fast += 1
                            continue
                        except LocalProtocolError:
                            pass
                    frame = self._answer(event, result)
                    if frame is not None:
                        out.append(frame)
                else:
                    self._control(event, out)
            self._stats.notify_frames += notifies
            self._stats.ack_frames += fast
            if not conn.buffered:
                break  # the usual case: everything read is answered
        if out and not self._closing:
            self._write(out)
        if self._draining and conn.in_flight == 0 and not self._closing:
            self._close(Status.NORMAL, "agent is shutting down")
            return
        if self._paused_for_flight or self._paused_for_write or conn.in_flight:
            self._update_reading()

    # Theory of operation: backlogs. HAProxy keeps at most ``peer_window``
    # NOTIFYs waiting on a connection; each waits ``timeout processing`` at
    # most, then HAProxy gives up on it and may send the next. So when more
    # than that many arrive unanswered at once (the agent was stopped, starved
    # of CPU, paused by a GC), all but the newest ``peer_window`` are for
    # requests already routed without the agent. Answering them would only
    # pour ACKs HAProxy drops into its socket, and on HAProxy 3.1+ a demux
    # buffer filled by one read blocks that connection for good (mux_spop.c:
    # SPOP_CF_DEM_BLOCK_ANY includes SPOP_CF_DEM_DFULL). So in a backlog the
    # agent keeps only the newest NOTIFYs, waits a moment for the rest of the
    # backlog to be read, then answers those few in one write.
    _BACKLOG_SETTLE = 0.002

    def _hold_backlog(self, events: list[Event]) -> list[Event]:
        """Keep the newest NOTIFYs of a backlog aside; the control events go on."""
        backlog = self._backlog
        others: list[Event] = []
        for event in events:
            if type(event) is Notify:
                backlog.append(event)
            else:
                others.append(event)
        if len(backlog) <= self._window and self._backlog_flush is None:
            # Not a backlog after all (many control frames): answer as usual.
            self._backlog = []
            return events
        stale = len(backlog) - self._window
        if stale > 0:
            for event in backlog[:stale]:
                self._conn.abandon(event.stream_id, event.frame_id)
            self._stats.stale_notifies += stale
            del backlog[:stale]
        if self._backlog_flush is None:
            self._backlog_flush = self._loop.call_later(self._BACKLOG_SETTLE, self._flush_backlog)
        return others

    def _flush_backlog(self) -> None:
        """The backlog is read: answer the NOTIFYs HAProxy may still wait for."""
        self._backlog_flush = None
        held, self._backlog = self._backlog, []
        if self._closing or not held:
            return
        if self._conn.buffered:
            # More of the backlog arrived meanwhile: sort it out first.
            self._backlog = held
            self._drive()
            if self._backlog_flush is not None or not self._backlog:
                return
            held, self._backlog = self._backlog, []
        self._stats.notify_frames += len(held)
        out = []
        for event in held:
            try:
                result = self._handler(event)
            except Exception:
                self._handler_failed("handler raised")
                out.append(self._ack(event, self._noop))
                continue
            frame = self._answer(event, result)
            if frame is not None:
                out.append(frame)
        if out:
            self._write(out)
        self._drive()

    def _answer(self, event: Notify, result: object) -> bytes | None:
        """The ACK for what a handler returned, or None if an awaitable will answer later."""
        if type(result) is bytes:
            return self._ack(event, result or self._noop)
        if isinstance(result, (list, tuple)):
            try:
                payload = encode_actions(result)
            except (TypeError, ValueError, AttributeError):
                self._handler_failed("handler returned actions that cannot be encoded")
                payload = self._noop
            return self._ack(event, payload or self._noop)
        if inspect.isawaitable(result):
            self._await(event, result)
            return None
        self._handler_failed(f"handler returned {type(result).__name__}")
        return self._ack(event, self._noop)

    def _ack(self, event: Notify, payload: bytes) -> bytes:
        self._stats.ack_frames += 1
        try:
            return self._conn.ack(event.stream_id, event.frame_id, payload)
        except LocalProtocolError:
            self._handler_failed("handler answer does not fit the negotiated frame size")
            return self._conn.ack(event.stream_id, event.frame_id, self._noop)

    def _handler_failed(self, why: str) -> None:
        self._stats.handler_errors += 1
        self._server.rate_limited_log(logging.ERROR, "%s; answered with no-op", why, exc_info=True)

    def _await(self, event: Notify, awaitable: Awaitable[HandlerResult]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks[task] = (event, self._loop.time())
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[HandlerResult]) -> None:
        entry = self._tasks.pop(task, None)
        if entry is None or self._closing:
            return
        event = entry[0]
        frame: bytes | None
        if task.cancelled():
            self._handler_failed("handler timed out")
            frame = self._ack(event, self._noop)
        elif task.exception() is not None:
            self._handler_failed("handler raised")
            frame = self._ack(event, self._noop)
        else:
            # The same checks as for a synchronous answer.
            frame = self._answer(event, task.result())
        if frame is not None:
            self._write([frame])
        self._drive()

    def _control(self, event: Event, out: list[bytes]) -> None:
        conn = self._conn
        stats = self._stats
        if isinstance(event, HaproxyHello):
            stats.hello_frames += 1
            if event.healthcheck:
                stats.healthchecks += 1
                stats.agent_hello_frames += 1
                out.append(conn.accept_hello())
                self._flush_and_close(out)
            elif self._server.over_capacity():
                stats.connections_refused += 1
                self._server.rate_limited_log(
                    logging.WARNING,
                    "refused connection from %s: %d connections open",
                    self.peer,
                    stats.connections_open,
                )
                out.append(conn.disconnect(Status.RESOURCE, "too many connections"))
                stats.disconnect_frames_sent += 1
                self._flush_and_close(out)
            else:
                stats.agent_hello_frames += 1
                out.append(conn.accept_hello())
        elif isinstance(event, HaproxyDisconnect):
            stats.disconnect_frames_received += 1
            if event.status in (Status.NORMAL, Status.TIMEOUT):
                # The usual ways HAProxy ends a connection (an idle one
                # times out): nothing an operator needs to see.
                log.debug("HAProxy closed connection %s: status %d", self.peer, event.status)
            else:
                self._server.rate_limited_log(
                    logging.INFO,
                    "HAProxy closed connection %s: status %d %s",
                    self.peer,
                    event.status,
                    peer_text(event.message),
                )
            out.append(conn.disconnect(Status.NORMAL, ""))
            stats.disconnect_frames_sent += 1
            self._flush_and_close(out)
        elif isinstance(event, ProtocolViolation):
            errors = stats.protocol_errors
            errors[event.status] = errors.get(event.status, 0) + 1
            self._server.rate_limited_log(
                logging.WARNING,
                "protocol error from %s: status %d (%s): %s",
                self.peer,
                event.status,
                event.status.name,
                peer_text(event.message),
            )
            out.append(conn.disconnect(event.status, event.message))
            stats.disconnect_frames_sent += 1
            self._flush_and_close(out)

    def _write(self, frames: list[bytes]) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def _flush_and_close(self, out: list[bytes]) -> None:
        if out:
            self._write(out)
            out.clear()
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()
        if self._transport is not None:
            self._transport.close()

    def _close(self, status: Status, message: str) -> None:
        """Agent-initiated close: AGENT-DISCONNECT, then close."""
        if self._closing:
            return
        out: list[bytes] = []
        if self._conn.state is ConnectionState.PROCESSING:
            out.append(self._conn.disconnect(status, message))
            self._stats.disconnect_frames_sent += 1
        self._flush_and_close(out)

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        self._paused_for_flight = self._conn.in_flight >= self._max_in_flight
        if self._paused_for_flight or self._paused_for_write:
            if transport.is_reading():
                transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()

    # -- called by the server ----------------------------------------------

    def check_timers(self, now: float) -> None:
        """Enforce hello, idle and handler timeouts (called once a tick)."""
        limits = self._server.limits
        state = self._conn.state
        if state is ConnectionState.AWAIT_HELLO:
            if now - self.accepted_at > limits.hello_timeout:
                log.info("no HELLO from %s within %.1fs: closing", self.peer, limits.hello_timeout)
                self._flush_and_close([])
            return
        if self._tasks:
            for task, (_, started) in list(self._tasks.items()):
                if now - started > limits.handler_timeout:
                    task.cancel()
        elif now - self.last_activity > limits.idle_timeout and self._conn.in_flight == 0:
            log.info("connection %s idle for %.0fs: closing", self.peer, limits.idle_timeout)
            self._close(Status.TIMEOUT, "idle timeout")

    def start_drain(self) -> None:
        self._draining = True
        if self._conn.state is not ConnectionState.PROCESSING:
            self._flush_and_close([])
        elif self._conn.in_flight == 0:
            self._close(Status.NORMAL, "agent is shutting down")

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()


def parse_listen(spec: str) -> tuple[str, str | int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``unix:PATH`` -> (host|"unix", port|path)."""
    if spec.startswith("unix:") or spec.startswith("unix@"):
        path = spec[5:]
        if not path:
            raise ValueError(f"listen address {spec!r}: empty socket path")
        return "unix", path
    if spec.startswith("/"):
        return "unix", spec
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address {spec!r}: expected HOST:PORT or unix:PATH")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "127.0.0.1", int(port)


class SpopServer:
    """Serves SPOP on one or more listeners with one handler."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits | None = None,
        *,
        noop_actions: bytes = NOOP_ACTIONS,
    ) -> None:
        if not noop_actions:
            raise ValueError("the no-op answer must hold at least one action")
        self.handler = handler
        self.limits = limits or Limits()
        self.noop_actions = noop_actions
        self.stats = ServerStats()
        self.rate_limited_log = RateLimitedLog(log)
        self.addresses: list[str] = []
        self._listeners: list[asyncio.base_events.Server] = []
        self._connections: set[_SpopProtocol] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unix_paths: list[str] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "server not started"
        return self._loop

    @property
    def listening(self) -> bool:
        return bool(self._listeners) and all(s.is_serving() for s in self._listeners)

    def _attach(self, proto: _SpopProtocol) -> None:
        self._connections.add(proto)
        self.stats.connections_accepted += 1
        self.stats.connections_open = len(self._connections)
        self._all_closed.clear()

    def _detach(self, proto: _SpopProtocol) -> None:
        self._connections.discard(proto)
        self.stats.connections_open = len(self._connections)
        if not self._connections:
            self._all_closed.set()

    def over_capacity(self) -> bool:
        return len(self._connections) > self.limits.max_connections

    async def start(self, listen: Sequence[str]) -> None:
        """Bind every listen address; ``self.addresses`` then holds the real ones."""
        self._loop = asyncio.get_running_loop()
        for spec in listen:
            host, port = parse_listen(spec)
            if host == "unix":
                assert isinstance(port, str)
                _remove_stale_socket(port)
                server = await self._loop.create_unix_server(lambda: _SpopProtocol(self), port)
                self._unix_paths.append(port)
                self.addresses.append(f"unix:{port}")
            else:
                assert isinstance(port, int)
                server = await self._loop.create_server(
                    lambda: _SpopProtocol(self), host, port, reuse_address=True, backlog=1024
                )
                for sock in server.sockets:
                    addr = sock.getsockname()
                    shown = f"[{addr[0]}]" if sock.family == socket.AF_INET6 else addr[0]
                    self.addresses.append(f"{shown}:{addr[1]}")
            self._listeners.append(server)
        tick = min(1.0, self.limits.hello_timeout / 2, self.limits.handler_timeout / 2)
        self._ticker = self._loop.create_task(self._tick(tick))

    async def _tick(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            now = self.loop.time()
            for proto in list(self._connections):
                try:
                    proto.check_timers(now)
                except Exception:  # never let one connection stop the timers
                    log.exception("timer check failed for %s", proto.peer)

    async def drain(self) -> None:
        """Stop accepting, answer what is in flight, AGENT-DISCONNECT, close."""
        for server in self._listeners:
            server.close()
        for proto in list(self._connections):
            proto.start_drain()
        try:
            await asyncio.wait_for(self._all_closed.wait(), self.limits.drain_timeout)
        except TimeoutError:
            log.warning(
                "%d connections still open after %.0fs: closing them",
                len(self._connections),
                self.limits.drain_timeout,
            )
            for proto in list(self._connections):
                proto.abort()
        await self.close()

    async def close(self) -> None:
        """Close listeners and connections at once, without draining."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for server in self._listeners:
            server.close()
        for proto in list(self._connections):
            proto.abort()
        for server in self._listeners:
            await server.wait_closed()
        self._listeners.clear()
        for path in self._unix_paths:
            _remove_stale_socket(path)
        self._unix_paths.clear()


def _remove_stale_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def static_handler(actions: Sequence[Action]) -> Callable[[Notify], bytes]:
    """A handler answering every NOTIFY with the same actions."""
    payload = encode_actions(actions)

    def handle(_event: Notify) -> bytes:
        return payload

    return handle
