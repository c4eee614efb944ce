"""The optional C ``decode_messages`` against its pure-Python reference.

``spoa.spop._speedups`` must return what ``codec._decode_messages_py`` returns
and raise what it raises, for every input. Without the extension these tests
skip, unless ``SPOA_REQUIRE_SPEEDUPS=1`` (as in CI) makes its absence a failure.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TypeAlias

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.spop import FrameType, Status, codec
from spoa.spop.codec import (
    DecodeError,
    Message,
    Value,
    _decode_messages_py,
    encode_kv_list,
    encode_messages,
    encode_name,
)
from spoa.spop.testing import split_frames
from tests.spop.captures import CAPTURED
from tests.spop.strategies import SCALARS

Decoder: TypeAlias = Callable[[bytes, int, int], list[Message]]

REQUIRED = os.environ.get("SPOA_REQUIRE_SPEEDUPS") == "1"


def _import_speedups() -> tuple[ModuleType | None, str]:
    try:
        from spoa.spop import _speedups
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    # Bound here as codec does, so the comparison holds with SPOA_NO_SPEEDUPS too.
    _speedups.setup(
        Message,
        codec.decode_typed,
        codec.decode_name,
        DecodeError,
        codec._NAME_CACHE,
        codec._NAME_CACHE_LIMIT,
    )
    return _speedups, ""


SPEEDUPS_MODULE, IMPORT_ERROR = _import_speedups()

pytestmark = pytest.mark.skipif(
    SPEEDUPS_MODULE is None and not REQUIRED,
    reason=f"spoa.spop._speedups is not built ({IMPORT_ERROR}); "
    "set SPOA_REQUIRE_SPEEDUPS=1 to make that a failure",
)


def speedups() -> ModuleType:
    """The extension module; fails the test when it is required but missing."""
    if SPEEDUPS_MODULE is None:
        pytest.fail(
            f"SPOA_REQUIRE_SPEEDUPS=1 but spoa.spop._speedups does not import ({IMPORT_ERROR})",
            pytrace=False,
        )
    return SPEEDUPS_MODULE


def c_decode() -> Decoder:
    decode: Decoder = speedups().decode_messages
    return decode


Outcome: TypeAlias = tuple[str, object]


def outcome(decode: Decoder, buf: bytes, pos: int, end: int) -> Outcome:
    """What a decoder did, comparable across implementations.

    Arguments keep their order and each value its exact type (``Int32(1)``
    and ``True`` both equal ``1``).
    """
    try:
        messages = decode(buf, pos, end)
    except DecodeError as exc:
        assert type(exc) is DecodeError
        return ("DecodeError", exc.status)
    assert type(messages) is list
    return (
        "ok",
        [
            (type(m), m.name, [(name, type(value), value) for name, value in m.args.items()])
            for m in messages
        ],
    )


def assert_same(buf: bytes, pos: int, end: int) -> Outcome:
    expected = outcome(_decode_messages_py, buf, pos, end)
    assert outcome(c_decode(), buf, pos, end) == expected
    return expected


def test_the_extension_is_built_when_required() -> None:
    speedups()


def test_codec_uses_the_extension_unless_told_not_to() -> None:
    speedups()
    script = "import spoa.spop.codec as c; print(c.SPEEDUPS, c.decode_messages.__module__)"
    env = {k: v for k, v in os.environ.items() if k != "SPOA_NO_SPEEDUPS"}
    on = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert on.stdout.split() == ["True", "spoa.spop._speedups"]
    off = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "SPOA_NO_SPEEDUPS": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert off.stdout.split() == ["False", "spoa.spop.codec"]


# -- well-formed lists --------------------------------------------------------


def raw_text(max_size: int) -> st.SearchStrategy[str]:
    """Strings as HAProxy sends them: any bytes, UTF-8 or not."""
    return st.binary(max_size=max_size).map(lambda b: b.decode("utf-8", "surrogateescape"))


names = st.one_of(
    st.sampled_from(["", "route", "method", "path", "query", "auth", "src"]),
    st.text(max_size=12),
    raw_text(12),
    # Lengths from 240 on take a multi-byte varint.
    st.text(min_size=240, max_size=300),
    raw_text(300).filter(lambda s: len(s.encode("utf-8", "surrogateescape")) >= 240),
)

values: st.SearchStrategy[Value] = st.one_of(
    SCALARS,
    st.text(max_size=30),
    raw_text(30),
    st.text(min_size=230, max_size=300),
    st.binary(min_size=235, max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.binary(max_size=300),
)

#: A message as it travels: a name and its arguments in wire order, names
#: possibly repeated (which a Message's dict cannot hold).
wire_messages = st.lists(
    st.tuples(names, st.lists(st.tuples(names, values), max_size=8)), max_size=4
)


def encode_wire(messages: list[tuple[str, list[tuple[str, Value]]]]) -> bytes:
    return b"".join(
        encode_name(name) + bytes((len(args),)) + encode_kv_list(args) for name, args in messages
    )


@given(wire_messages, st.binary(max_size=6), st.binary(max_size=6))
@settings(max_examples=300)
def test_well_formed_lists_decode_alike_anywhere_in_a_buffer(
    messages: list[tuple[str, list[tuple[str, Value]]]], before: bytes, after: bytes
) -> None:
    payload = encode_wire(messages)
    buf = before + payload + after
    assert assert_same(buf, len(before), len(before) + len(payload))[0] == "ok"
    # And both are right: a repeated name keeps its first place and its last value.
    decoded = c_decode()(buf, len(before), len(before) + len(payload))
    assert [(m.name, list(m.args.items())) for m in decoded] == [
        (name, list(dict(args).items())) for name, args in messages
    ]


@given(st.lists(st.builds(Message, names, st.dictionaries(names, values, max_size=8))))
def test_lists_from_encode_messages_decode_alike(messages: list[Message]) -> None:
    raw = encode_messages(messages)
    assert c_decode()(raw, 0, len(raw)) == messages
    assert_same(raw, 0, len(raw))


def test_a_message_of_255_arguments_decodes_alike() -> None:
    raw = encode_messages([Message("m", {f"a{i}": f"v{i}" for i in range(255)})])
    assert assert_same(raw, 0, len(raw))[0] == "ok"


def test_the_captured_haproxy_notify_decodes_alike() -> None:
    (frame,), _ = split_frames(CAPTURED["notify"])
    assert frame.type == FrameType.NOTIFY
    payload = frame.payload
    assert c_decode()(payload, 0, len(payload)) == _decode_messages_py(payload, 0, len(payload))
    kind, decoded = assert_same(payload, 0, len(payload))
    assert kind == "ok"
    assert decoded != []
    # In place in the whole frame too, as the connection decodes it.
    raw = CAPTURED["notify"]
    start = len(raw) - len(payload)
    assert assert_same(raw, start, len(raw)) == (kind, decoded)


# -- malformed input ----------------------------------------------------------


@pytest.mark.parametrize(
    "hex_bytes",
    [
        "0572",  # message name cut short
        "05726f757465",  # no argument count
        "05726f75746501",  # argument missing
        "05726f7574650101",  # argument name without value
        "05726f757465010178",  # argument without value
        "05726f75746501017808ff",  # argument string longer than the frame
        "05726f75746501017808",  # string type byte, no length
        "05726f7574650101780a",  # reserved type
        "f0",  # message name with a truncated varint length
        "f0ff",  # message name longer than the frame
        "0161 01 f0",  # argument name with a truncated varint length
        "0161 01 ff7f",  # argument name with a long length, longer than the frame
        "0161 01 0178 02f0f1fefe3e",  # INT32 out of range
        "0161 00 0162",  # a good message, then one cut short
    ],
)
def test_malformed_lists_fail_alike(hex_bytes: str) -> None:
    raw = bytes.fromhex(hex_bytes)
    assert assert_same(raw, 0, len(raw)) == ("DecodeError", Status.INVALID)


interesting_bytes = st.lists(
    st.one_of(
        st.integers(min_value=0, max_value=255),
        st.sampled_from([0, 1, 2, 5, 6, 7, 8, 9, 0x11, 0xEF, 0xF0, 0xFF, 0x7F, 0x80]),
    ),
    max_size=120,
).map(bytes)


@given(st.one_of(st.binary(max_size=200), interesting_bytes), st.data())
@settings(max_examples=500)
def test_any_bytes_at_any_offsets_decode_or_fail_alike(buf: bytes, data: st.DataObject) -> None:
    pos = data.draw(st.integers(min_value=0, max_value=len(buf)), label="pos")
    end = data.draw(st.integers(min_value=0, max_value=len(buf)), label="end")
    assert_same(buf, pos, end)


@given(wire_messages, st.data())
@settings(max_examples=300)
def test_damaged_well_formed_lists_decode_or_fail_alike(
    messages: list[tuple[str, list[tuple[str, Value]]]], data: st.DataObject
) -> None:
    buf = bytearray(encode_wire(messages))
    if buf:
        changes = st.tuples(st.integers(min_value=0, max_value=len(buf) - 1), st.integers(0, 255))
        for index, byte in data.draw(st.lists(changes, max_size=3), label="changes"):
            buf[index] = byte
    end = data.draw(st.integers(min_value=0, max_value=len(buf)), label="end")
    assert_same(bytes(buf), 0, end)


# -- the name cache -----------------------------------------------------------


@pytest.fixture
def saved_name_cache() -> Iterator[dict[bytes, str]]:
    saved = dict(codec._NAME_CACHE)
    yield saved
    codec._NAME_CACHE.clear()
    codec._NAME_CACHE.update(saved)


@pytest.mark.usefixtures("saved_name_cache")
def test_both_fill_the_shared_name_cache_alike() -> None:
    raw = encode_messages(
        [Message("route", {"method": "GET", "x" * 300: "long", "caf\xe9": "v", "": "anon"})]
    )
    codec._NAME_CACHE.clear()
    _decode_messages_py(raw, 0, len(raw))
    by_python = dict(codec._NAME_CACHE)
    codec._NAME_CACHE.clear()
    c_decode()(raw, 0, len(raw))
    assert by_python == codec._NAME_CACHE
    assert list(codec._NAME_CACHE) == list(by_python)
    assert b"route" in by_python
    assert b"caf\xc3\xa9" in by_python


@pytest.mark.usefixtures("saved_name_cache")
def test_the_name_cache_stops_growing_at_its_limit_in_both() -> None:
    raw = encode_messages([Message("new-name", {"other-new-name": "v"})])
    for decode in (_decode_messages_py, c_decode()):
        codec._NAME_CACHE.clear()
        codec._NAME_CACHE.update(
            (f"filler{i}".encode(), f"filler{i}") for i in range(codec._NAME_CACHE_LIMIT - 1)
        )
        assert decode(raw, 0, len(raw)) == [Message("new-name", {"other-new-name": "v"})]
        assert len(codec._NAME_CACHE) == codec._NAME_CACHE_LIMIT
        assert b"new-name" in codec._NAME_CACHE
        assert b"other-new-name" not in codec._NAME_CACHE


# -- arguments ----------------------------------------------------------------


@pytest.mark.parametrize("buf", [bytearray(b"\x00\x00"), memoryview(b"\x00\x00"), "\x00\x00"])
def test_a_buffer_that_is_not_bytes_is_a_type_error(buf: object) -> None:
    with pytest.raises(TypeError):
        c_decode()(buf, 0, 2)  # type: ignore[arg-type]


def test_wrong_argument_counts_are_type_errors() -> None:
    decode: Callable[..., object] = c_decode()
    with pytest.raises(TypeError):
        decode(b"")
    with pytest.raises(TypeError):
        decode(b"", 0, 0, 0)


@pytest.mark.parametrize(
    ("pos", "end"), [(0, 0), (2, 2), (2, 1), (5, 3), (-3, -3), (-1, -5), (2**70, 3), (9, -(2**70))]
)
def test_an_empty_range_decodes_to_nothing_in_both(pos: int, end: int) -> None:
    raw = b"\x01a\x00"
    assert _decode_messages_py(raw, pos, end) == []
    assert c_decode()(raw, pos, end) == []


@pytest.mark.parametrize(("pos", "end"), [(-1, 3), (-3, 0), (0, 4), (0, 2**70)])
def test_a_range_outside_the_buffer_is_a_value_error(pos: int, end: int) -> None:
    # Python would index from the end or past it; the contract is pos and end within buf.
    with pytest.raises(ValueError, match="within buf") as info:
        c_decode()(b"\x01a\x00", pos, end)
    assert not isinstance(info.value, DecodeError)


def fresh_module() -> ModuleType:
    """A new instance of the extension, with its own (empty) state."""
    speedups()
    spec = importlib.util.find_spec("spoa.spop._speedups")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module is not SPEEDUPS_MODULE
    return module


def test_decoding_before_setup_is_a_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        fresh_module().decode_messages(b"\x00\x00", 0, 2)


def test_a_module_created_but_not_executed_refuses_to_work() -> None:
    speedups()
    spec = importlib.util.find_spec("spoa.spop._speedups")
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(RuntimeError):
        module.decode_messages(b"\x00\x00", 0, 2)
    with pytest.raises(RuntimeError):
        module.setup(Message, codec.decode_typed, codec.decode_name, DecodeError, {}, 5)


@pytest.mark.parametrize(
    "bad",
    [
        (1, codec.decode_typed, codec.decode_name, DecodeError, {}, 5),
        (Message, codec.decode_typed, codec.decode_name, ValueError(), {}, 5),
        (Message, codec.decode_typed, codec.decode_name, DecodeError, [], 5),
        (Message, codec.decode_typed, codec.decode_name, DecodeError, {}, "5"),
        (Message, codec.decode_typed, codec.decode_name, DecodeError, {}),
    ],
)
def test_setup_refuses_arguments_of_the_wrong_kind(bad: tuple[object, ...]) -> None:
    with pytest.raises(TypeError):
        fresh_module().setup(*bad)


def test_setup_refuses_a_negative_cache_limit() -> None:
    with pytest.raises(ValueError):
        fresh_module().setup(Message, codec.decode_typed, codec.decode_name, DecodeError, {}, -1)


@pytest.mark.parametrize(
    ("result", "error"),
    [((None, 99), ValueError), ((None, -1), ValueError), ((None,), TypeError), (None, TypeError)],
)
def test_a_python_decoder_returning_nonsense_cannot_move_reads_outside_the_frame(
    result: object, error: type[Exception]
) -> None:
    module = fresh_module()
    module.setup(Message, lambda *_: result, codec.decode_name, DecodeError, {}, 5)
    raw = bytes.fromhex("0161 01 0178 00")  # the NULL value goes to decode_typed
    with pytest.raises(error):
        module.decode_messages(raw, 0, len(raw))


def test_errors_of_the_message_class_reach_the_caller() -> None:
    def refuse(name: str, args: dict[str, Value]) -> Message:
        raise KeyError(name)

    module = fresh_module()
    module.setup(refuse, codec.decode_typed, codec.decode_name, DecodeError, {}, 5)
    with pytest.raises(KeyError):
        module.decode_messages(b"\x01a\x00", 0, 3)


def test_a_private_cache_of_size_zero_is_never_filled() -> None:
    module = fresh_module()
    cache: dict[bytes, str] = {}
    module.setup(Message, codec.decode_typed, codec.decode_name, DecodeError, cache, 0)
    assert module.decode_messages(b"\x01a\x01\x01b\x08\x01c", 0, 8) == [Message("a", {"b": "c"})]
    assert cache == {}


# -- no leaks -----------------------------------------------------------------


def route_frame() -> bytes:
    (frame,), _ = split_frames(CAPTURED["notify"])
    return frame.payload


#: Offsets past 256 are not CPython's cached small ints: each one made is an allocation.
PAD = bytes(300)


MALFORMED = [
    bytes.fromhex(h)
    for h in (
        "05726f75746501017808ff",  # inline string too long, after a good name
        "0161 01 0178 02f0f1fefe3e",  # a Python decode_typed error
        "0161 01 f0",  # a Python decode_name error
        "05726f757465",  # no argument count
    )
]
# An error in the second message, with the first decoded and a dict half full.
MALFORMED.append(route_frame() + bytes.fromhex("0161 02 0162 0800 0163 0805"))
MALFORMED = [PAD + raw for raw in MALFORMED]


def traced_growth(work: Callable[[], None]) -> int:
    """Bytes still allocated after ``work``, once caches are warm."""
    work()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        work()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_repeated_decodes_do_not_grow_memory() -> None:
    decode = c_decode()
    raw = PAD + route_frame()

    def work() -> None:
        for _ in range(100_000):
            decode(raw, len(PAD), len(raw))

    # One object lost per decode would be megabytes.
    assert traced_growth(work) < 64 * 1024


def test_repeated_errors_do_not_grow_memory() -> None:
    decode = c_decode()

    def work() -> None:
        for _ in range(25_000):
            for raw in MALFORMED:
                try:
                    decode(raw, len(PAD), len(raw))
                except DecodeError:
                    pass
                else:
                    raise AssertionError("decoded a malformed list")

    assert traced_growth(work) < 64 * 1024


def test_decoding_leaves_reference_counts_of_shared_objects_as_they_were() -> None:
    # A reference taken too many on a shared object leaks nothing tracemalloc sees.
    decode = c_decode()
    raw = PAD + route_frame()
    decode(raw, len(PAD), len(raw))
    (message,) = decode(raw, len(PAD), len(raw))
    shared: list[object] = [
        raw,
        Message,
        DecodeError,
        codec.decode_typed,
        codec.decode_name,
        codec._NAME_CACHE,
        codec._NAME_CACHE[b"route"],
        codec._NAME_CACHE[b"method"],
        message.args["src"],  # from decode_typed's address cache
    ]
    del message
    gc.collect()
    before = [sys.getrefcount(obj) for obj in shared]
    for _ in range(10_000):
        decode(raw, len(PAD), len(raw))
        for bad in MALFORMED:
            with pytest.raises(DecodeError):
                decode(bad, len(PAD), len(bad))
    gc.collect()
    assert [sys.getrefcount(obj) for obj in shared] == before
