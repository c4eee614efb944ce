"""Send traffic through HAProxy and record which worker answered each request."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..traffic import TrafficRequest


@dataclass(frozen=True, slots=True)
class Outcome:
    request: TrafficRequest
    status: int
    worker: str
    worker_class: str
    #: The worker's address as it answered (HAProxy logs the same as srv=).
    address: str = ""


def send(
    port: int,
    request: TrafficRequest,
    host: str = "127.0.0.1",
    source: str | None = None,
    timeout: float = 10.0,
) -> Outcome:
    """One request; the worker is what the demo worker says it is."""
    conn = http.client.HTTPConnection(
        host, port, timeout=timeout, source_address=(source, 0) if source else None
    )
    try:
        body = b"{}" if request.method in ("PUT", "POST") else None
        conn.request(request.method, request.target, body=body, headers=request.headers)
        response = conn.getresponse()
        text = response.read()
        worker = response.getheader("X-Served-By", "")
        worker_class = ""
        if response.getheader("Content-Type", "").startswith("application/json"):
            try:
                document = json.loads(text)
                worker_class = str(document.get("class", ""))
            except ValueError:
                pass
        if not worker_class and worker:
            worker_class = worker.rsplit("-", 1)[0]
        address = response.getheader("X-Served-Address", "")
        return Outcome(request, response.status, worker, worker_class, address)
    except (OSError, http.client.HTTPException):
        return Outcome(request, 0, "", "")
    finally:
        conn.close()


def send_all(
    port: int, requests: Iterable[TrafficRequest], concurrency: int = 16, host: str = "127.0.0.1"
) -> Sequence[Outcome]:
    """Send many requests at once; outcomes come back in request order."""
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda r: send(port, r, host), requests))
