"""Constants of the Stream Processing Offload Protocol (SPOP 2.0).

Every name and number here comes from HAProxy's ``doc/SPOE.txt`` (section
numbers cited per member) and, where the text and the code disagree, from
``src/flt_spoe.c`` / ``include/haproxy/spoe-t.h``, which are authoritative.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

#: The only SPOP version any HAProxy since 1.8.10 speaks (SPOE.txt 3.2.4).
SPOP_VERSION = "2.0"

#: Smallest max-frame-size HAProxy accepts in AGENT-HELLO (SPOE.txt 3.2.5,
#: flt_spoe.c: below it HAProxy disconnects with status 9).
MIN_FRAME_SIZE = 256

#: HAProxy's default max-frame-size: tune.bufsize (16384) minus 4.
DEFAULT_FRAME_SIZE = 16380

#: Largest frame HAProxy can ever send: tune.bufsize is capped well below
#: this; anything claiming more is garbage, not a big frame.
MAX_FRAME_SIZE = 1 << 24

#: Size of the length prefix in front of every frame (SPOE.txt 3.2).
LENGTH_PREFIX_SIZE = 4

#: The length prefix, and the type and flags that open a frame body (SPOE.txt 3.2).
FRAME_LENGTH = struct.Struct(">I")
FRAME_TYPE_FLAGS = struct.Struct(">BI")

#: type (1) + flags (4) + stream-id (>= 1) + frame-id (>= 1): the smallest
#: frame body (SPOE.txt 3.2; HAProxy calls shorter frames invalid).
MIN_FRAME_BODY = 7

#: Messages in AGENT-DISCONNECT longer than this are rejected by HAProxy 2.6.
MAX_DISCONNECT_MESSAGE = 255


class FrameType(IntEnum):
    """FRAME-TYPE byte (SPOE.txt 3.2.2)."""

    #: Continuation of a fragmented payload; only valid with ``fragmentation``.
    UNSET = 0
    #: First frame HAProxy sends on a connection; payload KV-LIST (3.2.4).
    HAPROXY_HELLO = 1
    #: HAProxy closes the connection; payload KV-LIST (3.2.8).
    HAPROXY_DISCONNECT = 2
    #: Messages for the agent; payload LIST-OF-MESSAGES (3.2.6).
    NOTIFY = 3
    #: Reply to HAPROXY-HELLO; payload KV-LIST (3.2.5).
    AGENT_HELLO = 101
    #: The agent closes the connection; payload KV-LIST (3.2.9).
    AGENT_DISCONNECT = 102
    #: Reply to NOTIFY; payload LIST-OF-ACTIONS (3.2.7).
    ACK = 103


class FrameFlags(IntFlag):
    """FLAGS word of the frame header, 32 bits big-endian (SPOE.txt 3.2)."""

    #: Last frame of a (possibly fragmented) payload.
    FIN = 0x00000001
    #: Abort a fragmented payload; only valid together with FIN.
    ABORT = 0x00000002


class DataType(IntEnum):
    """TYPED-DATA type, the low nibble of the type byte (SPOE.txt 3.1).

    The high nibble holds flags; only BOOL uses one (``FLAG_TRUE``).
    """

    NULL = 0
    BOOL = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    IPV4 = 6
    IPV6 = 7
    STRING = 8
    BINARY = 9


#: Flag in the type byte of a BOOL that is true (spoe-t.h SPOE_DATA_FL_TRUE).
FLAG_TRUE = 0x10
#: Mask of the type in a type byte (spoe-t.h SPOE_DATA_T_MASK).
TYPE_MASK = 0x0F


class ActionType(IntEnum):
    """ACTION-TYPE byte of LIST-OF-ACTIONS (SPOE.txt 3.4)."""

    #: set-var: 3 arguments, scope, name, value.
    SET_VAR = 1
    #: unset-var: 2 arguments, scope, name.
    UNSET_VAR = 2


class Scope(IntEnum):
    """Variable scope of set-var / unset-var (SPOE.txt 3.4)."""

    PROC = 0
    SESS = 1
    TXN = 2
    REQ = 3
    RES = 4


class Status(IntEnum):
    """STATUS-CODE of HAPROXY-DISCONNECT and AGENT-DISCONNECT (SPOE.txt 3.2.9, 3.5)."""

    #: Normal close.
    NORMAL = 0
    #: I/O error.
    IO = 1
    #: A timeout occurred.
    TIMEOUT = 2
    #: A frame is bigger than the negotiated max-frame-size.
    TOO_BIG = 3
    #: An invalid frame was received.
    INVALID = 4
    #: HAPROXY-HELLO carries no "supported-versions".
    NO_VERSION = 5
    #: HAPROXY-HELLO carries no "max-frame-size".
    NO_FRAME_SIZE = 6
    #: HAPROXY-HELLO carries no "capabilities".
    NO_CAPABILITIES = 7
    #: No version in common.
    BAD_VERSION = 8
    #: max-frame-size too big or too small.
    BAD_FRAME_SIZE = 9
    #: Payload fragmentation is not supported.
    FRAGMENTATION_NOT_SUPPORTED = 10
    #: Invalid interlaced frames.
    INTERLACED_FRAMES = 11
    #: Frame-id not found (an ACK or a fragment for no known frame).
    FRAME_ID_NOT_FOUND = 12
    #: Resource allocation error (used for "too many connections").
    RESOURCE = 13
    #: Unknown error.
    UNKNOWN = 99


#: Capabilities this agent announces. ``async`` is deliberately absent:
#: HAProxy <= 3.0 keeps one engine-id per thread, so an ACK on another
#: connection may not match, and 3.1 removed it. ``fragmentation`` is absent
#: because HAProxy never accepts fragmented ACKs.
AGENT_CAPABILITIES = "pipelining"
