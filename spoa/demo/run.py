"""``spoa demo``: run the router with demo workers, show what it does, stay up."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import TextIO

from ..policy import Request, load_policy
from ..traffic import Deployment, generate
from .client import Outcome, send_all
from .stack import DemoStack, StackError


def summarise(outcomes: Sequence[Outcome], policy_path: Path, out: TextIO) -> None:
    """Where each kind of request went, and whether its keys stuck to one worker."""
    policy = load_policy(str(policy_path))
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_kind[outcome.request.kind].append(outcome)
    failed = sum(1 for o in outcomes if o.status != 200)
    print(f"\n{len(outcomes)} requests, {len(outcomes) - failed} answered 200:\n", file=out)
    print(f"  {'kind':16} {'n':>5}  {'class':20} {'key':7} workers (requests each)", file=out)
    for kind, items in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
        classes = Counter(o.worker_class for o in items)
        workers = Counter(o.worker for o in items)
        keys: dict[str | None, set[str]] = defaultdict(set)
        kinds: Counter[str] = Counter()
        for o in items:
            r = o.request
            decision = policy.decide(
                Request(r.method, r.path, r.query, r.auth, ip_address("127.0.0.1"))
            )
            kinds[decision.key_kind] += 1
            if decision.key_source is not None:
                keys[decision.key_source].add(o.worker)
        key_kind = kinds.most_common(1)[0][0]
        spread = ", ".join(f"{w} {n}" for w, n in sorted(workers.items()))
        shown_class = "/".join(c or "?" for c in classes)
        print(f"  {kind:16} {len(items):5}  {shown_class:20} {key_kind:7} {spread}", file=out)
        if keys:
            split = sum(1 for ws in keys.values() if len(ws) > 1)
            note = (
                "each on one worker"
                if not split
                else f"{split} spilled to a second worker (bounded-load hashing)"
            )
            print(f"  {'':16} {'':5}  {'':20} {'':7} {len(keys)} distinct keys, {note}", file=out)


async def run(
    policy: Path,
    port: int,
    stats_port: int,
    agent_port: int,
    agent_http: str,
    burst: int,
    workdir: Path,
    stay: bool,
    out: TextIO = sys.stdout,
) -> int:
    stack = DemoStack(
        workdir=workdir,
        policy=policy,
        port=port,
        stats_port=stats_port,
        agent_port=agent_port,
        agent_http=agent_http,
    )
    print(f"starting HAProxy, the agent and demo workers (logs in {workdir}/) ...", file=out)
    try:
        await stack.start()
        await stack.wait_ready()
    except (StackError, OSError) as exc:
        print(f"spoa demo: {exc}", file=sys.stderr)
        await stack.stop()
        return 1
    try:
        workers = sum(len(w) for w in stack.workers.values()) + 1
        print(
            f"ready: {workers} demo workers in {len(stack.classes)} classes, policy {policy}",
            file=out,
        )
        requests = list(generate(burst, Deployment(users=40, rooms=12, remotes=8)))
        outcomes = await asyncio.to_thread(send_all, port, requests, 4)
        summarise(outcomes, policy, out)
        if not stay:
            return 0 if all(o.status == 200 for o in outcomes) else 1
        print(
            f"""
The router is up. Try:
  curl -s http://127.0.0.1:{port}/_matrix/client/v3/sync?since=s1 \\
       -H 'Authorization: Bearer syt_YWxpY2U_abcdefghijklmnopqrst_123456'
  curl -s -X PUT 'http://127.0.0.1:{port}/_matrix/client/v3/rooms/%21abc%3Aexample.org/send/m.room.message/1'
  HAProxy stats:   http://127.0.0.1:{stats_port}/stats   (metrics: /metrics)
  Agent status:    http://{agent_http}/   (metrics: /metrics)
  HAProxy log:     {workdir}/haproxy.log  (via=agent|fallback, class, rule, policy per request)
  Edit {policy} and the next requests follow it, with no restart.
Ctrl-C stops everything.""",
            file=out,
        )
        out.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("\nstopping ...", file=out)
        return 0
    finally:
        await stack.stop()
