"""Plain counters the hot path bumps; spoa.metrics exports them when scraped."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final


@dataclass(slots=True)
class ServerStats:
    """Plain counters, bumped once per read on the hot path, read by metrics."""

    connections_accepted: int = 0
    connections_refused: int = 0
    connections_open: int = 0
    healthchecks: int = 0
    notify_frames: int = 0
    ack_frames: int = 0
    hello_frames: int = 0
    agent_hello_frames: int = 0
    disconnect_frames_received: int = 0
    disconnect_frames_sent: int = 0
    handler_errors: int = 0
    #: NOTIFYs of a backlog left unanswered: HAProxy had given up on them.
    stale_notifies: int = 0
    protocol_errors: dict[int, int] = field(default_factory=dict)


#: Decision latency bucket bounds, in nanoseconds (exported in seconds):
#: decisions take microseconds; the top buckets catch stalls.
LATENCY_BOUNDS_NS: Final = (
    1_000,
    2_000,
    3_000,
    5_000,
    7_500,
    10_000,
    20_000,
    50_000,
    100_000,
    250_000,
    1_000_000,
    10_000_000,
)

#: One decision in this many is timed for the latency histogram.
LATENCY_SAMPLE: Final = 8


@dataclass(slots=True)
class DecisionStats:
    """What the routing handler counts, per decision."""

    #: (class, rule, key kind) -> decisions.
    counts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    #: Latency histogram: one bucket per bound, plus +Inf.
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_NS) + 1))
    latency_sum_ns: int = 0
    #: NOTIFY frames without a route message (an HAProxy configuration error).
    unrouted: int = 0
