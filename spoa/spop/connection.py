"""The agent's side of one SPOP connection, as a sans-I/O state machine.

Theory of operation
-------------------
Bytes from HAProxy go in with :meth:`Connection.receive_data`; decoded
protocol events come out of :meth:`Connection.next_events`. Bytes for HAProxy
come out of :meth:`Connection.accept_hello`, :meth:`Connection.ack` and
:meth:`Connection.disconnect`. Nothing here reads a socket, a clock or a
logger: the asyncio adapter (``spoa.server``) owns all of that.

States::

    AWAIT_HELLO --HAPROXY-HELLO--> HELLO_RECEIVED --accept_hello()--> PROCESSING
         |                              |   (health check: --> CLOSED)
         |                              +--disconnect()--> CLOSED
    any state --HAPROXY-DISCONNECT--> DISCONNECTING --disconnect()--> CLOSED
    any state --malformed input--> ERROR --disconnect(status)--> CLOSED

A malformed frame never raises out of :meth:`next_events`: it becomes a
:class:`ProtocolViolation` event carrying the SPOE.txt status code to close with,
and the connection stops decoding. Misuse by the caller (acking a frame that
is not in flight, sending in the wrong state) raises
:class:`LocalProtocolError`: that is a bug in the caller, not in the peer.

Every frame length is checked as soon as its 4-byte prefix is in, before any
of its payload is waited for: an oversized frame costs nothing to reject.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeAlias

from .codec import (
    DecodeError,
    Message,
    Value,
    decode_kv_list,
    decode_messages,
    decode_varint,
    encode_frame,
    encode_kv_list,
    encode_varint,
)
from .codec import UInt32 as _UInt32
from .spec import (
    AGENT_CAPABILITIES,
    FRAME_LENGTH,
    FRAME_TYPE_FLAGS,
    LENGTH_PREFIX_SIZE,
    MAX_DISCONNECT_MESSAGE,
    MAX_FRAME_SIZE,
    MIN_FRAME_BODY,
    MIN_FRAME_SIZE,
    SPOP_VERSION,
    FrameFlags,
    FrameType,
    Status,
)


class LocalProtocolError(RuntimeError):
    """The caller asked for something the protocol forbids in this state."""


class ConnectionState(Enum):
    AWAIT_HELLO = "await-hello"
    HELLO_RECEIVED = "hello-received"
    PROCESSING = "processing"
    DISCONNECTING = "disconnecting"
    ERROR = "error"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class HaproxyHello:
    """HAPROXY-HELLO, already checked: the version and frame size are usable.

    ``max_frame_size`` is HAProxy's; the negotiated size is
    :attr:`Connection.frame_size` once :meth:`Connection.accept_hello` ran.
    """

    supported_versions: str
    max_frame_size: int
    capabilities: frozenset[str]
    engine_id: str | None
    healthcheck: bool


class Notify:
    """NOTIFY: messages to act on; answer with :meth:`Connection.ack`."""

    __slots__ = ("frame_id", "messages", "stream_id")

    def __init__(self, stream_id: int, frame_id: int, messages: list[Message]) -> None:
        self.stream_id = stream_id
        self.frame_id = frame_id
        self.messages = messages

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Notify):
            return NotImplemented
        return (self.stream_id, self.frame_id, self.messages) == (
            other.stream_id,
            other.frame_id,
            other.messages,
        )

    def __repr__(self) -> str:
        return f"Notify({self.stream_id}, {self.frame_id}, {self.messages!r})"


@dataclass(frozen=True, slots=True)
class HaproxyDisconnect:
    """HAPROXY-DISCONNECT: answer with :meth:`Connection.disconnect`, then close."""

    status: int
    message: str


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke the protocol: close with ``disconnect(status, message)``."""

    status: Status
    message: str


Event: TypeAlias = HaproxyHello | Notify | HaproxyDisconnect | ProtocolViolation

_ACK_HEAD: Final = struct.Struct(">IBI")
_FIN: Final = int(FrameFlags.FIN)
_ABORT: Final = int(FrameFlags.ABORT)
_NOTIFY: Final = int(FrameType.NOTIFY)
_ACK: Final = int(FrameType.ACK)
#: Bytes of an ACK body before the ids: type (1) + flags (4).
_ACK_FIXED: Final = 5


def _parse_versions(text: str) -> bool:
    """Whether a "supported-versions" list admits SPOP 2.0 (SPOE.txt 3.2.4).

    A major version announced means every minor of it, so any "2.x" will do.
    """
    for item in text.split(","):
        major, dot, minor = item.strip().partition(".")
        if dot and major.isdigit() and minor.isdigit() and int(major) == 2:
            return True
    return False


class Connection:
    """One agent-side SPOP connection.

    ``max_frame_size`` is the largest frame this agent announces; the frame
    size used is the smaller of it and HAProxy's. Frames from HAProxy are
    accepted up to the size HAProxy itself announced, because HAProxy 3.1
    before fix ce8c2d359 could send NOTIFYs above the negotiated size.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if not MIN_FRAME_SIZE <= max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError(
                f"max frame size must be within {MIN_FRAME_SIZE}..{MAX_FRAME_SIZE}, "
                f"not {max_frame_size}"
            )
        self.state = ConnectionState.AWAIT_HELLO
        self.max_frame_size = max_frame_size
        #: Negotiated frame size, valid once the HELLO is accepted.
        self.frame_size = max_frame_size
        self.hello: HaproxyHello | None = None
        self._inbound_limit = max_frame_size
        self._buf = b""
        self._pos = 0
        self._pending: set[tuple[int, int]] = set()
        #: Why decoding stopped, once the state is ERROR.
        self.error: ProtocolViolation | None = None

    # -- inbound -----------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """NOTIFY frames delivered and not yet acknowledged."""
        return len(self._pending)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet decoded."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from HAProxy; decode them with :meth:`next_events`."""
        if self.state is ConnectionState.CLOSED or self.state is ConnectionState.ERROR:
            return
        if self._pos >= len(self._buf):
            self._buf = data
        else:
            self._buf = self._buf[self._pos :] + data
        self._pos = 0

    def next_events(self, limit: int = sys.maxsize) -> list[Event]:
        """Decode up to ``limit`` events from the bytes received so far.

        Never raises on peer input. Stops after a HAPROXY-HELLO (the caller
        must answer it before anything else is decoded) and after an error.
        """
        state = self.state
        if state is ConnectionState.HELLO_RECEIVED or state is ConnectionState.CLOSED:
            return []
        if state is ConnectionState.ERROR or state is ConnectionState.DISCONNECTING:
            return []
        events: list[Event] = []
        buf = self._buf
        pos = self._pos
        size = len(buf)
        limit_len = self._inbound_limit
        processing = state is ConnectionState.PROCESSING
        try:
            while size - pos >= LENGTH_PREFIX_SIZE and len(events) < limit:
                (length,) = FRAME_LENGTH.unpack_from(buf, pos)
                if length > limit_len:
                    raise DecodeError(
                        f"frame of {length} bytes exceeds the limit of {limit_len}",
                        Status.TOO_BIG,
                    )
                if length < MIN_FRAME_BODY:
                    raise DecodeError(f"frame of {length} bytes is shorter than a header")
                end = pos + LENGTH_PREFIX_SIZE + length
                if end > size:
                    break
                frame_type, flags = FRAME_TYPE_FLAGS.unpack_from(buf, pos + LENGTH_PREFIX_SIZE)
                p = pos + LENGTH_PREFIX_SIZE + 5
                stream_id = buf[p]
                if stream_id < 240:
                    p += 1
                else:
                    stream_id, p = decode_varint(buf, p, end)
                frame_id = buf[p] if p < end else 0
                if frame_id < 240 and p < end:
                    p += 1
                else:
                    frame_id, p = decode_varint(buf, p, end)
                pos = end
                if frame_type == _NOTIFY and flags == _FIN and processing:
                    events.append(self._notify(stream_id, frame_id, buf, p, end))
                    continue
                event = self._slow_frame(frame_type, flags, stream_id, frame_id, buf, p, end)
                if event is not None:
                    events.append(event)
                    if not isinstance(event, Notify):
                        break
        except DecodeError as exc:
            self._fail(exc.status, str(exc))
            events.append(ProtocolViolation(exc.status, str(exc)))
            return events
        self._pos = pos
        if pos >= size:
            self._buf = b""
            self._pos = 0
        return events

    def _slow_frame(
        self,
        frame_type: int,
        flags: int,
        stream_id: int,
        frame_id: int,
        buf: bytes,
        pos: int,
        end: int,
    ) -> Event | None:
        """Every frame but a well-formed NOTIFY while processing."""
        if flags & _ABORT and not flags & _FIN:
            raise DecodeError("ABORT flag without FIN")
        if not flags & _FIN or frame_type == FrameType.UNSET:
            raise DecodeError(
                "fragmented payloads are not supported", Status.FRAGMENTATION_NOT_SUPPORTED
            )
        if frame_type == FrameType.HAPROXY_DISCONNECT:
            items = dict(decode_kv_list(buf, pos, end))
            status = items.get("status-code")
            message = items.get("message")
            self.state = ConnectionState.DISCONNECTING
            return HaproxyDisconnect(
                status if isinstance(status, int) and not isinstance(status, bool) else -1,
                message if isinstance(message, str) else "",
            )
        if frame_type == FrameType.HAPROXY_HELLO:
            if self.state is not ConnectionState.AWAIT_HELLO:
                raise DecodeError("HAPROXY-HELLO after the handshake")
            if stream_id or frame_id:
                raise DecodeError("HAPROXY-HELLO with non-zero stream-id or frame-id")
            return self._hello(decode_kv_list(buf, pos, end))
        if self.state is ConnectionState.AWAIT_HELLO:
            raise DecodeError(f"frame type {frame_type} before HAPROXY-HELLO")
        if frame_type == FrameType.NOTIFY:
            if flags & _ABORT:
                raise DecodeError("NOTIFY with ABORT, but no payload was fragmented")
            # FIN with reserved flag bits set: the bits mean nothing yet.
            return self._notify(stream_id, frame_id, buf, pos, end)
        if frame_type in (FrameType.AGENT_HELLO, FrameType.AGENT_DISCONNECT, FrameType.ACK):
            raise DecodeError(f"agent frame type {frame_type} received from HAProxy")
        # SPOE.txt 3.2.2: unknown frames may be silently skipped.
        return None

    def _notify(self, stream_id: int, frame_id: int, buf: bytes, pos: int, end: int) -> Notify:
        key = (stream_id, frame_id)
        if key in self._pending:
            raise DecodeError(f"NOTIFY {stream_id}/{frame_id} reuses the ids of a frame in flight")
        messages = decode_messages(buf, pos, end)
        self._pending.add(key)
        return Notify(stream_id, frame_id, messages)

    def _hello(self, items: list[tuple[str, Value]]) -> HaproxyHello:
        kv = dict(items)
        versions = kv.get("supported-versions")
        if not isinstance(versions, str):
            raise DecodeError("HAPROXY-HELLO has no supported-versions", Status.NO_VERSION)
        if not _parse_versions(versions):
            raise DecodeError(
                f"no SPOP version in common: HAProxy supports {versions!r}, agent {SPOP_VERSION}",
                Status.BAD_VERSION,
            )
        size = kv.get("max-frame-size")
        if size is None:
            raise DecodeError("HAPROXY-HELLO has no max-frame-size", Status.NO_FRAME_SIZE)
        if not isinstance(size, int) or isinstance(size, bool) or size < MIN_FRAME_SIZE:
            raise DecodeError(f"bad max-frame-size {size!r}", Status.BAD_FRAME_SIZE)
        capabilities = kv.get("capabilities")
        caps = (
            frozenset(c.strip() for c in capabilities.split(",") if c.strip())
            if isinstance(capabilities, str)
            else frozenset()
        )
        engine_id = kv.get("engine-id")
        hello = HaproxyHello(
            supported_versions=versions,
            max_frame_size=int(size),
            capabilities=caps,
            engine_id=engine_id if isinstance(engine_id, str) else None,
            healthcheck=kv.get("healthcheck") is True,
        )
        self.hello = hello
        self.state = ConnectionState.HELLO_RECEIVED
        return hello

    def _fail(self, status: Status, message: str) -> None:
        self.state = ConnectionState.ERROR
        self.error = ProtocolViolation(status, message)
        self._buf = b""
        self._pos = 0

    # -- outbound ----------------------------------------------------------

    def accept_hello(self) -> bytes:
        """AGENT-HELLO for the HAPROXY-HELLO just received (SPOE.txt 3.2.5).

        After a health-check HELLO the connection is done: close it once the
        bytes are written.
        """
        hello = self.hello
        if self.state is not ConnectionState.HELLO_RECEIVED or hello is None:
            raise LocalProtocolError(f"no HELLO to accept in state {self.state.value}")
        self.frame_size = min(self.max_frame_size, hello.max_frame_size)
        self._inbound_limit = min(max(self.frame_size, hello.max_frame_size), MAX_FRAME_SIZE)
        payload = encode_kv_list(
            (
                ("version", SPOP_VERSION),
                ("max-frame-size", _UInt32(self.frame_size)),
                ("capabilities", AGENT_CAPABILITIES),
            )
        )
        self.state = ConnectionState.CLOSED if hello.healthcheck else ConnectionState.PROCESSING
        return encode_frame(FrameType.AGENT_HELLO, 0, 0, payload)

    def ack(self, stream_id: int, frame_id: int, actions: bytes) -> bytes:
        """ACK for a NOTIFY in flight, with an encoded LIST-OF-ACTIONS.

        Raises :class:`LocalProtocolError` if that NOTIFY is not in flight or
        the ACK would not fit the negotiated frame size.
        """
        sid = encode_varint(stream_id)
        fid = encode_varint(frame_id)
        body = _ACK_FIXED + len(sid) + len(fid) + len(actions)
        if body > self.frame_size:
            raise LocalProtocolError(
                f"ACK of {body} bytes exceeds the frame size {self.frame_size}"
            )
        try:
            self._pending.remove((stream_id, frame_id))
        except KeyError:
            raise LocalProtocolError(f"no NOTIFY {stream_id}/{frame_id} in flight") from None
        return _ACK_HEAD.pack(body, _ACK, _FIN) + sid + fid + actions

    def abandon(self, stream_id: int, frame_id: int) -> None:
        """Forget a NOTIFY in flight without answering it (HAProxy gave up on it)."""
        self._pending.discard((stream_id, frame_id))

    def disconnect(self, status: Status | int = Status.NORMAL, message: str = "") -> bytes:
        """AGENT-DISCONNECT (SPOE.txt 3.2.9); close the socket once written."""
        if self.state is ConnectionState.CLOSED:
            raise LocalProtocolError("connection already closed")
        raw = message.encode("utf-8", "replace")[:MAX_DISCONNECT_MESSAGE]
        payload = encode_kv_list(
            (
                ("status-code", _UInt32(int(status))),
                ("message", raw.decode("utf-8", "ignore")),
            )
        )
        self.state = ConnectionState.CLOSED
        self._pending.clear()
        self._buf = b""
        self._pos = 0
        return encode_frame(FrameType.AGENT_DISCONNECT, 0, 0, payload)
