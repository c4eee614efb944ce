"""Compiled policies and the routing decision.

Theory of operation
-------------------
A policy is an ordered list of rules; the first rule whose path pattern,
methods and query conditions all hold decides. Trying each regex in turn
costs a Python call per rule (around a hundred for the Synapse layout), so
compilation folds the path patterns of all rules into one alternation, one
named group per rule, in rule order. Python's regex engine tries the
alternatives left to right and stops at the first that matches, which is
exactly first-match-wins on the path, in one call into C.

A rule whose methods or query conditions fail after its path matched must
fall through to the rules after it. For each such rule the compiler also
builds the alternation of the rules that follow it, so a fall-through is one
more call, never a loop over rules. Only rules with conditions need one.

Everything that can be computed from the policy alone is computed here, once:
patterns, key extractors, the policy version. :meth:`CompiledPolicy.decide`
never validates and never raises.
"""

from __future__ import annotations

import hashlib
import re
from ipaddress import IPv4Address, IPv6Address
from typing import Final, NamedTuple, Protocol

from ..matrix import access_token, syt_localpart
from ..matrix.converters import to_bytes, xxh32
from ..matrix.keys import KEY_EXTRACTORS, KeyExtractor
from ..matrix.query import has_value
from ..memo import Memo
from .schema import KeyKind, PolicySpec, Resolve, RuleSpec

DEFAULT_RULE: Final = "default"
#: Memos (matching chains by path, decisions by key source) hold at most this
#: many entries each, and only for strings up to MEMO_MAX_TEXT characters:
#: memory stays bounded whatever the traffic.
MEMO_ENTRIES: Final = 8192
MEMO_MAX_TEXT: Final = 256
#: Rule name reported if deciding failed unexpectedly (a bug, not an input).
ERROR_RULE: Final = "error"


def key_salt(seed: int) -> str:
    """What follows every key source before it is hashed: the policy's seed, so that a
    new seed moves every key (the fallback's map carries it to HAProxy)."""
    return f"#{seed}"


def key_hash(source: str, salt: str) -> int:
    """A key: XXH32 of the key source's bytes and the salt, as haproxy.cfg's
    ``concat(,txn.fb_salt),xxh32`` computes it."""
    return xxh32(to_bytes(source) + salt.encode("ascii"))


class Request(NamedTuple):
    """What HAProxy sends for one request (the SPOE ``route`` message).

    ``path`` is raw and undecoded, without the query; ``query`` is raw,
    without the ``?``; ``auth`` is the whole Authorization header.
    """

    method: str
    path: str
    query: str | None = None
    auth: str | None = None
    src: str | IPv4Address | IPv6Address | None = None


class Decision(NamedTuple):
    """Where a request goes and what it hashes on.

    ``key_kind`` is the kind of key actually used: a rule's kind, or the kind
    it fell back to (``token`` for a ``user`` rule without a ``syt_`` token,
    ``src`` for ``origin`` without X-Matrix, ``none`` when nothing was there).
    ``key_source`` is the canonical value before hashing; it may hold a token
    and must never leave the agent. ``key`` is its hash (:func:`key_hash`), an
    unsigned 32-bit integer, as HAProxy's fallback computes it too.
    """

    worker_class: str
    key_kind: str
    key_source: str | None
    key: int | None
    rule: str
    policy: str
    #: (class, rule, key kind): the metric labels, built once per rule and kind.
    label: tuple[str, str, str] = ("", "", "")


class Users(Protocol):
    """Who an access token belongs to, as far as is known now (the whoami cache).

    ``user_for`` must answer at once, from what is already known, and may
    start finding out in the background: a token it cannot name yet keeps
    its token key until a later request.
    """

    def user_for(self, token: str) -> str | None:
        """The user localpart of ``token``, or None if not known (yet)."""


#: The extractor of each kind of key (spoa.matrix.keys); every kind has one.
EXTRACTORS: Final[dict[KeyKind, KeyExtractor]] = {
    kind: KEY_EXTRACTORS[kind.value] for kind in KeyKind
}


class CompiledRule:
    """One rule, ready to match: the pieces of a RuleSpec the hot path reads."""

    __slots__ = (
        "absent",
        "conditional",
        "decisions",
        "extract",
        "index",
        "key",
        "keyless",
        "labels",
        "methods",
        "name",
        "present",
        "resolves",
        "spec",
        "worker_class",
    )

    def __init__(
        self,
        index: int,
        spec: RuleSpec | None,
        worker_class: str,
        key: KeyKind,
        name: str,
        memo_entries: int = MEMO_ENTRIES,
    ) -> None:
        self.index = index
        self.spec = spec
        self.name = name
        self.worker_class = worker_class
        self.key = key
        self.extract = EXTRACTORS[key]
        self.methods = spec.methods if spec else None
        self.present = spec.query_present if spec else ()
        self.absent = spec.query_absent if spec else ()
        self.conditional = bool(self.methods or self.present or self.absent)
        #: Whether the user behind an opaque token is asked of a Users (whoami).
        self.resolves = False
        #: Decisions already made by this rule, by key source (bounded memo).
        self.decisions: Memo[str, Decision] = Memo(memo_entries, MEMO_MAX_TEXT)
        #: The decision when the request gives no key (set by the policy).
        self.keyless: Decision | None = None
        self.labels: dict[str, tuple[str, str, str]] = {}

    def label(self, kind: str) -> tuple[str, str, str]:
        """The (class, rule, key kind) label tuple, one object per kind."""
        label = self.labels.get(kind)
        if label is None:
            label = self.labels[kind] = (self.worker_class, self.name, kind)
        return label

    def conditions_hold(self, method: str, query: str | None) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        for name in self.present:
            if not has_value(query, name):
                return False
        for name in self.absent:  # noqa: SIM110 (a generator costs more here)
            if has_value(query, name):
                return False
        return True


_GLOBAL_FLAGS = re.compile(r"^\(\?([aiLmsux]+)\)")


def _alternative(pattern: str) -> str:
    """A rule's pattern as one alternative of the combined regex.

    Leading global flags become scoped ones (only allowed at the very start
    of the whole expression), and a pattern not anchored with ``^`` gets a
    lazy ``.*?`` in front: ``match`` then behaves as ``search`` would alone.
    """
    flags = ""
    found = _GLOBAL_FLAGS.match(pattern)
    if found:
        flags = found.group(1)
        pattern = pattern[found.end() :]
    if not pattern.startswith("^"):
        pattern = "(?s:.*?)(?:" + pattern + ")"
    return f"(?{flags}:{pattern})" if flags else f"(?:{pattern})"


def _combine(rules: list[CompiledRule]) -> re.Pattern[str] | None:
    parts = []
    for rule in rules:
        assert rule.spec is not None
        body = "|".join(_alternative(p) for p in rule.spec.paths)
        parts.append(f"(?P<r{rule.index}>{body})")
    # ASCII: \\d, \\w, \\b and case-insensitivity as PCRE reads them in HAProxy's
    # fallback (spoa.policy.native), not Unicode's.
    return re.compile("|".join(parts), re.ASCII) if parts else None


class CompiledPolicy:
    """An immutable, compiled policy. Build it with :func:`compile_policy`."""

    def __init__(self, spec: PolicySpec, version: str, memo_entries: int = MEMO_ENTRIES) -> None:
        self.spec = spec
        self.version = version
        self.seed = spec.seed
        self.salt = key_salt(spec.seed)
        self.classes = spec.classes
        self.rules = tuple(
            CompiledRule(i, rule, rule.worker_class, rule.key, rule.name, memo_entries)
            for i, rule in enumerate(spec.rules)
        )
        self.default = CompiledRule(
            len(self.rules), None, spec.default_class, spec.default_key, DEFAULT_RULE, memo_entries
        )
        self.whoami = spec.whoami
        self._resolve_all = spec.whoami is not None and spec.whoami.resolve is Resolve.ALL
        if spec.whoami is not None:
            for rule in (*self.rules, self.default):
                rule.resolves = rule.key is KeyKind.USER
        self._by_group = {f"r{rule.index}": rule for rule in self.rules}
        rules = list(self.rules)
        self._matcher = _combine(rules)
        # Where to resume after a conditional rule's conditions fail.
        self._after: dict[int, re.Pattern[str] | None] = {
            rule.index: _combine(rules[rule.index + 1 :]) for rule in rules if rule.conditional
        }
        # Matching chains by path: many requests share a path (/sync,
        # /versions, /keys/query), and a chain does not depend on anything
        # else. Bounded; cleared when full.
        self._chains: Memo[str, tuple[CompiledRule, ...]] = Memo(memo_entries, MEMO_MAX_TEXT)
        for rule in (*self.rules, self.default):
            rule.keyless = Decision(
                rule.worker_class,
                "none",
                None,
                None,
                rule.name,
                self.version,
                rule.label("none"),
            )

    def _chain(self, path: str) -> tuple[CompiledRule, ...]:
        """The rules whose paths match, up to the first without conditions.

        Whatever the method and query, the deciding rule is the first of
        this chain whose conditions hold, or the default rule.
        """
        chain: list[CompiledRule] = []
        matcher = self._matcher
        while matcher is not None:
            found = matcher.match(path)
            if found is None:
                break
            rule = self._by_group[found.lastgroup]  # type: ignore[index]
            chain.append(rule)
            if not rule.conditional:
                break
            matcher = self._after[rule.index]
        result = tuple(chain)
        return self._chains.remember(path, result)

    def match(self, method: str, path: str, query: str | None) -> CompiledRule:
        """The first rule that takes this request, or the default rule."""
        chain = self._chains.get(path)
        if chain is None:
            chain = self._chain(path)
        for rule in chain:
            if not rule.conditional or rule.conditions_hold(method, query):
                return rule
        return self.default

    def _user_key(self, request: Request, users: Users) -> tuple[str, str] | None:
        """The user key, asking ``users`` for tokens that do not name their user."""
        token = access_token(request.auth, request.query)
        if not token:
            return None
        if not self._resolve_all and token.startswith("syt_"):
            localpart = syt_localpart(token)
            if localpart is not None:
                return ("user", localpart)
        user = users.user_for(token)
        return ("user", user) if user else ("token", token)

    def decide(self, request: Request, users: Users | None = None) -> Decision:
        """Route one request. Pure but for ``users``; never raises.

        With ``users`` (the agent's whoami cache) and a policy with a
        ``whoami`` setting, ``user`` rules key opaque tokens by the user
        ``users`` names; without, by the token.
        """
        try:
            rule = self.match(request.method, request.path, request.query)
            if users is not None and rule.resolves:
                found = self._user_key(request, users)
            else:
                found = rule.extract(request)
            if found is None:
                return rule.keyless  # type: ignore[return-value]
            kind, source = found
            memo = rule.decisions
            decision = memo.get(source)
            if decision is not None and decision.key_kind == kind:
                return decision
            decision = Decision(
                rule.worker_class,
                kind,
                source,
                key_hash(source, self.salt),
                rule.name,
                self.version,
                rule.label(kind),
            )
            return memo.remember(source, decision)
        except Exception:  # a bug; the request still gets routed
            worker_class = self.default.worker_class
            return Decision(
                worker_class,
                "none",
                None,
                None,
                ERROR_RULE,
                self.version,
                (worker_class, ERROR_RULE, "none"),
            )


def policy_version(content: bytes) -> str:
    """The short content hash that names a policy version."""
    return hashlib.sha256(content).hexdigest()[:12]
