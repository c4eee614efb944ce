"""The fallback's map, kept live in HAProxy through its runtime API.

HAProxy reads the map file when it starts; after that, a policy the agent
loads reaches the running HAProxy through the runtime API (the stats
socket, ``level admin``), atomically: ``prepare map`` makes a new, empty
version, ``add map @<version>`` fills it (as payloads of whole lines, in
the policy's order), ``commit map @<version>`` swaps it in at once. Until
the commit HAProxy routes by the previous version; a push cut short leaves
a version that is never committed.

:class:`MapKeeper` pushes every policy it is given, retries while HAProxy
cannot be reached, and checks every so often (and after a push) that the
running map is the policy's: an HAProxy restarted since, or a map changed by
hand, shows as out of step and is pushed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

log = logging.getLogger("spoa.haproxyapi")

#: How long one command may take, connection included.
COMMAND_TIMEOUT: Final = 5.0
#: The most bytes of map lines one ``add map`` payload carries (HAProxy holds
#: a payload in one buffer, 16 KiB by default).
PAYLOAD_BYTES: Final = 8192
_VERSION: Final = re.compile(r"New version created: (\d+)")
_MAP_LINE: Final = re.compile(r"^(\d+) \((.*?)\) ", re.MULTILINE)


class RuntimeApiError(Exception):
    """HAProxy could not be reached, or refused a command (its answer is the message)."""


def parse_address(text: str) -> tuple[str, int] | str:
    """``unix:PATH`` or ``/PATH`` (a Unix socket), or ``HOST:PORT``."""
    if text.startswith("unix:"):
        return text[5:]
    if text.startswith("/"):
        return text
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"{text!r}: expected unix:PATH, /PATH or HOST:PORT")
    return host.strip("[]"), int(port)


class RuntimeApi:
    """One HAProxy's runtime API: one connection per command, as HAProxy's
    non-interactive mode answers one command and closes."""

    def __init__(self, address: tuple[str, int] | str) -> None:
        self.address = address

    async def command(self, line: str, payload: str | None = None) -> str:
        """HAProxy's answer to ``line`` (with a ``<<`` payload of whole lines, if given)."""
        text = line + "\n"
        if payload is not None:
            text = f"{line} <<\n{payload.rstrip(chr(10))}\n\n"
        try:
            return await asyncio.wait_for(self._exchange(text.encode()), COMMAND_TIMEOUT)
        except (TimeoutError, OSError, UnicodeDecodeError) as exc:
            raise RuntimeApiError(f"{self.describe()}: {exc!r}") from None

    async def _exchange(self, data: bytes) -> str:
        if isinstance(self.address, str):
            reader, writer = await asyncio.open_unix_connection(self.address)
        else:
            reader, writer = await asyncio.open_connection(*self.address)
        try:
            writer.write(data)
            await writer.drain()
            return (await reader.read()).decode()
        finally:
            writer.close()

    def describe(self) -> str:
        if isinstance(self.address, str):
            return f"HAProxy's runtime API at {self.address}"
        return f"HAProxy's runtime API at {self.address[0]}:{self.address[1]}"

    async def replace_map(self, name: str, entries: Sequence[tuple[str, str]]) -> int:
        """Replace map ``name`` (its file name as haproxy.cfg gives it) with ``entries``,
        atomically; the version committed."""
        answer = await self.command(f"prepare map {name}")
        found = _VERSION.search(answer)
        if found is None:
            raise RuntimeApiError(f"prepare map {name}: {answer.strip() or 'no answer'}")
        version = int(found.group(1))
        chunk: list[str] = []
        size = 0
        for regex, value in entries:
            line = f"{regex} {value}"
            if chunk and size + len(line) + 1 > PAYLOAD_BYTES:
                await self._add(name, version, chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line) + 1
        if chunk:
            await self._add(name, version, chunk)
        answer = await self.command(f"commit map @{version} {name}")
        if answer.strip():
            raise RuntimeApiError(f"commit map @{version} {name}: {answer.strip()}")
        return version

    async def _add(self, name: str, version: int, lines: list[str]) -> None:
        answer = await self.command(f"add map @{version} {name}", "\n".join(lines))
        if answer.strip():
            raise RuntimeApiError(f"add map @{version} {name}: {answer.strip()}")

    async def find_map(self, path: str) -> str:
        """The name HAProxy knows the map file ``path`` by: the same file, maybe by
        another path (a volume mounted elsewhere in another container)."""
        answer = await self.command("show map")
        wanted = os.path.realpath(path)
        files: list[str] = [file for _, file in _MAP_LINE.findall(answer)]
        for file in files:
            if file == path or os.path.realpath(file) == wanted:
                return file
        listed = ", ".join(files) or "none"
        raise RuntimeApiError(f"no map of file {path} in HAProxy (its maps: {listed})")

    async def show_map(self, name: str) -> list[tuple[str, str]]:
        """The entries of map ``name`` as HAProxy runs it, in order."""
        answer = await self.command(f"show map {name}")
        entries = []
        for line in answer.splitlines():
            if not line:
                continue
            pointer, _, rest = line.partition(" ")
            regex, _, value = rest.partition(" ")
            if not pointer.startswith("0x") or not regex:
                raise RuntimeApiError(f"show map {name}: {answer.strip()[:200]}")
            entries.append((regex, value))
        return entries


@dataclass
class MapStats:
    """What the agent knows of the running map (metrics, status page)."""

    pushes: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})
    #: Whether the running map is the current policy's: None until first seen.
    in_sync: bool | None = None
    last_error: str = ""


class MapKeeper:
    """Keeps one HAProxy's map ``name`` equal to the entries of the policy last given."""

    def __init__(
        self,
        api: RuntimeApi,
        path: str,
        stats: MapStats | None = None,
        check_interval: float = 10.0,
        retry_interval: float = 2.0,
    ) -> None:
        self.api = api
        #: The map file, as the agent writes it.
        self.path = path
        #: The map's name in HAProxy, once found (the same file, maybe by another path).
        self.name: str | None = None
        self.stats = stats if stats is not None else MapStats()
        self.check_interval = check_interval
        self.retry_interval = retry_interval
        self._wanted: list[tuple[str, str]] | None = None
        self._version = ""
        self._changed = asyncio.Event()

    def want(self, entries: Sequence[tuple[str, str]], version: str) -> None:
        """The entries HAProxy's map must hold from now on (policy ``version``)."""
        self._wanted = list(entries)
        self._version = version
        self._changed.set()

    async def run(self) -> None:
        """Push and check until cancelled."""
        while True:
            self._changed.clear()
            wait = self.check_interval
            wanted, version = self._wanted, self._version
            if (
                wanted is not None
                and not await self._in_step(wanted)
                and not await self._push(wanted, version)
            ):
                wait = self.retry_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)

    async def _in_step(self, wanted: list[tuple[str, str]]) -> bool:
        try:
            if self.name is None:
                self.name = await self.api.find_map(self.path)
            running = await self.api.show_map(self.name)
        except RuntimeApiError as exc:
            self.name = None
            self._failed(str(exc))
            return False
        self.stats.in_sync = running == wanted
        return self.stats.in_sync

    async def _push(self, wanted: list[tuple[str, str]], version: str) -> bool:
        if self.name is None:
            return False  # HAProxy not reached yet: _in_step said why
        try:
            await self.api.replace_map(self.name, wanted)
            running = await self.api.show_map(self.name)
        except RuntimeApiError as exc:
            self.stats.pushes["failure"] += 1
            # Found again next time: a restarted HAProxy may name it otherwise.
            self.name = None
            self._failed(str(exc))
            return False
        self.stats.in_sync = running == wanted
        if not self.stats.in_sync:
            self.stats.pushes["failure"] += 1
            self._failed(f"map {self.name} differs from policy {version} right after a push")
            return False
        self.stats.pushes["success"] += 1
        if self.stats.last_error:
            log.info("%s reachable again", self.api.describe())
        self.stats.last_error = ""
        log.info("fallback map %s in HAProxy now policy version %s", self.name, version)
        return True

    def _failed(self, reason: str) -> None:
        # Not seen in step is out of step, for whoever watches the metric.
        self.stats.in_sync = False
        if reason != self.stats.last_error:
            log.warning("fallback map %s not in step with HAProxy: %s", self.path, reason)
        self.stats.last_error = reason
