"""HAProxy's side of SPOP, for tests, benchmarks and probes.

The agent never imports this module. It builds the frames HAProxy sends
(HAPROXY-HELLO, NOTIFY, HAPROXY-DISCONNECT) and decodes what the agent sends
back (frames, LIST-OF-ACTIONS), with the codec the agent itself uses. Its
decoders trust their input: the agent's own receive path, which does not,
is :class:`spoa.spop.connection.Connection`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .codec import (
    Action,
    DecodeError,
    Message,
    SetVar,
    UInt32,
    UnsetVar,
    Value,
    decode_name,
    decode_typed,
    decode_varint,
    encode_frame,
    encode_kv_list,
    encode_messages,
)
from .spec import (
    DEFAULT_FRAME_SIZE,
    FRAME_LENGTH,
    FRAME_TYPE_FLAGS,
    LENGTH_PREFIX_SIZE,
    SPOP_VERSION,
    ActionType,
    FrameType,
    Scope,
    Status,
)

# -- what HAProxy sends -------------------------------------------------------------------


def haproxy_hello(
    *,
    max_frame_size: int = DEFAULT_FRAME_SIZE,
    capabilities: str = "pipelining,async",
    engine_id: str | None = "4b3c2c5e-6c44-4d1a-9b0c-2f7e8f1d0a11",
    healthcheck: bool = False,
    supported_versions: str = SPOP_VERSION,
) -> bytes:
    """HAPROXY-HELLO as HAProxy 2.6 builds it (a health check when asked)."""
    items: list[tuple[str, Value]] = [
        ("supported-versions", supported_versions),
        ("max-frame-size", UInt32(max_frame_size)),
        ("capabilities", "" if healthcheck else capabilities),
    ]
    if healthcheck:
        items.append(("healthcheck", True))
    elif engine_id is not None:
        items.append(("engine-id", engine_id))
    return encode_frame(FrameType.HAPROXY_HELLO, 0, 0, encode_kv_list(items))


def notify(stream_id: int, frame_id: int, messages: Iterable[Message]) -> bytes:
    """NOTIFY carrying ``messages``."""
    return encode_frame(FrameType.NOTIFY, stream_id, frame_id, encode_messages(messages))


def haproxy_disconnect(status: Status | int = Status.NORMAL, message: str = "") -> bytes:
    """HAPROXY-DISCONNECT."""
    payload = encode_kv_list((("status-code", UInt32(int(status))), ("message", message)))
    return encode_frame(FrameType.HAPROXY_DISCONNECT, 0, 0, payload)


# -- what the agent sends -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """A whole frame, header decoded, payload left as bytes."""

    type: int
    flags: int
    stream_id: int
    frame_id: int
    payload: bytes


def decode_frame_body(buf: bytes, pos: int, end: int) -> Frame:
    """Decode the frame body at ``buf[pos:end]`` (after the length prefix)."""
    if end - pos < 7:
        raise DecodeError(f"frame of {end - pos} bytes is shorter than a header")
    frame_type, flags = FRAME_TYPE_FLAGS.unpack_from(buf, pos)
    stream_id, pos = decode_varint(buf, pos + 5, end)
    frame_id, pos = decode_varint(buf, pos, end)
    return Frame(frame_type, flags, stream_id, frame_id, buf[pos:end])


def split_frames(buf: bytes) -> tuple[list[Frame], bytes]:
    """Decode every complete frame of ``buf``; return them and the rest."""
    frames: list[Frame] = []
    pos = 0
    while len(buf) - pos >= LENGTH_PREFIX_SIZE:
        (length,) = FRAME_LENGTH.unpack_from(buf, pos)
        end = pos + LENGTH_PREFIX_SIZE + length
        if end > len(buf):
            break
        frames.append(decode_frame_body(buf, pos + LENGTH_PREFIX_SIZE, end))
        pos = end
    return frames, buf[pos:]


def decode_actions(buf: bytes, pos: int, end: int) -> list[Action]:
    """Decode the LIST-OF-ACTIONS filling ``buf[pos:end]`` (an ACK's payload)."""
    actions: list[Action] = []
    while pos < end:
        if pos + 3 > end:
            raise DecodeError("truncated action")
        action_type, nb_args, scope_byte = buf[pos], buf[pos + 1], buf[pos + 2]
        pos += 3
        try:
            scope = Scope(scope_byte)
        except ValueError:
            raise DecodeError(f"unknown variable scope {scope_byte}") from None
        name, pos = decode_name(buf, pos, end)
        if action_type == ActionType.SET_VAR and nb_args == 3:
            value, pos = decode_typed(buf, pos, end)
            actions.append(SetVar(scope, name, value))
        elif action_type == ActionType.UNSET_VAR and nb_args == 2:
            actions.append(UnsetVar(scope, name))
        else:
            raise DecodeError(f"bad action type {action_type} with {nb_args} arguments")
    return actions
