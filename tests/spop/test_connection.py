"""The agent-side SPOP state machine, driven byte by byte like HAProxy would."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.spop import (
    Connection,
    ConnectionState,
    FrameFlags,
    FrameType,
    HaproxyDisconnect,
    HaproxyHello,
    LocalProtocolError,
    Message,
    Notify,
    ProtocolViolation,
    Scope,
    SetVar,
    Status,
    UInt32,
    decode_kv_list,
    encode_actions,
    encode_frame,
    encode_kv_list,
    encode_messages,
)
from spoa.spop.testing import (
    decode_actions,
    haproxy_disconnect,
    haproxy_hello,
    notify,
    split_frames,
)
from tests.spop.captures import CAPTURED

ROUTE = Message("route", {"method": "GET", "path": "/x", "src": IPv4Address("10.1.2.3")})
ACTIONS = encode_actions([SetVar(Scope.TXN, "backend", "sync")])


def reply_items(raw: bytes) -> tuple[int, dict[str, object]]:
    (frame,), rest = split_frames(raw)
    assert rest == b""
    return frame.type, dict(decode_kv_list(frame.payload, 0, len(frame.payload)))


def handshaken(max_frame_size: int = 16380, hello: bytes | None = None) -> Connection:
    conn = Connection(max_frame_size)
    conn.receive_data(hello or haproxy_hello())
    (event,) = conn.next_events()
    assert isinstance(event, HaproxyHello)
    conn.accept_hello()
    return conn


def only_error(conn: Connection) -> ProtocolViolation:
    events = conn.next_events()
    assert len(events) == 1, events
    (event,) = events
    assert isinstance(event, ProtocolViolation)
    assert conn.state is ConnectionState.ERROR
    return event


# -- HELLO --------------------------------------------------------------------


def test_real_haproxy_hello_is_answered_with_version_size_and_pipelining() -> None:
    conn = Connection(16380)
    conn.receive_data(CAPTURED["hello"])
    (event,) = conn.next_events()
    assert event == HaproxyHello(
        supported_versions="2.0",
        max_frame_size=16380,
        capabilities=frozenset({"pipelining"}),
        engine_id="d74eabf6-2177-4b76-ba77-97b32aee1dba",
        healthcheck=False,
    )
    frame_type, items = reply_items(conn.accept_hello())
    assert frame_type == FrameType.AGENT_HELLO
    assert items == {"version": "2.0", "max-frame-size": 16380, "capabilities": "pipelining"}
    assert conn.state is ConnectionState.PROCESSING


def test_agent_hello_is_exactly_the_expected_bytes() -> None:
    conn = Connection(16380)
    conn.receive_data(CAPTURED["hello"])
    conn.next_events()
    payload = encode_kv_list(
        [("version", "2.0"), ("max-frame-size", UInt32(16380)), ("capabilities", "pipelining")]
    )
    assert conn.accept_hello() == encode_frame(FrameType.AGENT_HELLO, 0, 0, payload)


@pytest.mark.parametrize(
    ("ours", "theirs", "negotiated"),
    [(16380, 16380, 16380), (1024, 16380, 1024), (16380, 1024, 1024), (256, 300, 256)],
)
def test_frame_size_is_the_smaller_of_both(ours: int, theirs: int, negotiated: int) -> None:
    conn = Connection(ours)
    conn.receive_data(haproxy_hello(max_frame_size=theirs))
    conn.next_events()
    _, items = reply_items(conn.accept_hello())
    assert items["max-frame-size"] == negotiated
    assert conn.frame_size == negotiated


def test_healthcheck_hello_is_answered_then_the_connection_is_done() -> None:
    conn = Connection()
    conn.receive_data(CAPTURED["healthcheck-hello"])
    (event,) = conn.next_events()
    assert isinstance(event, HaproxyHello)
    assert event.healthcheck and event.engine_id is None and event.capabilities == frozenset()
    frame_type, items = reply_items(conn.accept_hello())
    assert frame_type == FrameType.AGENT_HELLO
    assert items["version"] == "2.0"
    assert conn.state is ConnectionState.CLOSED


@pytest.mark.parametrize(
    ("items", "status"),
    [
        ([("max-frame-size", UInt32(16380)), ("capabilities", "")], Status.NO_VERSION),
        ([("supported-versions", "1.0"), ("max-frame-size", UInt32(16380))], Status.BAD_VERSION),
        (
            [("supported-versions", "3.0, 1.5"), ("max-frame-size", UInt32(1024))],
            Status.BAD_VERSION,
        ),
        ([("supported-versions", "x.y"), ("max-frame-size", UInt32(1024))], Status.BAD_VERSION),
        ([("supported-versions", "2.0"), ("capabilities", "")], Status.NO_FRAME_SIZE),
        ([("supported-versions", "2.0"), ("max-frame-size", UInt32(255))], Status.BAD_FRAME_SIZE),
        ([("supported-versions", "2.0"), ("max-frame-size", "big")], Status.BAD_FRAME_SIZE),
        ([("supported-versions", "2.0"), ("max-frame-size", True)], Status.BAD_FRAME_SIZE),
    ],
)
def test_unusable_hello_is_a_protocol_error_with_its_status(
    items: list[tuple[str, object]], status: Status
) -> None:
    conn = Connection()
    conn.receive_data(encode_frame(FrameType.HAPROXY_HELLO, 0, 0, encode_kv_list(items)))  # type: ignore[arg-type]
    assert only_error(conn).status == status


def test_hello_with_spaces_and_several_versions_is_accepted() -> None:
    conn = Connection()
    conn.receive_data(haproxy_hello(supported_versions=" 2.1 , 1.0"))
    (event,) = conn.next_events()
    assert isinstance(event, HaproxyHello)


def test_hello_without_capabilities_is_tolerated_like_haproxy_does() -> None:
    items = [("supported-versions", "2.0"), ("max-frame-size", UInt32(16380))]
    conn = Connection()
    conn.receive_data(encode_frame(FrameType.HAPROXY_HELLO, 0, 0, encode_kv_list(items)))  # type: ignore[arg-type]
    (event,) = conn.next_events()
    assert isinstance(event, HaproxyHello) and event.capabilities == frozenset()


def test_hello_with_nonzero_ids_is_invalid() -> None:
    conn = Connection()
    payload = encode_kv_list([("supported-versions", "2.0"), ("max-frame-size", UInt32(999))])
    conn.receive_data(encode_frame(FrameType.HAPROXY_HELLO, 1, 0, payload))
    assert only_error(conn).status == Status.INVALID


def test_nothing_is_decoded_after_hello_until_it_is_answered() -> None:
    conn = Connection()
    conn.receive_data(haproxy_hello() + notify(1, 1, [ROUTE]))
    (event,) = conn.next_events()
    assert isinstance(event, HaproxyHello)
    assert conn.next_events() == []
    conn.accept_hello()
    (event,) = conn.next_events()
    assert isinstance(event, Notify)


def test_notify_before_hello_is_invalid() -> None:
    conn = Connection()
    conn.receive_data(notify(1, 1, [ROUTE]))
    assert only_error(conn).status == Status.INVALID


def test_second_hello_is_invalid() -> None:
    conn = handshaken()
    conn.receive_data(haproxy_hello())
    assert only_error(conn).status == Status.INVALID


def test_accepting_a_hello_that_never_came_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Connection().accept_hello()


# -- NOTIFY / ACK --------------------------------------------------------------


def test_notify_becomes_an_event_and_ack_echoes_its_ids() -> None:
    conn = handshaken()
    conn.receive_data(notify(4000, 2, [ROUTE]))
    (event,) = conn.next_events()
    assert isinstance(event, Notify)
    assert (event.stream_id, event.frame_id, event.messages) == (4000, 2, [ROUTE])
    assert conn.in_flight == 1
    (frame,), _ = split_frames(conn.ack(4000, 2, ACTIONS))
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (
        FrameType.ACK,
        FrameFlags.FIN,
        4000,
        2,
    )
    assert decode_actions(frame.payload, 0, len(frame.payload)) == [
        SetVar(Scope.TXN, "backend", "sync")
    ]
    assert conn.in_flight == 0


def test_real_haproxy_notify_with_stream_id_zero_is_accepted() -> None:
    conn = handshaken(hello=CAPTURED["hello"])
    conn.receive_data(CAPTURED["notify"])
    (event,) = conn.next_events()
    assert isinstance(event, Notify)
    assert (event.stream_id, event.frame_id) == (0, 1)
    assert event.messages[0].args["auth"] == 'X-Matrix origin="a.example",key="ed25519:1",sig="x"'


def test_many_pipelined_notifies_are_decoded_in_order_and_acked_in_any() -> None:
    conn = handshaken()
    conn.receive_data(b"".join(notify(sid, 1, [ROUTE]) for sid in range(1, 21)))
    events = conn.next_events()
    assert [e.stream_id for e in events if isinstance(e, Notify)] == list(range(1, 21))
    for sid in reversed(range(1, 21)):
        conn.ack(sid, 1, ACTIONS)
    assert conn.in_flight == 0


def test_next_events_honours_its_limit_and_keeps_the_rest() -> None:
    conn = handshaken()
    conn.receive_data(b"".join(notify(sid, 1, [ROUTE]) for sid in range(5)))
    assert len(conn.next_events(2)) == 2
    assert len(conn.next_events(2)) == 2
    assert len(conn.next_events(2)) == 1
    assert conn.next_events(2) == []


def test_ack_for_a_frame_not_in_flight_is_a_local_error() -> None:
    conn = handshaken()
    with pytest.raises(LocalProtocolError):
        conn.ack(1, 1, ACTIONS)


def test_ack_bigger_than_the_frame_size_is_a_local_error_and_keeps_the_frame() -> None:
    conn = handshaken(max_frame_size=256)
    conn.receive_data(notify(1, 1, [ROUTE]))
    conn.next_events()
    huge = encode_actions([SetVar(Scope.TXN, "x", "y" * 300)])
    with pytest.raises(LocalProtocolError):
        conn.ack(1, 1, huge)
    assert conn.in_flight == 1
    conn.ack(1, 1, ACTIONS)


def test_notify_reusing_ids_in_flight_is_invalid() -> None:
    conn = handshaken()
    conn.receive_data(notify(7, 1, [ROUTE]) * 2)
    events = conn.next_events()
    assert isinstance(events[0], Notify)
    assert isinstance(events[1], ProtocolViolation) and events[1].status == Status.INVALID


def test_the_same_ids_may_come_back_once_acked() -> None:
    conn = handshaken()
    for _ in range(3):
        conn.receive_data(notify(7, 1, [ROUTE]))
        (event,) = conn.next_events()
        assert isinstance(event, Notify)
        conn.ack(7, 1, ACTIONS)


def test_notify_without_messages_is_still_an_event() -> None:
    conn = handshaken()
    conn.receive_data(notify(1, 1, []))
    (event,) = conn.next_events()
    assert isinstance(event, Notify) and event.messages == []


def test_notify_with_reserved_flag_bits_is_accepted() -> None:
    conn = handshaken()
    conn.receive_data(encode_frame(FrameType.NOTIFY, 1, 1, encode_messages([ROUTE]), flags=0x81))
    (event,) = conn.next_events()
    assert isinstance(event, Notify)


# -- limits and malformed frames -------------------------------------------------


def test_oversized_frame_is_refused_from_its_length_alone() -> None:
    conn = handshaken()
    conn.receive_data(b"\x00\x01\x00\x00")  # 65536 bytes announced, none sent
    assert only_error(conn).status == Status.TOO_BIG


def test_frames_up_to_haproxys_own_size_are_accepted_above_the_negotiated_one() -> None:
    # HAProxy 3.1 before ce8c2d359 could send NOTIFYs above the negotiated size.
    conn = handshaken(max_frame_size=1024, hello=haproxy_hello(max_frame_size=4096))
    big = Message("route", {"path": "/" + "a" * 2000})
    conn.receive_data(notify(1, 1, [big]))
    (event,) = conn.next_events()
    assert isinstance(event, Notify)
    conn.receive_data(notify(2, 1, [Message("route", {"path": "/" + "a" * 4100})]))
    assert only_error(conn).status == Status.TOO_BIG


def test_frame_bigger_than_our_size_before_hello_is_too_big() -> None:
    conn = Connection(256)
    conn.receive_data((300).to_bytes(4, "big"))
    assert only_error(conn).status == Status.TOO_BIG


@pytest.mark.parametrize("length", [0, 1, 6])
def test_frame_shorter_than_a_header_is_invalid(length: int) -> None:
    conn = handshaken()
    conn.receive_data(length.to_bytes(4, "big") + b"\x03" * length)
    assert only_error(conn).status == Status.INVALID


def test_fragmented_notify_is_refused_with_status_10() -> None:
    conn = handshaken()
    conn.receive_data(encode_frame(FrameType.NOTIFY, 1, 1, encode_messages([ROUTE]), flags=0))
    assert only_error(conn).status == Status.FRAGMENTATION_NOT_SUPPORTED


def test_continuation_frame_is_refused_with_status_10() -> None:
    conn = handshaken()
    conn.receive_data(encode_frame(FrameType.UNSET, 1, 1, b"abc"))
    assert only_error(conn).status == Status.FRAGMENTATION_NOT_SUPPORTED


def test_abort_flag_is_invalid() -> None:
    conn = handshaken()
    flags = FrameFlags.FIN | FrameFlags.ABORT
    conn.receive_data(encode_frame(FrameType.NOTIFY, 1, 1, b"", flags=flags))
    assert only_error(conn).status == Status.INVALID


def test_abort_without_fin_is_invalid() -> None:
    conn = handshaken()
    conn.receive_data(encode_frame(FrameType.NOTIFY, 1, 1, b"", flags=FrameFlags.ABORT))
    assert only_error(conn).status == Status.INVALID


@pytest.mark.parametrize(
    "frame_type", [FrameType.AGENT_HELLO, FrameType.ACK, FrameType.AGENT_DISCONNECT]
)
def test_agent_frames_from_haproxy_are_invalid(frame_type: FrameType) -> None:
    conn = handshaken()
    conn.receive_data(encode_frame(frame_type, 1, 1, b""))
    assert only_error(conn).status == Status.INVALID


def test_unknown_frame_types_are_skipped() -> None:
    conn = handshaken()
    conn.receive_data(encode_frame(42, 1, 1, b"whatever") + notify(1, 1, [ROUTE]))
    (event,) = conn.next_events()
    assert isinstance(event, Notify)


def test_garbage_payload_is_invalid_and_notifies_before_it_survive() -> None:
    conn = handshaken()
    conn.receive_data(notify(1, 1, [ROUTE]) + encode_frame(FrameType.NOTIFY, 2, 1, b"\x05ro"))
    first, second = conn.next_events()
    assert isinstance(first, Notify)
    assert isinstance(second, ProtocolViolation) and second.status == Status.INVALID
    assert conn.error == second


def test_nothing_is_decoded_after_an_error() -> None:
    conn = handshaken()
    conn.receive_data(b"\xff\xff\xff\xff")
    only_error(conn)
    conn.receive_data(notify(1, 1, [ROUTE]))
    assert conn.next_events() == []


# -- DISCONNECT ------------------------------------------------------------------


def test_haproxy_disconnect_is_an_event_answered_by_agent_disconnect() -> None:
    conn = handshaken()
    conn.receive_data(haproxy_disconnect(Status.TIMEOUT, "idle"))
    (event,) = conn.next_events()
    assert event == HaproxyDisconnect(2, "idle")
    frame_type, items = reply_items(conn.disconnect())
    assert frame_type == FrameType.AGENT_DISCONNECT
    assert items == {"status-code": 0, "message": ""}
    assert conn.state is ConnectionState.CLOSED


def test_haproxy_disconnect_before_hello_is_accepted() -> None:
    conn = Connection()
    conn.receive_data(haproxy_disconnect())
    (event,) = conn.next_events()
    assert isinstance(event, HaproxyDisconnect)


def test_haproxy_disconnect_with_odd_fields_still_disconnects() -> None:
    conn = handshaken()
    conn.receive_data(encode_frame(FrameType.HAPROXY_DISCONNECT, 0, 0, b""))
    (event,) = conn.next_events()
    assert event == HaproxyDisconnect(-1, "")


@pytest.mark.parametrize("status", list(Status))
def test_agent_disconnect_carries_every_status_code(status: Status) -> None:
    conn = handshaken()
    frame_type, items = reply_items(conn.disconnect(status, f"because {status.name}"))
    assert frame_type == FrameType.AGENT_DISCONNECT
    assert items == {"status-code": int(status), "message": f"because {status.name}"}


def test_status_codes_are_those_of_spoe_txt() -> None:
    assert {s.name: s.value for s in Status} == {
        "NORMAL": 0,
        "IO": 1,
        "TIMEOUT": 2,
        "TOO_BIG": 3,
        "INVALID": 4,
        "NO_VERSION": 5,
        "NO_FRAME_SIZE": 6,
        "NO_CAPABILITIES": 7,
        "BAD_VERSION": 8,
        "BAD_FRAME_SIZE": 9,
        "FRAGMENTATION_NOT_SUPPORTED": 10,
        "INTERLACED_FRAMES": 11,
        "FRAME_ID_NOT_FOUND": 12,
        "RESOURCE": 13,
        "UNKNOWN": 99,
    }


def test_disconnect_message_is_cut_to_255_bytes_for_haproxy_2_6() -> None:
    conn = handshaken()
    _, items = reply_items(conn.disconnect(Status.UNKNOWN, "x" * 1000))
    assert items["message"] == "x" * 255


def test_disconnect_twice_is_a_local_error() -> None:
    conn = handshaken()
    conn.disconnect()
    with pytest.raises(LocalProtocolError):
        conn.disconnect()


def test_frame_size_setting_is_checked() -> None:
    with pytest.raises(ValueError):
        Connection(255)


# -- any input, any split -----------------------------------------------------------


def feed_in_pieces(data: bytes, cuts: list[int]) -> list[object]:
    conn = Connection(16380)
    events: list[object] = []
    start = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        conn.receive_data(data[start:cut])
        start = cut
        while True:
            batch = conn.next_events()
            events.extend(batch)
            for event in batch:
                if isinstance(event, HaproxyHello) and not event.healthcheck:
                    conn.accept_hello()
                elif isinstance(event, Notify):
                    conn.ack(event.stream_id, event.frame_id, ACTIONS)
            if not batch or conn.state is not ConnectionState.PROCESSING:
                break
    return events


VALID_STREAM = (
    haproxy_hello()
    + b"".join(notify(sid, 1, [ROUTE]) for sid in (0, 1, 239, 240, 5000))
    + haproxy_disconnect()
)


@given(st.lists(st.integers(min_value=0, max_value=len(VALID_STREAM)), max_size=20))
def test_valid_stream_in_any_split_gives_the_same_events(cuts: list[int]) -> None:
    assert feed_in_pieces(VALID_STREAM, cuts) == feed_in_pieces(VALID_STREAM, [])


def test_valid_stream_split_at_every_byte_gives_the_same_events() -> None:
    whole = feed_in_pieces(VALID_STREAM, [])
    assert len(whole) == 7
    assert feed_in_pieces(VALID_STREAM, list(range(len(VALID_STREAM)))) == whole


@settings(max_examples=500)
@given(
    st.binary(max_size=400),
    st.lists(st.integers(min_value=0, max_value=400), max_size=10),
    st.booleans(),
)
def test_any_bytes_in_any_split_give_events_need_more_or_a_protocol_error(
    data: bytes, cuts: list[int], after_hello: bool
) -> None:
    prefix = haproxy_hello() if after_hello else b""
    events = feed_in_pieces(prefix + data, cuts)
    allowed = (HaproxyHello, Notify, HaproxyDisconnect, ProtocolViolation)
    assert all(isinstance(e, allowed) for e in events)
    errors = [e for e in events if isinstance(e, ProtocolViolation)]
    assert len(errors) <= 1
    if errors:
        assert events[-1] is errors[0]


frame_types = st.sampled_from([0, 1, 2, 3, 42, 101, 102, 103])


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            frame_types,
            st.integers(0, 3),
            st.integers(0, 300),
            st.integers(0, 3),
            st.binary(max_size=60),
        ),
        max_size=8,
    ),
    st.lists(st.integers(min_value=0, max_value=600), max_size=10),
)
def test_any_well_framed_garbage_gives_only_events_or_one_error(
    frames: list[tuple[int, int, int, int, bytes]], cuts: list[int]
) -> None:
    data = haproxy_hello() + b"".join(
        encode_frame(t, sid, fid, payload, flags=flags) for t, flags, sid, fid, payload in frames
    )
    events = feed_in_pieces(data, cuts)
    errors = [e for e in events if isinstance(e, ProtocolViolation)]
    assert len(errors) <= 1
    assert all(isinstance(e.status, Status) for e in errors)
