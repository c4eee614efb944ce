"""A HAProxy-like SPOP peer for tests: real sockets, frames from spoa.spop.peer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from spoa.server import Handler, Limits, SpopServer
from spoa.spop import Action, FrameType, Value, decode_kv_list
from spoa.spop.testing import Frame, decode_actions, haproxy_hello, split_frames


class Peer:
    """One connection to an agent, speaking HAProxy's side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._buf = b""
        self._frames: list[Frame] = []

    @classmethod
    async def connect(cls, address: str) -> Peer:
        if address.startswith("unix:"):
            reader, writer = await asyncio.open_unix_connection(address[5:])
        else:
            host, _, port = address.rpartition(":")
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frames(self, count: int, timeout: float = 5.0) -> list[Frame]:
        """Read until ``count`` whole frames have arrived; keep any beyond."""
        async with asyncio.timeout(timeout):
            while len(self._frames) < count:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError(f"closed after {len(self._frames)} of {count} frames")
                frames, self._buf = split_frames(self._buf + data)
                self._frames.extend(frames)
        got, self._frames = self._frames[:count], self._frames[count:]
        return got

    async def frame(self, timeout: float = 5.0) -> Frame:
        (frame,) = await self.frames(1, timeout)
        return frame

    async def hello(self, **options: object) -> dict[str, Value]:
        await self.send(haproxy_hello(**options))  # type: ignore[arg-type]
        frame = await self.frame()
        assert frame.type == FrameType.AGENT_HELLO, frame
        return kv(frame)

    async def eof(self, timeout: float = 5.0) -> bool:
        """Whether the agent closes the connection (after any pending bytes)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        return True
                    self._buf += data
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        self.writer.close()


def kv(frame: Frame) -> dict[str, Value]:
    return dict(decode_kv_list(frame.payload, 0, len(frame.payload)))


def actions(frame: Frame) -> list[Action]:
    return decode_actions(frame.payload, 0, len(frame.payload))


@asynccontextmanager
async def running_server(
    handler: Handler, limits: Limits | None = None, listen: Sequence[str] = ("127.0.0.1:0",)
) -> AsyncIterator[SpopServer]:
    server = SpopServer(handler, limits)
    await server.start(listen)
    try:
        yield server
    finally:
        await server.close()
