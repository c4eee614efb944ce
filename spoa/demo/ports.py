"""Loopback ports for the demo's parts, the tests and the benchmarks."""

from __future__ import annotations

import random
import socket
from typing import Final

_HANDED_OUT: set[int] = set()

#: Ports handed out come from below the kernel's ephemeral range (32768 and
#: up by default): a port taken from that range can be given again, before
#: it is bound, to any outgoing connection or bind(0) on the machine
#: (HAProxy's health checks, the demo workers), and the bind then fails.
_PORTS: Final = range(20000, 32000)
_RANDOM = random.Random()


def free_port() -> int:
    """A loopback port free now, outside the ephemeral range, not handed out before.

    A caller that takes several ports before starting anything must not get
    one twice.
    """
    while True:
        port = _RANDOM.choice(_PORTS)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
