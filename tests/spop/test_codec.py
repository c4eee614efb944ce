"""Byte-exact tests of the SPOP codec against SPOE.txt and real HAProxy frames."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spoa.spop import (
    DataType,
    DecodeError,
    FrameType,
    Int32,
    Int64,
    Message,
    Scope,
    SetVar,
    Status,
    UInt32,
    UInt64,
    UnsetVar,
    Value,
    decode_kv_list,
    decode_messages,
    decode_typed,
    decode_varint,
    encode_actions,
    encode_frame,
    encode_kv_list,
    encode_messages,
    encode_typed,
    encode_varint,
)
from spoa.spop.codec import _encode_varint_slow
from spoa.spop.testing import decode_actions, decode_frame_body, split_frames
from tests.spop.captures import CAPTURED
from tests.spop.strategies import SCALARS

# The varint table of SPOE.txt 3.1 / the reference notes, with the boundary
# of every byte count.
VARINTS = [
    (0, "00"),
    (1, "01"),
    (239, "ef"),
    (240, "f000"),
    (241, "f100"),
    (255, "ff00"),
    (256, "f001"),
    (300, "fc03"),
    (1000, "f82f"),
    (1024, "f031"),
    (2287, "ff7f"),
    (2288, "f08000"),
    (16380, "fcf006"),
    (16384, "f0f106"),
    (65535, "fff01e"),
    (264431, "ffff7f"),
    (264432, "f0808000"),
    (33818863, "ffffff7f"),
    (33818864, "f080808000"),
    (2**32 - 1, "fff0fefe7e"),
    (2**64 - 1, "fff0fefefefefefefe0e"),
]


@pytest.mark.parametrize(("value", "hex_bytes"), VARINTS)
def test_varint_encodes_as_the_spec_table(value: int, hex_bytes: str) -> None:
    assert encode_varint(value).hex() == hex_bytes


@pytest.mark.parametrize(("value", "hex_bytes"), VARINTS)
def test_varint_decodes_as_the_spec_table(value: int, hex_bytes: str) -> None:
    raw = bytes.fromhex(hex_bytes)
    assert decode_varint(raw, 0, len(raw)) == (value, len(raw))


def test_varint_decodes_at_an_offset_and_stops_at_its_end() -> None:
    raw = b"\xaa" + bytes.fromhex("fcf006") + b"\xbb"
    assert decode_varint(raw, 1, len(raw)) == (16380, 4)


@pytest.mark.parametrize("value", [-1, 2**64])
def test_varint_refuses_values_outside_64_bits(value: int) -> None:
    with pytest.raises(ValueError):
        encode_varint(value)


@pytest.mark.parametrize(
    "hex_bytes",
    [
        "",  # nothing at all
        "f0",  # continuation promised, none given
        "f080",  # still continuing at the end
        "f0808080808080808080",  # 10 bytes and still continuing
        "ffffffffffffffffff7f",  # 10 bytes, but the value exceeds 2**64-1
    ],
)
def test_varint_malformed_is_a_decode_error(hex_bytes: str) -> None:
    raw = bytes.fromhex(hex_bytes)
    with pytest.raises(DecodeError) as info:
        decode_varint(raw, 0, len(raw))
    assert info.value.status == Status.INVALID


def test_varint_never_reads_past_the_end_offset() -> None:
    raw = bytes.fromhex("f08000")
    with pytest.raises(DecodeError):
        decode_varint(raw, 0, 2)


@given(st.integers(min_value=2288, max_value=264431))
def test_varint_three_byte_values_encode_as_the_general_loop_does(value: int) -> None:
    assert encode_varint(value) == _encode_varint_slow(value)
    assert len(encode_varint(value)) == 3


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_round_trips(value: int) -> None:
    raw = encode_varint(value)
    assert len(raw) <= 10
    assert decode_varint(raw, 0, len(raw)) == (value, len(raw))


# -- typed data ---------------------------------------------------------------

TYPED = [
    (None, "00"),
    (False, "01"),
    (True, "11"),
    (Int32(0), "0200"),
    (Int32(-1), "02fff0fefefefefefefe0e"),
    (Int32(2**31 - 1), "02fff0fefe3e"),
    (UInt32(16380), "03fcf006"),
    (UInt32(2**32 - 1), "03fff0fefe7e"),
    (Int64(-1), "04fff0fefefefefefefe0e"),
    (Int64(-(2**63)), "04f0f1fefefefefefefe06"),
    (Int64(2**63 - 1), "04fff0fefefefefefefe06"),
    (UInt64(2**64 - 1), "05fff0fefefefefefefe0e"),
    (IPv4Address("10.0.0.1"), "060a000001"),
    (IPv6Address("2001:db8::1"), "0720010db8000000000000000000000001"),
    ("2.0", "0803322e30"),
    ("", "0800"),
    (b"\x00\xff", "090200ff"),
]


@pytest.mark.parametrize(("value", "hex_bytes"), TYPED, ids=lambda v: repr(v)[:30])
def test_typed_data_encodes_byte_exact(value: Value, hex_bytes: str) -> None:
    assert encode_typed(value).hex() == hex_bytes


@pytest.mark.parametrize(("value", "hex_bytes"), TYPED, ids=lambda v: repr(v)[:30])
def test_typed_data_decodes_byte_exact_keeping_its_type(value: Value, hex_bytes: str) -> None:
    raw = bytes.fromhex(hex_bytes)
    decoded, end = decode_typed(raw, 0, len(raw))
    assert end == len(raw)
    assert decoded == value
    assert type(decoded) is type(value)


def test_plain_int_is_sent_as_int64_like_haproxy_integers() -> None:
    assert encode_typed(-2).hex() == "04" + encode_varint(2**64 - 2).hex()
    assert encode_typed(7).hex() == "0407"
    assert encode_typed(2**63).hex()[:2] == "05"


@pytest.mark.parametrize(
    "value", [Int32(2**31), Int32(-(2**31) - 1), UInt32(-1), UInt32(2**32), UInt64(-1), 2**64]
)
def test_ints_out_of_their_type_range_are_refused(value: int) -> None:
    with pytest.raises(ValueError):
        encode_typed(value)


def test_bool_flag_lives_in_the_high_nibble() -> None:
    # A frequent bug: true is 0x11 (type 1, flag 0x10), not 0x10 or 0x01.
    assert decode_typed(b"\x11", 0, 1) == (True, 1)
    assert decode_typed(b"\x01", 0, 1) == (False, 1)


def test_string_bytes_outside_utf8_decode_without_failing_and_round_trip() -> None:
    raw = bytes((DataType.STRING, 4)) + b"a\xff\xfeb"
    value, _ = decode_typed(raw, 0, len(raw))
    assert isinstance(value, str)
    assert encode_typed(value) == raw


def test_negative_int32_from_haproxy_is_read_as_signed_64() -> None:
    raw = bytes.fromhex("02fff0fefefefefefefe0e")
    assert decode_typed(raw, 0, len(raw)) == (-1, len(raw))


@pytest.mark.parametrize(
    ("hex_bytes", "why"),
    [
        ("", "nothing"),
        ("0a", "reserved type 10"),
        ("0f", "reserved type 15"),
        ("0805616263", "string shorter than its length"),
        ("0901", "binary without its byte"),
        ("060a0000", "IPv4 of three bytes"),
        ("0720010db8", "IPv6 of four bytes"),
        ("03f0f1fefe7e", "UINT32 above 2**32-1"),
        ("02f0f1fefe3e", "INT32 above 2**31-1"),
        ("04f0", "truncated INT64"),
    ],
)
def test_typed_data_malformed_is_a_decode_error(hex_bytes: str, why: str) -> None:
    raw = bytes.fromhex(hex_bytes)
    with pytest.raises(DecodeError):
        decode_typed(raw, 0, len(raw))


def test_typed_data_cannot_encode_other_python_types() -> None:
    with pytest.raises(TypeError):
        encode_typed(1.5)  # type: ignore[arg-type]


values = st.one_of(
    SCALARS,
    st.text(max_size=300),
    st.binary(max_size=300),
)


@given(values)
def test_typed_data_round_trips_for_every_type(value: Value) -> None:
    raw = encode_typed(value)
    decoded, end = decode_typed(raw, 0, len(raw))
    assert end == len(raw)
    assert decoded == value
    assert type(decoded) is type(value)


# -- KV-lists, messages, actions ----------------------------------------------


def test_kv_list_is_name_without_type_then_typed_value() -> None:
    raw = encode_kv_list([("version", "2.0"), ("max-frame-size", UInt32(16380))])
    assert raw.hex() == "0776657273696f6e0803322e300e6d61782d6672616d652d73697a6503fcf006"
    assert decode_kv_list(raw, 0, len(raw)) == [("version", "2.0"), ("max-frame-size", 16380)]


def test_message_list_keeps_order_and_repeated_names() -> None:
    messages = [
        Message("route", {"method": "GET", "path": "/a"}),
        Message("route", {"method": "PUT", "": Int64(5)}),
    ]
    raw = encode_messages(messages)
    assert decode_messages(raw, 0, len(raw)) == messages


def test_message_with_repeated_argument_keeps_the_last_value() -> None:
    raw = bytes.fromhex("016102") + encode_kv_list([("x", "first"), ("x", "second")])
    assert decode_messages(raw, 0, len(raw)) == [Message("a", {"x": "second"})]


@pytest.mark.parametrize(
    ("hex_bytes", "why"),
    [
        ("0572", "message name cut short"),
        ("05726f757465", "no argument count"),
        ("05726f75746501", "argument missing"),
        ("05726f7574650101", "argument name without value"),
        ("05726f757465010178", "argument without value"),
        ("05726f75746501017808ff", "argument string longer than the frame"),
    ],
)
def test_message_list_malformed_is_a_decode_error(hex_bytes: str, why: str) -> None:
    raw = bytes.fromhex(hex_bytes)
    with pytest.raises(DecodeError):
        decode_messages(raw, 0, len(raw))


def test_set_var_and_unset_var_are_byte_exact() -> None:
    raw = encode_actions([SetVar(Scope.TXN, "backend", "sync"), UnsetVar(Scope.REQ, "key")])
    assert raw.hex() == (
        "010302"
        "076261636b656e64"
        "080473796e63"  # set-var txn backend "sync"
        "020203"
        "036b6579"  # unset-var req key
    )


@pytest.mark.parametrize("scope", list(Scope))
def test_actions_round_trip_in_every_scope(scope: Scope) -> None:
    actions: list[SetVar | UnsetVar] = [
        SetVar(scope, "v", Int64(-3)),
        UnsetVar(scope, "w"),
        SetVar(scope, "n", None),
    ]
    raw = encode_actions(actions)
    assert decode_actions(raw, 0, len(raw)) == actions


@pytest.mark.parametrize(
    "hex_bytes", ["0103", "010309016108", "030202016b", "020302016b", "0203020161"]
)
def test_actions_malformed_is_a_decode_error(hex_bytes: str) -> None:
    raw = bytes.fromhex(hex_bytes)
    with pytest.raises(DecodeError):
        decode_actions(raw, 0, len(raw))


# -- frames -------------------------------------------------------------------


def test_frame_is_length_type_flags_ids_payload() -> None:
    raw = encode_frame(FrameType.ACK, 300, 1, b"\x02\x02\x02\x01k")
    assert raw.hex() == "0000000d6700000001fc0301020202016b"


def test_captured_haproxy_hello_decodes_to_its_fields() -> None:
    frames, rest = split_frames(CAPTURED["hello"])
    assert rest == b""
    (frame,) = frames
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (1, 1, 0, 0)
    items = dict(decode_kv_list(frame.payload, 0, len(frame.payload)))
    assert items["supported-versions"] == "2.0"
    assert items["max-frame-size"] == 16380
    assert type(items["max-frame-size"]) is UInt32
    assert items["capabilities"] == "pipelining"
    assert items["engine-id"] == "d74eabf6-2177-4b76-ba77-97b32aee1dba"


def test_captured_healthcheck_hello_has_no_engine_id_and_empty_capabilities() -> None:
    (frame,), _ = split_frames(CAPTURED["healthcheck-hello"])
    items = dict(decode_kv_list(frame.payload, 0, len(frame.payload)))
    assert items == {
        "supported-versions": "2.0",
        "max-frame-size": 16380,
        "capabilities": "",
        "healthcheck": True,
    }


def test_captured_notify_decodes_to_the_route_message() -> None:
    (frame,), _ = split_frames(CAPTURED["notify"])
    assert (frame.type, frame.stream_id, frame.frame_id) == (FrameType.NOTIFY, 0, 1)
    assert decode_messages(frame.payload, 0, len(frame.payload)) == [
        Message(
            "route",
            {
                "method": "GET",
                "path": "/_matrix/federation/v1/send/123",
                "query": "a=%21b",
                "auth": 'X-Matrix origin="a.example",key="ed25519:1",sig="x"',
                "src": IPv4Address("127.0.0.1"),
            },
        )
    ]


def test_encoding_the_captured_notify_again_gives_the_same_bytes() -> None:
    (frame,), _ = split_frames(CAPTURED["notify"])
    messages = decode_messages(frame.payload, 0, len(frame.payload))
    assert encode_frame(FrameType.NOTIFY, 0, 1, encode_messages(messages)) == CAPTURED["notify"]


def test_frame_body_shorter_than_a_header_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode_frame_body(b"\x03\x00\x00\x00\x01\x00", 0, 6)


def test_split_frames_keeps_the_incomplete_tail() -> None:
    whole = encode_frame(FrameType.NOTIFY, 1, 1, b"")
    frames, rest = split_frames(whole + whole[:5])
    assert len(frames) == 1
    assert rest == whole[:5]
