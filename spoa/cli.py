"""The ``spoa`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from . import __version__
from .server import Limits, SpopServer, static_handler
from .spop import Scope, SetVar

log = logging.getLogger("spoa")

_LIMITS = Limits()


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spoa", description="SPOE agent that routes Matrix Synapse requests for HAProxy."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the agent")
    serve.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="SPOP address: HOST:PORT, [V6]:PORT or unix:PATH; repeatable "
        "(default 127.0.0.1:12345)",
    )
    serve.add_argument(
        "--static-class",
        default="main",
        metavar="CLASS",
        help="answer every request with this worker class (default: main)",
    )
    serve.add_argument("--max-connections", type=int, default=_LIMITS.max_connections)
    serve.add_argument("--max-frame-size", type=int, default=_LIMITS.max_frame_size)
    serve.add_argument(
        "--max-in-flight",
        type=int,
        default=_LIMITS.max_in_flight,
        help="NOTIFY frames in flight per connection",
    )
    serve.add_argument("--hello-timeout", type=_positive_float, default=_LIMITS.hello_timeout)
    serve.add_argument("--idle-timeout", type=_positive_float, default=_LIMITS.idle_timeout)
    serve.add_argument("--handler-timeout", type=_positive_float, default=_LIMITS.handler_timeout)
    serve.add_argument("--drain-timeout", type=_positive_float, default=_LIMITS.drain_timeout)
    serve.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop: uvloop when installed (auto), or the standard one",
    )
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("spoa: --loop uvloop, but uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run(coro: Coroutine[Any, Any, int], loop: str) -> int:
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        return runner.run(coro)


async def _serve(args: argparse.Namespace) -> int:
    limits = Limits(
        max_connections=args.max_connections,
        max_frame_size=args.max_frame_size,
        max_in_flight=args.max_in_flight,
        hello_timeout=args.hello_timeout,
        idle_timeout=args.idle_timeout,
        handler_timeout=args.handler_timeout,
        drain_timeout=args.drain_timeout,
    )
    handler = static_handler(
        (
            SetVar(Scope.TXN, "backend", args.static_class),
            SetVar(Scope.TXN, "rule", "static"),
            SetVar(Scope.TXN, "policy", "static"),
        )
    )
    server = SpopServer(handler, limits)
    try:
        await server.start(args.listen or ["127.0.0.1:12345"])
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("listening for SPOP on %s", " ".join(server.addresses))
    await stop.wait()
    log.info("stopping: draining %d connections", server.stats.connections_open)
    await server.drain()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        try:
            return _run(_serve(args), args.loop)
        except ValueError as exc:
            parser.error(str(exc))
    parser.error(f"unknown command {args.command}")
    return 2
