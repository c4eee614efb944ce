"""Plain counters the hot path bumps; spoa.metrics exports them when scraped."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

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
