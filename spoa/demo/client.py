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


class Client:
    """Requests one after another on one keep-alive connection, opened again when closed.

    A request on a connection starts only once HAProxy has finished the one
    before: nothing of this client is still in flight on a server when the
    next request is balanced (bounded-load hashing counts what is).
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        source: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.port, self.host, self.source, self.timeout = port, host, source, timeout
        self._conn: http.client.HTTPConnection | None = None

    def send(self, request: TrafficRequest) -> Outcome:
        """One request; the worker is what the demo worker says it is."""
        if self._conn is None:
            self._conn = http.client.HTTPConnection(
                self.host,
                self.port,
                timeout=self.timeout,
                source_address=(self.source, 0) if self.source else None,
            )
        try:
            body = b"{}" if request.method in ("PUT", "POST") else None
            self._conn.request(request.method, request.target, body=body, headers=request.headers)
            response = self._conn.getresponse()
            text = response.read()
            if response.will_close:
                self.close()
        except (OSError, http.client.HTTPException):
            self.close()
            return Outcome(request, 0, "", "")
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

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def send(
    port: int,
    request: TrafficRequest,
    host: str = "127.0.0.1",
    source: str | None = None,
    timeout: float = 10.0,
) -> Outcome:
    """One request on a connection of its own."""
    client = Client(port, host, source, timeout)
    try:
        return client.send(request)
    finally:
        client.close()


def send_all(
    port: int, requests: Iterable[TrafficRequest], concurrency: int = 16, host: str = "127.0.0.1"
) -> Sequence[Outcome]:
    """Send many requests at once; outcomes come back in request order."""
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda r: send(port, r, host), requests))
