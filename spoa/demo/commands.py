"""The demo's verbs of the ``spoa`` command: demo, traffic, demo-worker.

Their modules (HAProxy, DNS, workers, the traffic model) are imported only when
one of them runs: the agent's own commands never load them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from .. import DEFAULT_HTTP

log = logging.getLogger("spoa")

NAMES = ("demo", "traffic", "demo-worker")


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the demo's verbs to the ``spoa`` command."""
    demo = commands.add_parser(
        "demo",
        help="run HAProxy, the agent and demo workers on this machine",
        description="Start HAProxy (the shipped haproxy/haproxy.cfg), the agent and demo "
        "workers on loopback, send a burst of Matrix traffic, show where it went, and stay "
        "up until Ctrl-C.",
    )
    demo.add_argument("--policy", default="policies/synapse-workers.yaml", metavar="FILE")
    demo.add_argument("--port", type=int, default=8008, help="HAProxy's client port")
    demo.add_argument("--stats-port", type=int, default=8404)
    demo.add_argument("--agent-port", type=int, default=12345)
    demo.add_argument(
        "--agent-http", default=DEFAULT_HTTP, help="the agent's status page and metrics"
    )
    demo.add_argument("--burst", type=int, default=600, help="requests to send at start")
    demo.add_argument("--workdir", default="run", help="logs and state (default ./run)")
    demo.add_argument("--no-stay", action="store_true", help="exit after the burst")

    traffic = commands.add_parser(
        "traffic",
        help="print a realistic Matrix request mix as JSON lines",
        description="Print requests drawn from a model of a busy homeserver (syncs, sends, "
        "federation, media, ...) as JSON lines, the input of 'spoa explain --jsonl'.",
    )
    traffic.add_argument("--count", type=int, default=1000)
    traffic.add_argument("--users", type=int, default=500)
    traffic.add_argument("--rooms", type=int, default=200)
    traffic.add_argument("--remotes", type=int, default=50, help="remote homeservers")
    traffic.add_argument("--seed", type=int, default=1)

    worker = commands.add_parser(
        "demo-worker",
        help="serve demo workers (stand-ins for Synapse workers)",
        description="Each NAME=HOST:PORT serves a demo worker: /health, "
        "/_matrix/client/versions, and every other path answered with the worker's name. "
        "The class is NAME up to its last '-'.",
    )
    worker.add_argument("workers", nargs="+", metavar="NAME=HOST:PORT")


def run(args: argparse.Namespace) -> int:
    """Run one of :data:`NAMES`."""
    if args.command == "demo":
        return _demo(args)
    if args.command == "traffic":
        return _traffic(args)
    return _demo_worker(args)


def _traffic(args: argparse.Namespace) -> int:
    from ..traffic import Deployment, generate

    deployment = Deployment(
        users=args.users, rooms=args.rooms, remotes=args.remotes, seed=args.seed
    )
    for request in generate(args.count, deployment):
        print(json.dumps(request.as_json()))
    return 0


def _demo_worker(args: argparse.Namespace) -> int:
    from .workers import WorkerSpec, start_workers

    try:
        specs = [WorkerSpec.parse(text) for text in args.workers]
    except ValueError as exc:
        print(f"spoa demo-worker: {exc}", file=sys.stderr)
        return 2

    async def serve() -> int:
        workers = await start_workers(specs)
        for w in workers:
            log.info("demo worker %s listening on %s:%d", w.spec.name, w.spec.host, w.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for w in workers:
            await w.stop()
        return 0

    try:
        return asyncio.run(serve())
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 2


def _demo(args: argparse.Namespace) -> int:
    policy = Path(args.policy)
    if not policy.exists():
        print(f"spoa demo: no policy file {policy}", file=sys.stderr)
        return 2
    from .run import run as demo_run

    return asyncio.run(
        demo_run(
            policy.resolve(),
            args.port,
            args.stats_port,
            args.agent_port,
            args.agent_http,
            args.burst,
            Path(args.workdir).resolve(),
            not args.no_stay,
        )
    )
