"""A candidate policy decided beside the running one (spoa serve --shadow).

After the agent has answered HAProxy, every request (or one in ``every``) is
decided again with the candidate, and the two decisions are counted:
requests by (class, shadow class), and, where the class is the same, the
requests whose key would change. Routing never depends on it: the candidate
is watched and reloaded like the policy, a broken one is reported (log,
metric, status page) and the last good one, or none, is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .policy import CompiledPolicy, Decision, PolicyError, Request
from .policy.compiled import Users
from .policy.reload import PolicyHolder, poll

log = logging.getLogger(__name__)


@dataclass
class ShadowStats:
    #: (class, shadow class) -> requests decided by both.
    classes: dict[tuple[str, str], int] = field(default_factory=dict)
    #: class -> requests of that class (in both) whose key would change.
    changed_keys: dict[str, int] = field(default_factory=dict)
    #: (rule, shadow rule) -> requests, where the rule would change.
    rules: dict[tuple[str, str], int] = field(default_factory=dict)
    decided: int = 0
    #: Requests left out by the sample.
    skipped: int = 0

    def differing(self) -> int:
        moved = sum(n for (a, b), n in self.classes.items() if a != b)
        return moved + sum(self.changed_keys.values())


class Shadow:
    """The candidate policy of ``path``, deciding one request in ``every``."""

    def __init__(self, path: str, every: int = 1, settle: float = 1.0) -> None:
        if every < 1:
            raise ValueError("the shadow sample must be one request in 1 or more")
        self.path = path
        self.every = every
        self.settle = settle
        self.stats = ShadowStats()
        self.holder: PolicyHolder | None = None
        #: Why the candidate is not (or no longer) the file's content, if it is not.
        self.error: str | None = None
        self._tick = 0
        self._try_load()

    def _try_load(self) -> None:
        try:
            self.holder = PolicyHolder(self.path, settle=self.settle)
        except PolicyError as exc:
            self.error = "\n".join(str(e) for e in exc.errors)
            log.error(
                "shadow policy %s is not usable, ignored until fixed:\n  %s",
                self.path,
                self.error.replace("\n", "\n  "),
            )
            return
        self.error = None
        log.info("shadow policy %s version %s", self.path, self.holder.current.version)

    @property
    def policy(self) -> CompiledPolicy | None:
        return self.holder.current if self.holder is not None else None

    def reload(self) -> None:
        if self.holder is None:
            self._try_load()
            return
        result = self.holder.reload()
        if result.outcome == "failed":
            self.error = "\n".join(result.errors)
        elif result.outcome == "loaded":
            self.error = None
            self.stats = ShadowStats()  # counts of another candidate would mislead

    async def watch(self, interval: float) -> None:
        await poll(self.reload, interval, "shadow policy reload crashed; the candidate stays")

    def wants(self) -> bool:
        if self.holder is None:
            return False
        self._tick = tick = (self._tick + 1) % self.every
        if tick:
            self.stats.skipped += 1
            return False
        return True

    def observe(
        self, request: Request, decision: Decision, policy: CompiledPolicy, users: Users | None
    ) -> None:
        """Count where the candidate would send what the running ``policy`` decided."""
        candidate = self.policy
        if candidate is None:
            return
        # The running policy's whoami answers serve the candidate only if it asks alike.
        shadow = candidate.decide(request, users if candidate.whoami == policy.whoami else None)
        stats = self.stats
        stats.decided += 1
        pair = (decision.worker_class, shadow.worker_class)
        stats.classes[pair] = stats.classes.get(pair, 0) + 1
        if decision.rule != shadow.rule:
            rules = (decision.rule, shadow.rule)
            stats.rules[rules] = stats.rules.get(rules, 0) + 1
        if pair[0] == pair[1] and decision.key != shadow.key:
            stats.changed_keys[pair[0]] = stats.changed_keys.get(pair[0], 0) + 1
