"""decide() on a realistic request mix: decisions per second and time per decision.

Runs the bundled synapse-workers policy (about a hundred documented regexes)
over requests from spoa.traffic, key extraction and hashing included, and
compares with the obvious implementation (try each rule's regexes in turn).

Then the cost of per-user keys for opaque tokens: the same requests with
every syt_ token swapped for an opaque (MAS-like) one of the same user,
decided by the policy with a whoami setting and a warm whoami cache, against
today's decision of the syt_ requests (the user read out of the token).

    python bench/decide.py [--policy FILE] [--requests N]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import tempfile
import time
from ipaddress import ip_address
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spoa.matrix import syt_localpart  # noqa: E402
from spoa.policy import CompiledPolicy, Request, compile_policy, load_policy  # noqa: E402
from spoa.traffic import Deployment, generate, mas_token  # noqa: E402
from spoa.whoami import WhoamiResolver  # noqa: E402

TOKEN = re.compile(r"syt_[A-Za-z0-9+/=_]+")


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

    whoami_report = whoami_cost(args.policy, requests, args.rounds)

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
    for line in whoami_report:
        print(line)
    return 0


def best_per_decision(
    decide: object, requests: list[Request], rounds: int, users: object = None
) -> float:
    """Nanoseconds per decision: the best of ``rounds`` bulk loops."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for request in requests:
            decide(request, users)  # type: ignore[operator]
        best = min(best, (time.perf_counter_ns() - start) / len(requests))
    return best


def whoami_cost(policy_path: str, requests: list[Request], rounds: int) -> list[str]:
    """Today's decision against a whoami cache hit, on identical requests but the token."""
    site = Path(tempfile.mkdtemp()) / "site.yaml"
    site.write_text(
        f"version: 1\nextends: {Path(policy_path).resolve()}\n"
        "whoami: {url: 'http://127.0.0.1:1/_matrix/client/v3/account/whoami', "
        "max_entries: 1000000}\n"
    )
    plain = load_policy(policy_path)
    resolving = load_policy(str(site))
    assert resolving.whoami is not None
    resolver = WhoamiResolver(resolving.whoami)
    rng = random.Random(5)
    opaque: dict[str, str] = {}
    swapped = []
    for request in requests:
        auth, query = request.auth, request.query
        for token in TOKEN.findall(f"{auth} {query}"):
            localpart = syt_localpart(token)
            if localpart is None:
                continue
            if token not in opaque:
                opaque[token] = mas_token(localpart, rng)
                # A warm cache: every opaque token's user is known.
                resolver._users[opaque[token]] = (localpart, float("inf"))
            auth = auth.replace(token, opaque[token]) if auth else auth
            query = query.replace(token, opaque[token]) if query else query
        swapped.append(request._replace(auth=auth, query=query))
    keyed = [
        i
        for i, r in enumerate(requests)
        if plain.match(r.method, r.path, r.query).key.value == "user"
    ]
    for i in keyed[:1000]:
        a, b = plain.decide(requests[i]), resolving.decide(swapped[i], resolver)
        assert (a.worker_class, a.key) == (b.worker_class, b.key), (requests[i], a, b)
    subset_a = [requests[i] for i in keyed]
    subset_b = [swapped[i] for i in keyed]
    # Short batches, each timed in interleaved rounds, best of each: on a
    # shared machine noise only ever adds time, and it hits both alike.
    today = hit = 0.0
    for start in range(0, len(subset_a), 2000):
        batch_a, batch_b = subset_a[start : start + 2000], subset_b[start : start + 2000]
        best_a = best_b = float("inf")
        for _ in range(rounds * 4):
            best_a = min(best_a, best_per_decision(plain.decide, batch_a, 1))
            best_b = min(best_b, best_per_decision(resolving.decide, batch_b, 1, resolver))
        today += best_a * len(batch_a) / len(subset_a)
        hit += best_b * len(batch_b) / len(subset_b)
    whole_today = whole_hit = float("inf")
    for _ in range(rounds):
        whole_today = min(whole_today, best_per_decision(plain.decide, requests, 1))
        whole_hit = min(whole_hit, best_per_decision(resolving.decide, swapped, 1, resolver))
    return [
        f"whoami: the same requests with opaque tokens, a warm whoami cache "
        f"({len(opaque):,} tokens, {len(keyed):,} user-keyed requests of {len(requests):,})",
        f"  user-keyed, today (syt_)   {today / 1000:8.3f} us per decision",
        f"  user-keyed, whoami hit     {hit / 1000:8.3f} us per decision",
        f"  cost of a cache hit        {(hit - today) / 1000:8.3f} us",
        f"  whole mix, today / whoami  {whole_today / 1000:8.3f} / {whole_hit / 1000:.3f} us",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
