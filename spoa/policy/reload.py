"""Hot reload: watch a policy file by content, swap in a new policy atomically.

A reload reads the file (following symlinks, so the symlink swap of a
Kubernetes ConfigMap update is seen like an edit in place or an atomic
rename), compiles it, and only on success replaces the one reference the
agent reads. A broken edit keeps the running policy and reports every
problem with its place. Each content is tried once: a broken file is not
re-reported every poll, and fixing it is picked up at the next poll.

The files watched are the policy and every base it extends: each poll reads
them and compares their bytes with those of the last attempt, so an edit of
a base (or a new bundled policy after an upgrade) reloads the policies built
on it too.

A file written in place may be caught half-written, and many prefixes of a
policy are valid policies. So a file whose content changed but which is
still the same file (same device and inode) is only tried once the watcher
has seen the same bytes for ``settle`` seconds and the file's mtime is as
old: the mtime alone is not enough, as a truncation was seen to leave it
unchanged (an empty file with the old mtime, on ext4). The bytes tried are
the bytes that settled, not a fresh read. A file that was replaced (an
atomic rename, a ConfigMap's symlink swap) is complete by construction and
is tried at once. SIGHUP tries at once whatever the file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from .compiled import CompiledPolicy
from .errors import PolicyError
from .loader import FileSnapshot, load_policy, snapshot

log = logging.getLogger("spoa.policy")


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What one reload attempt did: ``loaded``, ``unchanged``, ``settling`` or ``failed``."""

    outcome: str
    version: str
    errors: tuple[str, ...] = ()


class PolicyHolder:
    """Owns the running policy of one file and its reload history.

    ``current`` is replaced in one assignment; readers take it once per
    decision, so every request is decided by exactly one policy version.
    """

    def __init__(
        self,
        path: str,
        on_change: Callable[[PolicyHolder, ReloadResult], None] | None = None,
        settle: float = 1.0,
    ) -> None:
        """``settle``: seconds a file edited in place must rest before it is tried."""
        self.path = path
        self._on_change = on_change
        self.settle = settle
        self._files: FileSnapshot = {}
        #: Changed bytes of a file edited in place, and when the watcher first saw them.
        self._seen: dict[str, tuple[bytes | None, float]] = {}
        self.current: CompiledPolicy = load_policy(path, self._files)
        self._identities = _identities(self._files)
        self.loaded_at = time.time()
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload_ok = True
        self.last_error: str | None = None
        log.info(
            "policy loaded: %s version %s, %d rules, %d classes",
            path,
            self.current.version,
            len(self.current.rules),
            len(self.current.classes),
        )

    @property
    def files(self) -> list[str]:
        """The files the running policy (or the last attempt) was read from."""
        return list(self._files)

    def reload(self, force: bool = False) -> ReloadResult:
        """Re-read the files; swap in the policy if it changed and is valid.

        Without ``force`` files whose bytes were already tried (loaded or
        rejected) are skipped; SIGHUP forces a fresh attempt.
        """
        content: bytes | None = None
        if not force:
            now = snapshot([self.path, *self._files])
            if now == self._files:
                return ReloadResult("unchanged", self.current.version)
            waiting = self._settling(now)
            if waiting:
                log.debug("policy file %s changed in place; waiting for it to settle", waiting)
                return ReloadResult("settling", self.current.version)
            content = now.get(self.path)
        files: FileSnapshot = {}
        try:
            # The bytes that settled; read afresh when forced or unreadable.
            policy = load_policy(self.path, files, content=content)
        except PolicyError as exc:
            self._remember(files)
            return self._failed(tuple(str(e) for e in exc.errors))
        self._remember(files)
        if policy.version == self.current.version:
            if force:
                log.info("policy %s unchanged (version %s)", self.path, policy.version)
            return ReloadResult("unchanged", policy.version)
        previous = self.current.version
        self.current = policy
        self.loaded_at = time.time()
        self.reloads_ok += 1
        self.last_reload_ok = True
        self.last_error = None
        log.info(
            "policy reloaded: %s version %s (was %s), %d rules",
            self.path,
            policy.version,
            previous,
            len(policy.rules),
        )
        result = ReloadResult("loaded", policy.version)
        if self._on_change:
            self._on_change(self, result)
        return result

    def _remember(self, files: FileSnapshot) -> None:
        self._files = files
        self._identities = _identities(files)
        self._seen.clear()

    def _settling(self, now: FileSnapshot) -> str | None:
        """A file edited in place whose new bytes have not settled yet, if any."""
        waiting = None
        clock = time.monotonic()
        for path, content in now.items():
            if content == self._files.get(path) or self.settle <= 0:
                continue
            try:
                status = os.stat(path)
            except OSError:
                continue
            if self._identities.get(path) != (status.st_dev, status.st_ino):
                continue  # replaced, not edited: complete
            seen = self._seen.get(path)
            if seen is None or seen[0] != content:
                self._seen[path] = seen = (content, clock)
            if clock - seen[1] < self.settle or time.time() - status.st_mtime < self.settle:
                waiting = waiting or path
        return waiting

    def _failed(self, errors: tuple[str, ...]) -> ReloadResult:
        self.reloads_failed += 1
        self.last_reload_ok = False
        self.last_error = "\n".join(errors)
        log.error(
            "policy rejected, keeping version %s:\n  %s",
            self.current.version,
            "\n  ".join(errors),
        )
        result = ReloadResult("failed", self.current.version, errors)
        if self._on_change:
            self._on_change(self, result)
        return result

    async def watch(self, interval: float) -> None:
        """Poll the file every ``interval`` seconds until cancelled."""
        await poll(self.reload, interval, "policy reload crashed; the running policy stays")


async def poll(reload: Callable[[], object], interval: float, crashed: str) -> None:
    """Call ``reload`` every ``interval`` seconds until cancelled; an exception is logged
    (``crashed``) and the next call made as usual."""
    while True:
        await asyncio.sleep(interval)
        try:
            reload()
        except Exception:  # never let the watcher die
            log.exception(crashed)


def _identities(files: FileSnapshot) -> dict[str, tuple[int, int]]:
    """(device, inode) of each file, following symlinks, as a ConfigMap swap changes it."""
    found = {}
    for path in files:
        try:
            status = os.stat(path)
        except OSError:
            continue
        found[path] = (status.st_dev, status.st_ino)
    return found
