"""A test agent on the real server: the backend is named by the request path.

``/to/<name>/...`` -> backend ``<name>``; any other path -> ``generic``. With
``--delay-ms`` the handler is asynchronous and answers after that long, so
tests can hold frames in flight. Run as ``python -m tests.agents.path_agent``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from spoa.server import Limits, SpopServer
from spoa.spop import Notify, Scope, SetVar, encode_actions


def decide(event: Notify) -> bytes:
    path = ""
    for message in event.messages:
        if message.name == "route":
            value = message.args.get("path")
            path = value if isinstance(value, str) else ""
    parts = path.split("/")
    backend = parts[2] if len(parts) > 2 and parts[1] == "to" and parts[2] else "generic"
    return encode_actions(
        (
            SetVar(Scope.TXN, "backend", backend),
            SetVar(Scope.TXN, "rule", "path-agent"),
            SetVar(Scope.TXN, "policy", "test"),
        )
    )


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")

    if args.delay_ms > 0:
        delay = args.delay_ms / 1000.0

        async def handler(event: Notify) -> bytes:
            await asyncio.sleep(delay)
            return decide(event)

        server = SpopServer(handler, Limits(drain_timeout=30))
    else:
        server = SpopServer(decide)
    await server.start([args.listen])
    logging.getLogger("spoa").info("listening for SPOP on %s", " ".join(server.addresses))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.drain()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
