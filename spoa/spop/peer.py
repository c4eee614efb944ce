"""Frames as HAProxy sends them: builders for tests, benchmarks and probes.

The agent never calls these; they let a test or a load generator speak the
HAProxy side of SPOP with the same codec the agent uses.
"""

from __future__ import annotations

from collections.abc import Iterable

from .codec import Message, UInt32, Value, encode_frame, encode_kv_list, encode_messages
from .spec import DEFAULT_FRAME_SIZE, SPOP_VERSION, FrameType, Status


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
