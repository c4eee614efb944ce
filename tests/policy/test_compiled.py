"""Compiled policies: first match wins, conditions fall through, keys are hashed."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.policy import (
    DEFAULT_RULE,
    CompiledPolicy,
    Decision,
    Request,
    compile_policy,
    policy_version,
)

ROOT = Path(__file__).resolve().parents[2]

POLICY = b"""\
version: 1
seed: 42
classes: {main: , a: , b: , c: , keyed: }
default: {class: main, key: src}
rules:
  - name: first
    class: a
    path: '^/x/one$'
  - name: get-only
    class: b
    methods: [GET]
    path: '^/x/'
  - name: needs-since
    class: c
    path: '^/x/'
    query: {present: [since]}
  - name: catch-x
    class: a
    path: ['^/nothing$', '^/x/']
  - name: unanchored
    class: b
    path: 'needle'
  - name: flags
    class: c
    path: '(?i)^/shout/'
  - name: token
    class: keyed
    key: token
    path: '^/k/token$'
  - name: user
    class: keyed
    key: user
    path: '^/k/user$'
  - name: room
    class: keyed
    key: room
    path: '^/k/rooms/'
  - name: origin
    class: keyed
    key: origin
    path: '^/k/origin$'
  - name: uri
    class: keyed
    key: uri
    path: '^/k/uri'
  - name: src
    class: keyed
    key: src
    path: '^/k/src$'
"""


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return compile_policy(POLICY, "test.yaml")


def route(policy: CompiledPolicy, method: str, target: str, **kw: object) -> Decision:
    path, _, query = target.partition("?")
    return policy.decide(Request(method, path, query or None, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "target", "rule", "worker_class"),
    [
        ("GET", "/x/one", "first", "a"),  # first match wins over the later rules
        ("GET", "/x/two", "get-only", "b"),
        ("PUT", "/x/two?since=1", "needs-since", "c"),  # method fails: falls through
        ("PUT", "/x/two?since=", "catch-x", "a"),  # empty since is absent
        ("PUT", "/x/two", "catch-x", "a"),  # both conditions fail: falls through twice
        ("GET", "/where/is/the/needle/", "unanchored", "b"),  # no ^: found anywhere
        ("GET", "/SHOUT/x", "flags", "c"),  # leading (?i) applies to its own pattern only
        ("GET", "/X/two", "default", "main"),  # ...not to the others
        ("GET", "/nothing/here", "default", "main"),
    ],
)
def test_first_matching_rule_decides(
    policy: CompiledPolicy, method: str, target: str, rule: str, worker_class: str
) -> None:
    decision = route(policy, method, target)
    assert (decision.rule, decision.worker_class) == (rule, worker_class)


def test_decision_names_the_policy_version(policy: CompiledPolicy) -> None:
    assert route(policy, "GET", "/x/one").policy == policy_version(POLICY) == policy.version
    assert re.fullmatch(r"[0-9a-f]{12}", policy.version)


def digest(text: str, seed: int = 42) -> int:
    """The key both engines compute: XXH32 of the source and the seed's salt."""
    return xxhash.xxh32_intdigest(f"{text}#{seed}".encode())


@pytest.mark.parametrize(
    ("target", "kw", "kind", "source"),
    [
        ("/k/token", {"auth": "Bearer mat_abc"}, "token", "mat_abc"),
        ("/k/token?access_token=mat_abc", {}, "token", "mat_abc"),
        ("/k/token", {}, "none", None),
        ("/k/user", {"auth": "Bearer syt_YWxpY2U_a_b"}, "user", "alice"),
        ("/k/user?access_token=syt_YWxpY2U_c_d", {}, "user", "alice"),
        ("/k/user", {"auth": "Bearer mat_other"}, "token", "mat_other"),
        ("/k/user", {}, "none", None),
        ("/k/rooms/%21r%3Ax/send", {}, "room", "!r:x"),
        ("/k/rooms/", {}, "none", None),
        ("/k/origin", {"auth": 'X-Matrix origin="o.example",key="k"'}, "origin", "o.example"),
        (
            "/k/origin",
            {"auth": "X-Matrix garbage", "src": IPv4Address("10.1.1.1")},
            "src",
            "10.1.1.1",
        ),
        ("/k/origin", {}, "none", None),
        ("/k/uri?b=2&a=1", {}, "uri", "/k/uri?b=2&a=1"),
        ("/k/uri", {}, "uri", "/k/uri"),
        ("/k/src", {"src": IPv6Address("2001:db8::1")}, "src", "2001:db8::1"),
        ("/k/src", {"src": "192.0.2.1"}, "src", "192.0.2.1"),
        # IPv4 clients of a dual-stack listener: keyed as the IPv4 they are.
        ("/k/src", {"src": IPv6Address("::ffff:192.0.2.7")}, "src", "192.0.2.7"),
        ("/k/src", {"src": "::FFFF:192.0.2.7"}, "src", "192.0.2.7"),
        ("/nowhere", {"src": IPv4Address("10.0.0.9")}, "src", "10.0.0.9"),  # the default's key
    ],
)
def test_keys_are_the_seeded_hex_digest_of_the_canonical_value(
    policy: CompiledPolicy, target: str, kw: dict[str, object], kind: str, source: str | None
) -> None:
    decision = route(policy, "GET", target, **kw)
    assert (decision.key_kind, decision.key_source) == (kind, source)
    assert decision.key == (digest(source) if source is not None else None)


def test_the_same_user_has_one_key_whether_the_token_is_in_the_header_or_query(
    policy: CompiledPolicy,
) -> None:
    header = route(policy, "GET", "/k/user", auth="Bearer syt_YWxpY2U_one_x")
    query = route(policy, "GET", "/k/user?access_token=syt_YWxpY2U_two_y")
    assert header.key == query.key is not None


def test_the_seed_changes_every_key() -> None:
    other = compile_policy(POLICY.replace(b"seed: 42", b"seed: 43"))
    a = route(other, "GET", "/k/uri")
    assert a.key == digest("/k/uri", seed=43) != digest("/k/uri", seed=42)


def test_a_raw_token_never_becomes_the_key(policy: CompiledPolicy) -> None:
    decision = route(policy, "GET", "/k/token", auth="Bearer secret_token_value")
    assert isinstance(decision.key, int) and "secret" not in str(decision.key)


def test_synapse_policy_sends_an_8kb_path_and_binary_bytes_somewhere() -> None:
    synapse = compile_policy((ROOT / "policies" / "synapse-workers.yaml").read_bytes())
    long_room = "/_matrix/client/v3/rooms/!" + "a" * 8192 + ":x/send/m.room.message/1"
    decision = synapse.decide(Request("PUT", long_room))
    assert decision.worker_class == "event_creator"
    binary = "/_matrix/client/v3/rooms/\udcff\udcfe/send/x/1"
    assert synapse.decide(Request("PUT", binary)).key_kind == "room"


anything = st.text(max_size=200) | st.binary(max_size=200).map(
    lambda b: b.decode("utf-8", "surrogateescape")
)
maybe = st.none() | anything
sources = st.none() | st.ip_addresses().map(lambda a: a) | anything


@settings(max_examples=400)
@given(anything, anything, maybe, maybe, sources)
def test_decide_never_raises_and_always_names_a_declared_class(
    method: str, path: str, query: str | None, auth: str | None, src: object
) -> None:
    for name in ("synapse-workers.yaml", "simple.yaml"):
        policy = _bundled(name)
        for p in (path, "/_matrix/client/v3/rooms/" + path, "/_matrix/federation/v1/send/" + path):
            decision = policy.decide(Request(method, p, query, auth, src))  # type: ignore[arg-type]
            assert decision.worker_class in policy.classes
            assert decision.rule in (*(r.name for r in policy.rules), DEFAULT_RULE)
            assert decision.key is None or 0 <= decision.key < 2**32


_CACHE: dict[str, CompiledPolicy] = {}


def _bundled(name: str) -> CompiledPolicy:
    if name not in _CACHE:
        _CACHE[name] = compile_policy((ROOT / "policies" / name).read_bytes(), name)
    return _CACHE[name]


def test_the_combined_dispatch_agrees_with_trying_each_rule_in_turn() -> None:
    """Compare against the obvious implementation on many documented paths."""
    policy = _bundled("synapse-workers.yaml")
    samples = [
        "/_matrix/client/v3/sync",
        "/_matrix/client/r0/sync",
        "/_matrix/client/v3/events",
        "/_matrix/client/v3/rooms/!r:x/send/m.room.message/1",
        "/_matrix/client/v3/rooms/!r:x/state/m.room.member/@u:x",
        "/_matrix/client/v3/rooms/!r:x/typing/@u:x",
        "/_matrix/client/v3/rooms/!r:x/receipt/a/b",
        "/_matrix/client/v3/rooms/!r:x/messages",
        "/_matrix/client/v3/rooms/!r:x/members",
        "/_matrix/client/v3/rooms/!r:x/state",
        "/_matrix/client/v3/devices",
        "/_matrix/client/v3/keys/upload",
        "/_matrix/client/v3/keys/query",
        "/_matrix/client/v3/pushrules/global/",
        "/_matrix/client/v3/presence/@u:x/status",
        "/_matrix/client/v3/user/@u:x/account_data/m.direct",
        "/_matrix/client/v3/user/@u:x/rooms/!r:x/tags",
        "/_matrix/client/v3/user/@u:x/filter",
        "/_matrix/media/v3/download/x/y",
        "/_matrix/client/v1/media/thumbnail/x/y",
        "/_matrix/federation/v1/send/1",
        "/_matrix/federation/v1/state_ids/!r:x",
        "/_matrix/federation/v1/media/download/y",
        "/_matrix/key/v2/query",
        "/_synapse/admin/v2/users/@u:x",
        "/_synapse/admin/v1/rooms/!r:x",
        "/_matrix/client/v3/login/sso/redirect",
        "/_matrix/client/v3/logout",
        "/",
    ]
    for method in ("GET", "PUT", "POST"):
        for path in samples:
            for query in (None, "since=s1", "since="):
                expected = policy.default.name
                for rule in policy.rules:
                    assert rule.spec is not None
                    if any(re.search(p, path) for p in rule.spec.paths) and (
                        rule.conditions_hold(method, query)
                    ):
                        expected = rule.name
                        break
                assert policy.match(method, path, query).name == expected, (method, path, query)


def test_memos_keep_short_paths_and_key_sources_only() -> None:
    from spoa.policy.compiled import MEMO_MAX_TEXT

    policy = compile_policy(POLICY, "test.yaml")
    uri_rule = next(rule for rule in policy.rules if rule.name == "uri")
    short = "/k/uri/" + "s" * 10
    long = "/k/uri/" + "l" * MEMO_MAX_TEXT
    for path in (short, long):
        first = policy.decide(Request("GET", path))
        assert policy.decide(Request("GET", path)) == first
    assert short in policy._chains and long not in policy._chains
    assert short in uri_rule.decisions and long not in uri_rule.decisions
    assert policy.decide(Request("GET", long)).key_source == long
