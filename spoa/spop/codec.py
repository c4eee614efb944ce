"""Encoding and decoding of SPOP's building blocks (SPOE.txt 3.1 to 3.4).

Pure functions over ``bytes``: no I/O, no state. Decoders take the buffer, a
start offset and an end offset (the end of the enclosing frame), and return
the decoded value with the offset just past it. Running past ``end`` is a
malformed frame, never "need more data": frames are length-prefixed and only
decoded once whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Final, TypeAlias

from ..memo import Memo
from .spec import (
    FLAG_TRUE,
    FRAME_LENGTH,
    FRAME_TYPE_FLAGS,
    TYPE_MASK,
    ActionType,
    DataType,
    FrameFlags,
    Scope,
    Status,
)

UINT64_MAX: Final = (1 << 64) - 1
INT64_MIN: Final = -(1 << 63)
INT64_MAX: Final = (1 << 63) - 1
INT32_MIN: Final = -(1 << 31)
INT32_MAX: Final = (1 << 31) - 1
UINT32_MAX: Final = (1 << 32) - 1

#: A varint of a 64-bit value takes at most 10 bytes (SPOE.txt 3.1).
MAX_VARINT_BYTES: Final = 10

#: Strings travel as raw bytes with no charset (HAProxy passes header bytes
#: >= 0x80 through). Decoding with surrogateescape never fails and encoding
#: back gives the very same bytes.
STRING_ERRORS: Final = "surrogateescape"


class DecodeError(ValueError):
    """The peer sent bytes that are not valid SPOP.

    ``status`` is the SPOE.txt status code the connection must be closed with.
    """

    def __init__(self, message: str, status: Status = Status.INVALID) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------
# Varints (SPOE.txt 3.1, "Peers encoding"; haproxy/intops.h)
# ---------------------------------------------------------------------------


def _encode_varint_slow(value: int) -> bytes:
    out = bytearray(((value | 0xF0) & 0xFF,))
    value = (value - 240) >> 4
    while value >= 128:
        out.append((value | 0x80) & 0xFF)
        value = (value - 128) >> 7
    out.append(value)
    return bytes(out)


#: Precomputed encodings of the one- and two-byte range: stream and frame ids
#: and lengths mostly fall here, so the hot path is a list lookup.
_VARINT_TABLE: Final[list[bytes]] = [bytes((i,)) for i in range(240)] + [
    _encode_varint_slow(i) for i in range(240, 2288)
]
_VARINT_TABLE_SIZE: Final = len(_VARINT_TABLE)


#: The end of the three-byte range: HAProxy's stream ids pass the table's
#: range within seconds, and every ACK carries one.
_VARINT_THREE_BYTES_END: Final = 264432


def encode_varint(value: int) -> bytes:
    """Encode an unsigned integer below 2**64 as a SPOP varint."""
    if 0 <= value < _VARINT_TABLE_SIZE:
        return _VARINT_TABLE[value]
    if _VARINT_TABLE_SIZE <= value < _VARINT_THREE_BYTES_END:
        rest = (value - 240) >> 4
        return bytes(((value | 0xF0) & 0xFF, (rest | 0x80) & 0xFF, (rest - 128) >> 7))
    if value < 0 or value > UINT64_MAX:
        raise ValueError(f"varint out of range: {value}")
    return _encode_varint_slow(value)


def decode_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode a varint at ``buf[pos:end]``; return (value, next offset)."""
    if pos >= end:
        raise DecodeError("truncated varint")
    value = buf[pos]
    pos += 1
    if value < 240:
        return value, pos
    shift = 4
    limit = pos + MAX_VARINT_BYTES - 1
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        if pos >= limit:
            raise DecodeError("varint longer than 10 bytes")
        byte = buf[pos]
        pos += 1
        value += byte << shift
        shift += 7
        if byte < 128:
            break
    if value > UINT64_MAX:
        raise DecodeError("varint above 2**64-1")
    return value, pos


# ---------------------------------------------------------------------------
# Typed data (SPOE.txt 3.1)
# ---------------------------------------------------------------------------


class Int32(int):
    """An int sent as INT32 (SPOP type 2)."""

    __slots__ = ()


class UInt32(int):
    """An int sent as UINT32 (SPOP type 3)."""

    __slots__ = ()


class Int64(int):
    """An int sent as INT64 (SPOP type 4); a plain ``int`` is sent so too."""

    __slots__ = ()


class UInt64(int):
    """An int sent as UINT64 (SPOP type 5)."""

    __slots__ = ()


#: A value SPOP can carry. STRING decodes to ``str``, BINARY to ``bytes``.
Value: TypeAlias = bool | int | IPv4Address | IPv6Address | str | bytes | None

_INT_RANGES: Final[dict[type[int], tuple[DataType, int, int]]] = {
    Int32: (DataType.INT32, INT32_MIN, INT32_MAX),
    UInt32: (DataType.UINT32, 0, UINT32_MAX),
    Int64: (DataType.INT64, INT64_MIN, INT64_MAX),
    UInt64: (DataType.UINT64, 0, UINT64_MAX),
}

_NULL_BYTES: Final = bytes((DataType.NULL,))
_TRUE_BYTES: Final = bytes((DataType.BOOL | FLAG_TRUE,))
_FALSE_BYTES: Final = bytes((DataType.BOOL,))
_STRING_TYPE: Final = bytes((DataType.STRING,))
_BINARY_TYPE: Final = bytes((DataType.BINARY,))


def _encode_int(value: int) -> bytes:
    spec = _INT_RANGES.get(type(value))
    if spec is None:
        # A plain int goes as INT64 like HAProxy's own integers, or UINT64
        # when it only fits there.
        spec = _INT_RANGES[Int64] if value <= INT64_MAX else _INT_RANGES[UInt64]
    data_type, low, high = spec
    if not low <= value <= high:
        raise ValueError(f"{value} does not fit {data_type.name}")
    # Negative values travel as their 64-bit two's complement.
    return bytes((data_type,)) + encode_varint(value & UINT64_MAX)


def encode_typed(value: Value) -> bytes:
    """Encode one TYPED-DATA item."""
    if value is None:
        return _NULL_BYTES
    if value is True:
        return _TRUE_BYTES
    if value is False:
        return _FALSE_BYTES
    if isinstance(value, str):
        raw = value.encode("utf-8", STRING_ERRORS)
        return _STRING_TYPE + encode_varint(len(raw)) + raw
    if isinstance(value, bytes):
        return _BINARY_TYPE + encode_varint(len(value)) + value
    if isinstance(value, int):
        return _encode_int(value)
    if isinstance(value, IPv4Address):
        return bytes((DataType.IPV4,)) + value.packed
    if isinstance(value, IPv6Address):
        return bytes((DataType.IPV6,)) + value.packed
    raise TypeError(f"cannot encode {type(value).__name__} as SPOP typed data")


#: Decoded addresses by their packed bytes: the same few HAProxy addresses
#: come back in every NOTIFY and building an ip_address object is costly.
_ADDRESSES: Memo[bytes, IPv4Address | IPv6Address] = Memo(4096)


def _decode_address(raw: bytes) -> IPv4Address | IPv6Address:
    address = _ADDRESSES.get(raw)
    if address is None:
        address = _ADDRESSES.remember(raw, IPv4Address(raw) if len(raw) == 4 else IPv6Address(raw))
    return address


def _signed64(value: int) -> int:
    return value - (1 << 64) if value > INT64_MAX else value


# Enum attribute access costs ~70 ns in CPython 3.11: the decoders compare
# against plain ints.
_T_NULL: Final = int(DataType.NULL)
_T_BOOL: Final = int(DataType.BOOL)
_T_INT32: Final = int(DataType.INT32)
_T_UINT32: Final = int(DataType.UINT32)
_T_INT64: Final = int(DataType.INT64)
_T_UINT64: Final = int(DataType.UINT64)
_T_IPV4: Final = int(DataType.IPV4)
_T_IPV6: Final = int(DataType.IPV6)
_T_STRING: Final = int(DataType.STRING)
_T_BINARY: Final = int(DataType.BINARY)


def decode_typed(buf: bytes, pos: int, end: int) -> tuple[Value, int]:
    """Decode one TYPED-DATA item at ``buf[pos:end]``."""
    if pos >= end:
        raise DecodeError("truncated typed data")
    type_byte = buf[pos]
    pos += 1
    data_type = type_byte & TYPE_MASK
    if data_type == _T_STRING or data_type == _T_BINARY:  # noqa: PLR1714, SIM109 (speed)
        if pos < end and buf[pos] < 240:
            length = buf[pos]
            pos += 1
        else:
            length, pos = decode_varint(buf, pos, end)
        stop = pos + length
        if stop > end:
            raise DecodeError("string longer than its frame")
        if data_type == _T_STRING:
            return buf[pos:stop].decode("utf-8", STRING_ERRORS), stop
        return buf[pos:stop], stop
    if data_type == _T_IPV4 or data_type == _T_IPV6:  # noqa: PLR1714, SIM109 (speed)
        stop = pos + (4 if data_type == _T_IPV4 else 16)
        if stop > end:
            raise DecodeError("truncated address")
        return _decode_address(buf[pos:stop]), stop
    if data_type == _T_NULL:
        return None, pos
    if data_type == _T_BOOL:
        return bool(type_byte & FLAG_TRUE), pos
    if _T_INT32 <= data_type <= _T_UINT64:
        raw_int, pos = decode_varint(buf, pos, end)
        if data_type == _T_INT64:
            return Int64(_signed64(raw_int)), pos
        if data_type == _T_UINT64:
            return UInt64(raw_int), pos
        if data_type == _T_INT32:
            # HAProxy reads every int type as 64 bits then casts to signed.
            signed = _signed64(raw_int)
            if not INT32_MIN <= signed <= INT32_MAX:
                raise DecodeError(f"INT32 out of range: {signed}")
            return Int32(signed), pos
        if raw_int > UINT32_MAX:
            raise DecodeError(f"UINT32 out of range: {raw_int}")
        return UInt32(raw_int), pos
    raise DecodeError(f"unknown data type {data_type}")


# ---------------------------------------------------------------------------
# Names, KV-lists and LIST-OF-MESSAGES (SPOE.txt 3.2)
# ---------------------------------------------------------------------------


def encode_name(name: str) -> bytes:
    """A "STRING" in payload grammars: varint length + bytes, no type byte."""
    raw = name.encode("utf-8", STRING_ERRORS)
    return encode_varint(len(raw)) + raw


#: Argument and key names repeat in every frame: decode each spelling once.
_NAME_CACHE: dict[bytes, str] = {}
_NAME_CACHE_LIMIT: Final = 1024


def decode_name(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    if pos < end and buf[pos] < 240:
        length = buf[pos]
        pos += 1
    else:
        length, pos = decode_varint(buf, pos, end)
    stop = pos + length
    if stop > end:
        raise DecodeError("name longer than its frame")
    raw = buf[pos:stop]
    name = _NAME_CACHE.get(raw)
    if name is None:
        name = raw.decode("utf-8", STRING_ERRORS)
        if len(_NAME_CACHE) < _NAME_CACHE_LIMIT:
            _NAME_CACHE[raw] = name
    return name, stop


def encode_kv_list(items: Iterable[tuple[str, Value]]) -> bytes:
    return b"".join(encode_name(name) + encode_typed(value) for name, value in items)


def decode_kv_list(buf: bytes, pos: int, end: int) -> list[tuple[str, Value]]:
    """Decode a KV-LIST filling ``buf[pos:end]``, in wire order."""
    items: list[tuple[str, Value]] = []
    while pos < end:
        name, pos = decode_name(buf, pos, end)
        value, pos = decode_typed(buf, pos, end)
        items.append((name, value))
    return items


class Message:
    """One SPOE message of a NOTIFY: its name and its arguments by name.

    Arguments keep their wire order; an argument declared without ``name=``
    has the name ``""``; if a name repeats, the last value wins.
    """

    __slots__ = ("args", "name")
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self, name: str, args: dict[str, Value]) -> None:
        self.name = name
        self.args = args

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.name == other.name and self.args == other.args

    def __repr__(self) -> str:
        return f"Message({self.name!r}, {self.args!r})"


def encode_messages(messages: Iterable[Message]) -> bytes:
    parts: list[bytes] = []
    for message in messages:
        if len(message.args) > 255:
            raise ValueError("a message carries at most 255 arguments")
        parts.append(encode_name(message.name))
        parts.append(bytes((len(message.args),)))
        parts.append(encode_kv_list(message.args.items()))
    return b"".join(parts)


def _decode_messages_py(buf: bytes, pos: int, end: int) -> list[Message]:
    """Decode a LIST-OF-MESSAGES filling ``buf[pos:end]``.

    A list, not a dict: one NOTIFY may carry several messages, even several
    with the same name (SPOE.txt 3.3).

    This is the agent's hot path: short names and short strings (the common
    case) are decoded inline; everything else goes through
    :func:`decode_name` and :func:`decode_typed`. It is also the reference
    for the optional C version in ``_speedups.c``, which must return equal
    results and raise the same errors.
    """
    messages: list[Message] = []
    names = _NAME_CACHE
    while pos < end:
        name, pos = decode_name(buf, pos, end)
        if pos >= end:
            raise DecodeError("message without an argument count")
        nb_args = buf[pos]
        pos += 1
        args: dict[str, Value] = {}
        for _ in range(nb_args):
            # Argument name: a cached spelling, else the general decoder.
            length = buf[pos] if pos < end else 255
            stop = pos + 1 + length
            arg_name = names.get(buf[pos + 1 : stop]) if length < 240 and stop <= end else None
            if arg_name is None:
                arg_name, stop = decode_name(buf, pos, end)
            pos = stop
            # Value: a short STRING inline, else the general decoder.
            if pos + 1 < end and buf[pos] == _T_STRING and buf[pos + 1] < 240:
                stop = pos + 2 + buf[pos + 1]
                if stop > end:
                    raise DecodeError("string longer than its frame")
                args[arg_name] = buf[pos + 2 : stop].decode("utf-8", STRING_ERRORS)
                pos = stop
            else:
                args[arg_name], pos = decode_typed(buf, pos, end)
        messages.append(Message(name, args))
    return messages


_MessagesDecoder: TypeAlias = Callable[[bytes, int, int], list[Message]]


def _load_speedups() -> _MessagesDecoder | None:
    """The C ``decode_messages`` bound to this module, or None when it is not built.

    The extension is optional (no compiler at install time leaves it out); it
    delegates the rare cases to :func:`decode_typed` and :func:`decode_name`
    and shares ``_NAME_CACHE``, so both versions fill the cache alike.
    """
    try:
        from . import _speedups
    except ImportError:
        return None
    _speedups.setup(Message, decode_typed, decode_name, DecodeError, _NAME_CACHE, _NAME_CACHE_LIMIT)
    return _speedups.decode_messages


_decode_messages_c = None if os.environ.get("SPOA_NO_SPEEDUPS") else _load_speedups()

#: Whether :func:`decode_messages` is the C version (``SPOA_NO_SPEEDUPS=1`` turns it off).
SPEEDUPS: Final = _decode_messages_c is not None

#: Decode a LIST-OF-MESSAGES filling ``buf[pos:end]`` (see :func:`_decode_messages_py`).
decode_messages: Final[_MessagesDecoder] = _decode_messages_c or _decode_messages_py


# ---------------------------------------------------------------------------
# LIST-OF-ACTIONS (SPOE.txt 3.4)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetVar:
    """set-var: HAProxy sets ``<scope>.<var-prefix>.<name>`` to ``value``.

    A ``None`` value unsets the variable. HAProxy builds the full name in a
    64-byte buffer: keep prefix and name short.
    """

    scope: Scope
    name: str
    value: Value


@dataclass(frozen=True, slots=True)
class UnsetVar:
    """unset-var: HAProxy removes ``<scope>.<var-prefix>.<name>``."""

    scope: Scope
    name: str


Action: TypeAlias = SetVar | UnsetVar


def encode_action(action: Action) -> bytes:
    if isinstance(action, SetVar):
        return (
            bytes((ActionType.SET_VAR, 3, action.scope))
            + encode_name(action.name)
            + encode_typed(action.value)
        )
    return bytes((ActionType.UNSET_VAR, 2, action.scope)) + encode_name(action.name)


def encode_actions(actions: Iterable[Action]) -> bytes:
    """Encode a LIST-OF-ACTIONS; cache the result where the actions repeat."""
    return b"".join(encode_action(action) for action in actions)


# ---------------------------------------------------------------------------
# Frames (SPOE.txt 3.2)
# ---------------------------------------------------------------------------

_FIN: Final = int(FrameFlags.FIN)


def encode_frame(
    frame_type: int,
    stream_id: int,
    frame_id: int,
    payload: bytes,
    flags: int = _FIN,
) -> bytes:
    """Build a complete frame, length prefix included, as one ``bytes``."""
    body = (
        FRAME_TYPE_FLAGS.pack(frame_type, flags)
        + encode_varint(stream_id)
        + encode_varint(frame_id)
        + payload
    )
    return FRAME_LENGTH.pack(len(body)) + body
