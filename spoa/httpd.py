"""A small asyncio HTTP/1.1 server: enough for /metrics, a status page and demo workers.

Keep-alive, Content-Length and chunked request bodies, bounded header and
body sizes, one handler per request. Not a general web server: nothing here
faces the Internet.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

MAX_HEADER: Final = 65536
MAX_BODY: Final = 16 * 1024 * 1024

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    #: The address the request came in on, HOST:PORT (what a proxy in front
    #: logs as the server's address).
    local: str = ""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse] | HttpResponse]


async def read_request(reader: asyncio.StreamReader, local: str = "") -> HttpRequest | None:
    """The next request on a connection (its body read and dropped), or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise ValueError("connection closed inside a request head") from None
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError(f"bad request line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    await _skip_body(reader, headers)
    return HttpRequest(parts[0], parts[1], parts[2], headers, local)


async def _skip_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size > MAX_BODY:
                raise ValueError("chunk too big")
            await reader.readexactly(size + 2)
            if size == 0:
                return
    length = int(headers.get("content-length") or 0)
    if not 0 <= length <= MAX_BODY:
        raise ValueError("bad content-length")
    if length:
        await reader.readexactly(length)


def encode_response(response: HttpResponse, keep_alive: bool) -> bytes:
    reason = _REASONS.get(response.status, "OK")
    head = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    head += [f"{name}: {value}" for name, value in response.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body


def _address(sockname: object) -> str:
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        host = str(sockname[0])
        return f"[{host}]:{sockname[1]}" if ":" in host else f"{host}:{sockname[1]}"
    return ""


class HttpServer:
    """Serves one handler on one address; tracks connections to close them on stop."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self, host: str, port: int) -> HttpServer:
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=MAX_HEADER, backlog=1024, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and drop open connections (as a killed process would)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._connections.values():
            writer.transport.abort()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        local = _address(writer.get_extra_info("sockname"))
        try:
            while (request := await read_request(reader, local)) is not None:
                result = self.handler(request)
                response = result if isinstance(result, HttpResponse) else await result
                keep_alive = (
                    request.headers.get("connection", "").lower() != "close"
                    and request.version == "HTTP/1.1"
                )
                writer.write(encode_response(response, keep_alive))
                await writer.drain()
                if not keep_alive:
                    break
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            ValueError,
        ):
            with contextlib.suppress(ConnectionError):
                writer.write(encode_response(HttpResponse(400, b"bad request\n"), False))
        finally:
            self._connections.pop(task, None)
            writer.close()
