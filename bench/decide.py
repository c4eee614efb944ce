"""decide() on a realistic request mix: decisions per second and time per decision.

Runs the bundled synapse-workers policy (about a hundred documented regexes)
over requests from spoa.traffic, key extraction and hashing included, and
compares with the obvious implementation (try each rule's regexes in turn).

    python bench/decide.py [--policy FILE] [--requests N]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from ipaddress import ip_address
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spoa.policy import CompiledPolicy, Request, compile_policy  # noqa: E402
from spoa.traffic import Deployment, generate  # noqa: E402


def naive_match(
    policy: CompiledPolicy, compiled: list[list[re.Pattern[str]]], request: Request
) -> str:
    for rule, patterns in zip(policy.rules, compiled, strict=True):
        for pattern in patterns:
            if pattern.search(request.path):
                if rule.conditions_hold(request.method, request.query):
                    return rule.name
                break
    return policy.default.name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", default=str(ROOT / "policies" / "synapse-workers.yaml"))
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    content = Path(args.policy).read_bytes()
    policy = compile_policy(content, args.policy)
    cold_policy = compile_policy(content, args.policy, memo_entries=0)
    requests = [
        Request(t.method, t.path, t.query, t.auth, ip_address(t.src))
        for t in generate(args.requests, Deployment(users=5000, rooms=2000, remotes=300))
    ]
    decide = policy.decide
    # Per-decision times, one sample per request of the last round.
    samples: list[int] = []
    rates = []
    for _ in range(args.rounds):
        clock = time.perf_counter_ns
        samples = []
        record = samples.append
        start = time.perf_counter()
        for request in requests:
            t0 = clock()
            decide(request)
            record(clock() - t0)
        rates.append(len(requests) / (time.perf_counter() - start))
    bulk = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for request in requests:
            decide(request)
        bulk.append(len(requests) / (time.perf_counter() - start))

    cold = []
    for request in requests:
        t0 = time.perf_counter_ns()
        cold_policy.decide(request)
        cold.append(time.perf_counter_ns() - t0)
    cold.sort()

    compiled = [[re.compile(p) for p in r.spec.paths] for r in policy.rules if r.spec]
    naive_times = []
    for request in requests[:10_000]:
        t0 = time.perf_counter_ns()
        naive_match(policy, compiled, request)
        naive_times.append(time.perf_counter_ns() - t0)
    match_times = []
    for request in requests[:10_000]:
        t0 = time.perf_counter_ns()
        cold_policy.match(request.method, request.path, request.query)
        match_times.append(time.perf_counter_ns() - t0)

    samples.sort()
    patterns = sum(len(r.spec.paths) for r in policy.rules if r.spec)
    print(
        f"decide: {Path(args.policy).name}, {len(policy.rules)} rules, {patterns} patterns, "
        f"{len(requests):,} requests of the spoa.traffic mix"
    )
    print(f"  decisions/s (bulk loop, best of {args.rounds})  {max(bulk):12,.0f}")
    print(f"  per decision, median        {statistics.median(samples) / 1000:8.2f} us")
    print(f"  per decision, p90           {samples[int(len(samples) * 0.9)] / 1000:8.2f} us")
    print(f"  per decision, p99           {samples[int(len(samples) * 0.99)] / 1000:8.2f} us")
    print(
        f"  without memos, median       {statistics.median(cold) / 1000:8.2f} us "
        f"(p99 {cold[int(len(cold) * 0.99)] / 1000:.2f} us)"
    )
    print(
        f"  rule match only, median     {statistics.median(match_times) / 1000:8.2f} us "
        f"(combined dispatch, no memo)"
    )
    print(
        f"  rule match only, median     {statistics.median(naive_times) / 1000:8.2f} us "
        f"(each regex in turn)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
