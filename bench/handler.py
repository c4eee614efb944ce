"""The routing handler alone (NOTIFY in, ACK actions out): what metrics cost.

Runs the SPOE handler over NOTIFY events of the spoa.traffic mix with the
synapse-workers policy, with the metrics counters on and off, interleaved
rounds so machine noise hits both alike, and prints the time per request of
each and the difference.

    python bench/handler.py [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spoa.policy.reload import PolicyHolder  # noqa: E402
from spoa.routing import RouteHandler  # noqa: E402
from spoa.spop import Notify  # noqa: E402
from spoa.traffic import Deployment, generate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", default=str(ROOT / "policies" / "synapse-workers.yaml"))
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    holder = PolicyHolder(args.policy)
    events = [
        Notify(i, 1, [t.route_message()])
        for i, t in enumerate(generate(args.requests, Deployment(users=5000, rooms=2000)))
    ]
    counted = RouteHandler(holder, count=True)
    plain = RouteHandler(holder, count=False)
    times: dict[str, list[float]] = {"with metrics": [], "without metrics": []}
    for _ in range(args.rounds):
        for name, handler in (("with metrics", counted), ("without metrics", plain)):
            start = time.perf_counter()
            for event in events:
                handler(event)
            times[name].append((time.perf_counter() - start) / len(events) * 1e6)
    with_m = statistics.median(times["with metrics"])
    without = statistics.median(times["without metrics"])
    print(f"handler: {len(events):,} NOTIFY events, {args.rounds} interleaved rounds (median)")
    print(f"  with metrics      {with_m:6.2f} us per request")
    print(f"  without metrics   {without:6.2f} us per request")
    print(f"  metrics cost      {with_m - without:6.2f} us ({100 * (with_m / without - 1):.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
