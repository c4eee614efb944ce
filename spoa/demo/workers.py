"""Demo workers: HTTP servers standing in for Synapse's main process and workers.

Each worker answers ``GET /health`` with ``OK`` (what HAProxy's checks ask),
``/_matrix/client/versions`` like Synapse does, ``/account/whoami`` for the
tokens of :mod:`spoa.traffic` (``syt_`` and opaque ``mat_`` ones alike; 401
``M_UNKNOWN_TOKEN`` for any other), and every other request with a JSON
document saying which worker it is, so a client (or a test) sees where
HAProxy sent it. One process can host many workers, each on its own address.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from ..httpd import HttpRequest, HttpResponse, HttpServer
from ..traffic import demo_token_user

SERVER_NAME = "example.org"
_WHOAMI = re.compile(r"^/_matrix/client/(r0|v3|unstable)/account/whoami$")

_VERSIONS = [
    "r0.6.1",
    "v1.1",
    "v1.2",
    "v1.3",
    "v1.4",
    "v1.5",
    "v1.6",
    "v1.7",
    "v1.8",
    "v1.9",
    "v1.10",
    "v1.11",
    "v1.12",
]


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """``name`` is ``<class>-<n>`` or any label; ``address`` is HOST:PORT (port 0: any)."""

    name: str
    worker_class: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        """``NAME=HOST:PORT``; the class is NAME up to its last ``-``.

        ``{hostname}`` in NAME becomes this machine's host name, so replicas
        of one container image (compose ``deploy.replicas``) name themselves.
        """
        name, sep, address = text.partition("=")
        name = name.replace("{hostname}", socket.gethostname().replace("-", ""))
        host, colon, port = address.rpartition(":")
        if not sep or not colon or not port.isdigit() or not name:
            raise ValueError(f"worker {text!r}: expected NAME=HOST:PORT")
        worker_class = name.rsplit("-", 1)[0] if "-" in name else name
        return cls(name, worker_class, host.strip("[]") or "127.0.0.1", int(port))


class DemoWorker:
    """One worker: an HTTP/1.1 server with keep-alive."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.requests = 0
        self.whoami_requests = 0
        self.port = spec.port
        self._http = HttpServer(self._answer)

    async def start(self) -> DemoWorker:
        await self._http.start(self.spec.host, self.spec.port)
        self.port = self._http.port
        return self

    async def stop(self) -> None:
        """Stop listening and close open connections, as a killed worker would."""
        await self._http.stop()

    def _answer(self, request: HttpRequest) -> HttpResponse:
        self.requests += 1
        # The name, and the address HAProxy logs as srv= (the slot names of
        # server-template, w1, w2, ..., say nothing about which worker it is).
        served_by = {"X-Served-By": self.spec.name, "X-Served-Address": request.local}
        path = request.path
        if path == "/health":
            return HttpResponse(200, b"OK", headers=served_by)
        if _WHOAMI.match(path):
            self.whoami_requests += 1
            return self._whoami(request, served_by)
        if path == "/_matrix/client/versions":
            document: dict[str, object] = {
                "versions": _VERSIONS,
                "unstable_features": {},
                "served_by": self.spec.name,
            }
        else:
            document = {
                "worker": self.spec.name,
                "address": request.local,
                "class": self.spec.worker_class,
                "method": request.method,
                "path": path,
                # What Synapse reads with x_forwarded: true.
                "forwarded_proto": request.headers.get("x-forwarded-proto", ""),
            }
        return HttpResponse(200, json.dumps(document).encode(), "application/json", served_by)

    def _whoami(self, request: HttpRequest, served_by: dict[str, str]) -> HttpResponse:
        auth = request.headers.get("authorization", "")
        user = demo_token_user(auth[7:].strip()) if auth[:7].lower() == "bearer " else None
        if user is None:
            error = {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown access token"}
            return HttpResponse(401, json.dumps(error).encode(), "application/json", served_by)
        document = {"user_id": f"@{user}:{SERVER_NAME}", "device_id": "DEMO", "is_guest": False}
        return HttpResponse(200, json.dumps(document).encode(), "application/json", served_by)


async def start_workers(specs: Sequence[WorkerSpec]) -> list[DemoWorker]:
    return [await DemoWorker(spec).start() for spec in specs]
