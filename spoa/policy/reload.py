"""Hot reload: watch a policy file by content, swap in a new policy atomically.

A reload reads the file (following symlinks, so the symlink swap of a
Kubernetes ConfigMap update is seen like an edit in place or an atomic
rename), compiles it, and only on success replaces the one reference the
agent reads. A broken edit keeps the running policy and reports every
problem with its place. Each content is tried once: a broken file is not
re-reported every poll, and fixing it is picked up at the next poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .compiled import CompiledPolicy, compile_policy, policy_version
from .errors import LocatedError, PolicyError

log = logging.getLogger("spoa.policy")


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What one reload attempt did: ``loaded``, ``unchanged`` or ``failed``."""

    outcome: str
    version: str
    errors: tuple[str, ...] = ()


class PolicyHolder:
    """Owns the running policy of one file and its reload history.

    ``current`` is replaced in one assignment; readers take it once per
    decision, so every request is decided by exactly one policy version.
    """

    def __init__(
        self, path: str, on_change: Callable[[PolicyHolder, ReloadResult], None] | None = None
    ) -> None:
        self.path = path
        self._on_change = on_change
        self.current: CompiledPolicy = self._initial()
        self.loaded_at = time.time()
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload_ok = True
        self.last_error: str | None = None
        self._last_seen = self.current.version
        log.info(
            "policy loaded: %s version %s, %d rules, %d classes",
            path,
            self.current.version,
            len(self.current.rules),
            len(self.current.classes),
        )

    def _initial(self) -> CompiledPolicy:
        content = self._read()
        return compile_policy(content, self.path)

    def _read(self) -> bytes:
        try:
            with open(self.path, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise PolicyError(
                [LocatedError(self.path, 1, "$", f"cannot read: {exc.strerror or exc}")]
            ) from None

    def reload(self, force: bool = False) -> ReloadResult:
        """Re-read the file; swap in its policy if it changed and is valid.

        Without ``force`` a content already tried (loaded or rejected) is
        skipped; SIGHUP forces a fresh attempt.
        """
        try:
            content = self._read()
        except PolicyError as exc:
            return self._failed(tuple(str(e) for e in exc.errors), "unreadable", force)
        version = policy_version(content)
        if version == self.current.version:
            self._last_seen = version
            if force:
                log.info("policy %s unchanged (version %s)", self.path, version)
            return ReloadResult("unchanged", version)
        if version == self._last_seen and not force:
            return ReloadResult("unchanged", self.current.version)
        self._last_seen = version
        try:
            policy = compile_policy(content, self.path)
        except PolicyError as exc:
            return self._failed(tuple(str(e) for e in exc.errors), version, True)
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

    def _failed(self, errors: tuple[str, ...], seen: str, report: bool) -> ReloadResult:
        if not report and seen == self._last_seen:
            return ReloadResult("unchanged", self.current.version)
        self._last_seen = seen
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
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload()
            except Exception:  # never let the watcher die
                log.exception("policy reload crashed; the running policy stays")
