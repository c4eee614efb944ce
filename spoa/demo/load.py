"""A bounded, paced HTTP load of Matrix requests, recording each request's latency.

Keep-alive connections on loopback, requests from spoa.traffic spread evenly
over time at a fixed rate; every response's status, latency and the worker
that served it (X-Served-By) are recorded with the time it was sent. Bounded
in time and count: it stops by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..traffic import TrafficRequest


@dataclass(frozen=True, slots=True)
class Sample:
    sent: float  # time.monotonic() when the request was written
    latency_ms: float  # from written to answered
    status: int  # 0: no answer
    worker: str
    request: TrafficRequest


@dataclass
class Load:
    port: int
    requests: Sequence[TrafficRequest]
    rate: float = 1000.0
    #: Enough that requests waiting out a stalled agent (100 ms each) do
    #: not queue behind one another in this generator.
    connections: int = 160
    samples: list[Sample] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, seconds: float) -> list[Sample]:
        """Send at ``rate`` for ``seconds`` (then wait for answers, at most 10 s)."""
        queue: asyncio.Queue[tuple[float, TrafficRequest] | None] = asyncio.Queue()
        workers = [asyncio.create_task(self._connection(queue)) for _ in range(self.connections)]
        start = time.monotonic()
        total = int(seconds * self.rate)
        for n in range(total):
            due = start + n / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((time.monotonic(), self.requests[n % len(self.requests)]))
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.wait(workers, timeout=10)
        for task in workers:
            task.cancel()
        return self.samples

    async def _connection(self, queue: asyncio.Queue[tuple[float, TrafficRequest] | None]) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while True:
            item = await queue.get()
            if item is None:
                break
            queued, request = item
            try:
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                sent = time.monotonic()
                writer.write(_wire(request))
                status, worker = await asyncio.wait_for(_response(reader), 10)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                self.samples.append(Sample(queued, -1.0, 0, "", request))
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            self.samples.append(
                Sample(sent, (time.monotonic() - sent) * 1000, status, worker, request)
            )
        if writer is not None:
            writer.close()


def _wire(request: TrafficRequest) -> bytes:
    body = b"{}" if request.method in ("PUT", "POST") else b""
    head = [f"{request.method} {request.target} HTTP/1.1", "Host: localhost"]
    head += [f"{k}: {v}" for k, v in request.headers.items()]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + body


async def _response(reader: asyncio.StreamReader) -> tuple[int, str]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if length:
        await reader.readexactly(length)
    return status, headers.get("x-served-by", "")


def over(samples: Sequence[Sample], threshold_ms: float, since: float, until: float) -> int:
    """Requests sent in [since, until) that took longer than ``threshold_ms`` or failed."""
    return sum(
        1
        for s in samples
        if since <= s.sent < until and (s.status == 0 or s.latency_ms > threshold_ms)
    )
