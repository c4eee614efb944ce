"""The SPOE contract: the ``route`` message in, ``txn.route.*`` variables out.

Message ``route`` arguments (by name): ``method``, ``path`` (raw, no query),
``query``, ``auth`` (the whole Authorization header), ``src``.

Variables set, scope ``txn`` (HAProxy prefixes them with the var-prefix,
``route``): ``backend`` (the worker class), ``key`` (the key's hash, an
unsigned 32-bit integer, as the fallback computes it too; absent when the
rule has no key), ``rule`` and ``policy`` (the version). The raw
token or any other key source never leaves the agent.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections.abc import Coroutine
from ipaddress import IPv4Address, IPv6Address
from time import perf_counter_ns
from typing import Any, Final

from .matrix import access_token
from .memo import Memo
from .policy import DEFAULT_RULE, ERROR_RULE, CompiledPolicy, Decision, Request
from .policy.reload import PolicyHolder
from .record import Recorder
from .shadow import Shadow
from .spop import Message, Notify, Scope, SetVar, UInt32, encode_action, encode_actions
from .spop.codec import encode_varint
from .stats import LATENCY_BOUNDS_NS, LATENCY_SAMPLE, DecisionStats
from .whoami import WhoamiResolver, WhoamiStats

#: Requests sampled for the recorder and the shadow, at most, between two turns
#: of the event loop; more are dropped (counted) rather than held.
OBSERVE_BATCH: Final = 10_000

log = logging.getLogger("spoa.routing")

MESSAGE: Final = "route"
ARG_METHOD: Final = "method"
ARG_PATH: Final = "path"
ARG_QUERY: Final = "query"
ARG_AUTH: Final = "auth"
ARG_SRC: Final = "src"
VAR_BACKEND: Final = "backend"
VAR_KEY: Final = "key"
VAR_RULE: Final = "rule"
VAR_POLICY: Final = "policy"
#: What ``spoa serve --static-class`` gives as rule and policy.
STATIC: Final = "static"


def route_message(
    method: str,
    path: str,
    query: str | None = None,
    auth: str | None = None,
    src: IPv4Address | IPv6Address | None = None,
) -> Message:
    """The ``route`` message as HAProxy sends it (``spoe-router.conf``)."""
    return Message(
        MESSAGE,
        {ARG_METHOD: method, ARG_PATH: path, ARG_QUERY: query, ARG_AUTH: auth, ARG_SRC: src},
    )


def static_actions(worker_class: str) -> tuple[SetVar, ...]:
    """The answer to every request of an agent that sends all to one class."""
    return (
        SetVar(Scope.TXN, VAR_BACKEND, worker_class),
        SetVar(Scope.TXN, VAR_RULE, STATIC),
        SetVar(Scope.TXN, VAR_POLICY, STATIC),
    )


#: set-var(txn.key) up to its value: an UINT32 whose varint follows.
_KEY_HEAD: Final = encode_action(SetVar(Scope.TXN, VAR_KEY, UInt32(0)))[:-1]
#: Encoded key actions remembered (most requests repeat a key): at most this many.
KEY_ACTIONS: Final = 65536


def _actions_for(policy: CompiledPolicy, rule: str, worker_class: str) -> tuple[bytes, bytes]:
    """(backend set-var, rule and policy set-vars) for one rule: built once."""
    return (
        encode_actions([SetVar(Scope.TXN, VAR_BACKEND, worker_class)]),
        encode_actions(
            [SetVar(Scope.TXN, VAR_RULE, rule), SetVar(Scope.TXN, VAR_POLICY, policy.version)]
        ),
    )


class RouteHandler:
    """SPOP handler deciding with the running policy of a :class:`PolicyHolder`.

    When the running policy has a ``whoami`` setting, the handler keeps its
    :class:`~spoa.whoami.WhoamiResolver` (one per setting: a reload that
    keeps the setting keeps the cache). With a ``wait`` in that setting, a
    request whose token is being looked up is answered when the lookup ends
    or the wait runs out, whichever comes first; every other request is
    answered at once.
    """

    def __init__(
        self,
        holder: PolicyHolder,
        stats: DecisionStats | None = None,
        count: bool = True,
        whoami: WhoamiStats | None = None,
        recorder: Recorder | None = None,
        shadow: Shadow | None = None,
    ) -> None:
        """``count=False`` skips the metrics counters (for measuring what they cost).

        ``recorder`` and ``shadow`` see the requests they sample after the
        answer is built, in a batch the event loop runs next: never before
        HAProxy has its answer, never in the way of one.
        """
        self.holder = holder
        self.recorder = recorder
        self.shadow = shadow
        self._observing = recorder is not None or shadow is not None
        self._pending: list[tuple[Request, Decision, CompiledPolicy, bool, bool]] = []
        #: Sampled requests dropped because the batch was full (the loop fell behind).
        self.observe_dropped = 0
        #: Errors of the recorder or the shadow (logged, counted, never raised).
        self.observe_errors = 0
        self.stats = stats if stats is not None else DecisionStats()
        self.whoami = whoami if whoami is not None else WhoamiStats()
        self._count = count
        self._tick = 0
        self._policy: CompiledPolicy | None = None
        self._encoded: dict[str, tuple[bytes, bytes]] = {}
        self._key_actions: Memo[int, bytes] = Memo(KEY_ACTIONS)
        self._resolver: WhoamiResolver | None = None
        #: Rules whose requests may wait for a lookup (empty without a wait).
        self._waiting_rules: frozenset[str] = frozenset()
        # Checked once: debug logging of decisions costs nothing when off.
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._closing: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def _prepare(self, policy: CompiledPolicy) -> dict[str, tuple[bytes, bytes]]:
        encoded = {
            rule.name: _actions_for(policy, rule.name, rule.worker_class)
            for rule in (*policy.rules, policy.default)
        }
        encoded[ERROR_RULE] = _actions_for(policy, ERROR_RULE, policy.default.worker_class)
        self._policy = policy
        self._encoded = encoded
        self._use_whoami(policy)
        return encoded

    def _use_whoami(self, policy: CompiledPolicy) -> None:
        """Keep, replace or drop the resolver to match the running policy."""
        spec = policy.whoami
        old = self._resolver
        if (old.spec if old is not None else None) == spec:
            return
        # A whoami setting comes or goes: the agent's event loop is running.
        loop = asyncio.get_running_loop()
        if old is not None:
            task = loop.create_task(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._resolver = WhoamiResolver(spec, self.whoami) if spec is not None else None
        if self._resolver is not None:
            self._sweeper = loop.create_task(self._resolver.run())
        self.whoami.use(self._resolver)
        waits = spec is not None and spec.wait > 0
        self._waiting_rules = frozenset(
            rule.name for rule in (*policy.rules, policy.default) if waits and rule.resolves
        )

    def _queue(self, request: Request, decision: Decision) -> None:
        record = self.recorder is not None and self.recorder.wants()
        shadow = self.shadow is not None and self.shadow.wants()
        if not (record or shadow) or self._policy is None:
            return
        if len(self._pending) >= OBSERVE_BATCH:
            self.observe_dropped += 1
            return
        if not self._pending:
            try:
                asyncio.get_running_loop().call_soon(self._drain)
            except RuntimeError:  # no loop (a benchmark calling the handler): now
                self._pending.append((request, decision, self._policy, record, shadow))
                self._drain()
                return
        self._pending.append((request, decision, self._policy, record, shadow))

    def _drain(self) -> None:
        pending, self._pending = self._pending, []
        resolver = self._resolver
        for request, decision, policy, record, shadow in pending:
            try:
                if record and self.recorder is not None:
                    self.recorder.write(request, decision)
                if shadow and self.shadow is not None:
                    self.shadow.observe(request, decision, policy, resolver)
            except Exception:
                self.observe_errors += 1
                if self.observe_errors == 1 or self.observe_errors % 10_000 == 0:
                    log.exception(
                        "recording or shadowing a request failed (%d so far)", self.observe_errors
                    )

    async def close(self) -> None:
        """Stop the whoami lookups (at shutdown)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._resolver is not None:
            await self._resolver.close()
        for task in list(self._closing):
            await task

    def __call__(self, event: Notify) -> bytes | Coroutine[Any, Any, bytes]:
        for message in event.messages:
            if message.name == MESSAGE:
                break
        else:
            self.stats.unrouted += 1
            return b""
        # Latency is sampled, one decision in LATENCY_SAMPLE: timing each one
        # would cost more than deciding some of them.
        self._tick = tick = (self._tick + 1) % LATENCY_SAMPLE
        started = perf_counter_ns() if self._count and not tick else 0
        args = message.args
        method = args.get(ARG_METHOD)
        path = args.get(ARG_PATH)
        query = args.get(ARG_QUERY)
        auth = args.get(ARG_AUTH)
        src = args.get(ARG_SRC)
        request = Request(
            method if isinstance(method, str) else "",
            path if isinstance(path, str) else "",
            query if isinstance(query, str) else None,
            auth if isinstance(auth, str) else None,
            src if isinstance(src, (IPv4Address, IPv6Address, str)) else None,
        )
        policy = self.holder.current
        encoded = self._encoded if policy is self._policy else self._prepare(policy)
        resolver = self._resolver
        decision = policy.decide(request, resolver)
        if decision.rule in self._waiting_rules and decision.key_kind == "token":
            assert resolver is not None
            token = access_token(request.auth, request.query)
            lookup = resolver.pending(token) if token else None
            if lookup is not None:
                return self._after(lookup, request, policy, encoded, resolver, started)
        return self._answer(decision, encoded, started, request)

    async def _after(
        self,
        lookup: asyncio.Task[tuple[str, str | None]],
        request: Request,
        policy: CompiledPolicy,
        encoded: dict[str, tuple[bytes, bytes]],
        resolver: WhoamiResolver,
        started: int,
    ) -> bytes:
        """Answer once the token's lookup is in, or its wait is over."""
        # wait() neither raises for the lookup's outcome nor cancels it.
        await asyncio.wait((lookup,), timeout=resolver.spec.wait)
        return self._answer(policy.decide(request, resolver), encoded, started, request)

    def _answer(
        self,
        decision: Decision,
        encoded: dict[str, tuple[bytes, bytes]],
        started: int,
        request: Request,
    ) -> bytes:
        backend, tail = encoded.get(decision.rule) or encoded[DEFAULT_RULE]
        key = decision.key
        if key is None:
            answer = backend + tail
        else:
            action = self._key_actions.get(key)
            if action is None:
                action = self._key_actions.remember(key, _KEY_HEAD + encode_varint(key))
            answer = backend + action + tail
        if self._count:
            stats = self.stats
            counts = stats.counts
            label = decision.label
            counts[label] = counts.get(label, 0) + 1
            if started:
                elapsed = perf_counter_ns() - started
                stats.buckets[bisect_left(LATENCY_BOUNDS_NS, elapsed)] += 1
                stats.latency_sum_ns += elapsed
        if self._observing:
            self._queue(request, decision)
        if self._debug:
            # Never the key source: it may be an access token.
            log.debug(
                "decided %s %s -> %s rule=%s key_kind=%s key=%s policy=%s",
                request.method,
                request.path,
                decision.worker_class,
                decision.rule,
                decision.key_kind,
                key,
                decision.policy,
            )
        return answer
