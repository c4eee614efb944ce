"""policies/synapse-workers.yaml against every endpoint regex of Synapse's docs/workers.md.

The cases are data, in synapse_workers_table.yaml beside this file: each
documented regex with requests as a client or a remote server really sends
them (raw path, raw query) and the worker class the "fully specialised"
layout must send them to; greedy overlaps; near misses that stay on main.
Besides routing, the table itself is checked: every example is an instance
of its regex, and every regex of the docs has at least one example. The keys
each class hashes on are tested below the table's tests.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from spoa.policy import CompiledPolicy, Decision, Request, load_policy

ROOT = Path(__file__).resolve().parents[2]
POLICY_PATH = ROOT / "policies" / "synapse-workers.yaml"
TABLE_PATH = Path(__file__).with_name("synapse_workers_table.yaml")

C = "/_matrix/client"
F = "/_matrix/federation"

# Identifiers as they appear in paths: raw, and percent-encoded as most SDKs send them.
ROOM = "!abc:example.org"
ROOM_ENC = "%21abc%3Aexample.org"
EVENT_ENC = "%24Woq2vwLy8mNukf7e8oz61GxT5gpMmr_r6DCK4bmNGs0"
SINCE = "since=s72594_4483_1934&timeout=30000"

# -- the table ----------------------------------------------------------------------------


class Row(NamedTuple):
    """One request of a documented regex and the class it must reach."""

    regex: str
    method: str
    path: str
    query: str | None
    expected: str

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query is not None else self.path


class Overlap(NamedTuple):
    """A path two documented regexes match because of a greedy ``.*`` (precedence rule 4).

    ``regex`` names the endpoint the path really is (decided by the segment after
    ``/rooms/{roomId}/``); ``decoy`` is the regex that matches only by accident.
    """

    regex: str
    decoy: str
    method: str
    path: str
    expected: str


class NearMiss(NamedTuple):
    """A request that looks like a documented endpoint but is not one: it stays on main."""

    near: str | None  # the documented regex it resembles, None for an undocumented endpoint
    method: str
    path: str
    query: str | None = None


def parse_request(line: str) -> tuple[str, str, str | None]:
    """``METHOD path`` or ``METHOD path?query`` as (method, path, query or None)."""
    method, space, target = line.partition(" ")
    assert space and method.isupper() and target.startswith("/"), f"not a request: {line!r}"
    path, mark, query = target.partition("?")
    return method, path, query if mark else None


def entries(table: dict[str, Any], section: str, keys: set[str]) -> list[dict[str, Any]]:
    """The entries of one section, each with only the keys it may have."""
    found = table[section]
    assert isinstance(found, list), f"{TABLE_PATH.name}: {section} is not a list"
    for entry in found:
        assert isinstance(entry, dict) and set(entry) <= keys, (
            f"{TABLE_PATH.name}: {section} entry {entry!r} has keys outside {sorted(keys)}"
        )
    return found


class Table(NamedTuple):
    documented: tuple[str, ...]
    rows: list[Row]
    overlaps: list[Overlap]
    near_misses: list[NearMiss]
    #: (method, path with {room}, class)
    room_keyed: list[tuple[str, str, str]]


def load_table() -> Table:
    table = yaml.safe_load(TABLE_PATH.read_text(encoding="utf-8"))
    assert set(table) == {"endpoints", "overlaps", "near_misses", "keyed_by_room"}, sorted(table)
    endpoints = entries(table, "endpoints", {"regex", "routes"})
    documented = tuple(entry["regex"] for entry in endpoints)
    rows = [
        Row(entry["regex"], *parse_request(request), worker_class)
        for entry in endpoints
        for worker_class, requests in (entry.get("routes") or {}).items()
        for request in requests or ()
    ]
    overlaps = []
    for entry in entries(table, "overlaps", {"request", "regex", "decoy", "routes"}):
        method, path, query = parse_request(entry["request"])
        assert query is None, f"an overlap is a path: {entry['request']!r}"
        overlaps.append(Overlap(entry["regex"], entry["decoy"], method, path, entry["routes"]))
    near_misses = [
        NearMiss(entry.get("near"), *parse_request(entry["request"]))
        for entry in entries(table, "near_misses", {"request", "near"})
    ]
    room_keyed = []
    for worker_class, requests in table["keyed_by_room"].items():
        for request in requests:
            method, template, query = parse_request(request)
            assert query is None and "{room}" in template, f"not a room template: {request!r}"
            room_keyed.append((method, template, worker_class))
    return Table(documented, rows, overlaps, near_misses, room_keyed)


DOCUMENTED, ROWS, OVERLAPS, NEAR_MISSES, ROOM_KEYED = load_table()

# -- routing ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return load_policy(str(POLICY_PATH))


def decide(
    policy: CompiledPolicy,
    method: str,
    path: str,
    query: str | None = None,
    auth: str | None = None,
    src: str | None = None,
) -> Decision:
    return policy.decide(Request(method=method, path=path, query=query, auth=auth, src=src))


def row_id(method: str, path: str, query: str | None) -> str:
    return f"{method} {path}" + (f"?{query}" if query is not None else "")


@pytest.mark.parametrize(
    "row", [pytest.param(r, id=f"{r.expected}: {row_id(r.method, r.path, r.query)}") for r in ROWS]
)
def test_every_documented_regex_reaches_its_class(policy: CompiledPolicy, row: Row) -> None:
    decision = decide(policy, row.method, row.path, row.query)
    assert decision.worker_class == row.expected, (
        f"{row.method} {row.target} (docs: {row.regex}) went to {decision.worker_class!r} "
        f"by rule {decision.rule!r}, expected {row.expected!r}"
    )


@pytest.mark.parametrize(
    "overlap",
    [pytest.param(o, id=f"{o.expected}: {row_id(o.method, o.path, None)}") for o in OVERLAPS],
)
def test_greedy_overlaps_go_to_the_endpoint_the_path_really_is(
    policy: CompiledPolicy, overlap: Overlap
) -> None:
    decision = decide(policy, overlap.method, overlap.path)
    assert decision.worker_class == overlap.expected, (
        f"{overlap.method} {overlap.path} is {overlap.regex}, not {overlap.decoy}; went to "
        f"{decision.worker_class!r} by rule {decision.rule!r}, expected {overlap.expected!r}"
    )


@pytest.mark.parametrize(
    "miss",
    [pytest.param(m, id=row_id(m.method, m.path, m.query)) for m in NEAR_MISSES],
)
def test_near_misses_of_documented_regexes_stay_on_main(
    policy: CompiledPolicy, miss: NearMiss
) -> None:
    decision = decide(policy, miss.method, miss.path, miss.query)
    assert decision.worker_class == "main", (
        f"{row_id(miss.method, miss.path, miss.query)} is not documented "
        f"(near {miss.near}); went to {decision.worker_class!r} by rule {decision.rule!r}"
    )


# -- the table itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "row", [pytest.param(r, id=f"{r.regex} <- {row_id(r.method, r.path, r.query)}") for r in ROWS]
)
def test_each_example_is_an_instance_of_its_documented_regex(row: Row) -> None:
    assert row.regex in DOCUMENTED
    assert re.match(row.regex, row.path), f"{row.path} does not match {row.regex}"


def test_every_documented_regex_has_examples() -> None:
    assert len(set(DOCUMENTED)) == len(DOCUMENTED)
    missing = [regex for regex in DOCUMENTED if not any(row.regex == regex for row in ROWS)]
    assert not missing


def test_the_table_has_no_duplicate_requests() -> None:
    requests = [(row.method, row.path, row.query) for row in ROWS]
    requests += [(o.method, o.path, None) for o in OVERLAPS]
    requests += [(m.method, m.path, m.query) for m in NEAR_MISSES]
    assert len(set(requests)) == len(requests)


@pytest.mark.parametrize("overlap", [pytest.param(o, id=o.path) for o in OVERLAPS])
def test_each_overlap_really_matches_both_regexes(overlap: Overlap) -> None:
    assert overlap.regex in DOCUMENTED and overlap.decoy in DOCUMENTED
    assert re.match(overlap.regex, overlap.path)
    assert re.match(overlap.decoy, overlap.path)


@pytest.mark.parametrize("miss", [pytest.param(m, id=m.path) for m in NEAR_MISSES])
def test_each_near_miss_matches_no_documented_regex(miss: NearMiss) -> None:
    assert miss.near is None or miss.near in DOCUMENTED
    matching = [regex for regex in DOCUMENTED if re.match(regex, miss.path)]
    assert not matching


# -- keys ---------------------------------------------------------------------------------

ALICE = "Bearer syt_YWxpY2U_QWxpY2VTZWNyZXRUb2tlbg_1B2cDe"
ALICE_OTHER_DEVICE = "Bearer syt_YWxpY2U_T3RoZXJEZXZpY2VUb2tlbg_4F5gHi"
BOB = "Bearer syt_Ym9i_Qm9iU2VjcmV0VG9rZW5BYmNk_0a1B2c"


@pytest.mark.parametrize(
    ("method", "path", "query"),
    [
        ("GET", f"{C}/v3/sync", SINCE),
        ("GET", f"{C}/r0/sync", "since=s1_2_3"),
        ("GET", f"{C}/v3/sync", None),
        ("GET", f"{C}/v3/sync", "since=&timeout=0"),
        ("GET", f"{C}/v3/events", "from=s1_2_3"),
        ("GET", f"{C}/v3/initialSync", None),
        ("GET", f"{C}/v3/rooms/{ROOM_ENC}/initialSync", None),
    ],
    ids=str,
)
def test_sync_is_keyed_by_the_user_named_in_the_syt_token(
    policy: CompiledPolicy, method: str, path: str, query: str | None
) -> None:
    alice = decide(policy, method, path, query, auth=ALICE)
    alice_again = decide(policy, method, path, query, auth=ALICE_OTHER_DEVICE)
    bob = decide(policy, method, path, query, auth=BOB)
    assert alice.worker_class in {"synchrotron", "initial_sync"}
    assert (alice.key_kind, alice_again.key_kind, bob.key_kind) == ("user", "user", "user")
    assert alice.key is not None
    assert alice.key == alice_again.key, "two devices of one user must hash alike"
    assert alice.key != bob.key


@pytest.mark.parametrize(
    ("method", "template", "worker_class"),
    ROOM_KEYED,
    ids=[f"{method} {template}" for method, template, _ in ROOM_KEYED],
)
def test_event_sending_and_pagination_are_keyed_by_room_however_it_is_encoded(
    policy: CompiledPolicy, method: str, template: str, worker_class: str
) -> None:
    query = "dir=b&limit=10" if method == "GET" else None
    spellings = (ROOM, ROOM_ENC, "%21abc%3aexample.org")
    decisions = [
        decide(policy, method, template.format(room=room), query, auth=auth)
        for room, auth in zip(spellings, (ALICE, BOB, None), strict=True)
    ]
    other = decide(policy, method, template.format(room="%21xyz%3Aexample.org"), query)
    assert {d.worker_class for d in decisions} == {worker_class}
    assert {d.key_kind for d in decisions} == {"room"}
    assert {d.key_source for d in decisions} == {ROOM}
    assert len({d.key for d in decisions}) == 1, "raw and encoded room IDs must hash alike"
    assert (other.key_kind, other.worker_class) == ("room", worker_class)
    assert other.key != decisions[0].key


def x_matrix(origin: str, key: str = "ed25519:a", sig: str = "x") -> str:
    return f'X-Matrix origin="{origin}",key="{key}",sig="{sig}"'


def test_inbound_federation_transactions_are_keyed_by_the_x_matrix_origin(
    policy: CompiledPolicy,
) -> None:
    first = decide(
        policy,
        "PUT",
        f"{F}/v1/send/1700000000001",
        auth=x_matrix("remote.example"),
        src="192.0.2.1",
    )
    second = decide(
        policy,
        "PUT",
        f"{F}/v1/send/1700000000002",
        auth=x_matrix("remote.example", sig="y"),
        src="198.51.100.7",
    )
    other = decide(
        policy, "PUT", f"{F}/v1/send/1700000000001", auth=x_matrix("other.example"), src="192.0.2.1"
    )
    assert {first.worker_class, second.worker_class, other.worker_class} == {"federation_inbound"}
    assert (first.key_kind, first.key_source) == ("origin", "remote.example")
    assert first.key == second.key, "one remote server, whatever its txn ID or address"
    assert other.key_kind == "origin"
    assert other.key != first.key


@pytest.mark.parametrize(
    ("path", "query"),
    [
        (f"{F}/v1/state_ids/{ROOM_ENC}", f"event_id={EVENT_ENC}"),
        (f"{F}/v1/event/{EVENT_ENC}", None),
        (f"{F}/v1/backfill/{ROOM_ENC}", f"v={EVENT_ENC}&limit=100"),
        (f"{F}/v1/query/profile", "user_id=%40alice%3Aexample.org"),
        ("/_matrix/key/v2/query/remote.example", None),
    ],
    ids=str,
)
def test_federation_reads_are_keyed_by_the_whole_uri(
    policy: CompiledPolicy, path: str, query: str | None
) -> None:
    auth = x_matrix("remote.example")
    decision = decide(policy, "GET", path, query, auth=auth)
    again = decide(policy, "GET", path, query, auth=x_matrix("other.example"), src="192.0.2.9")
    different = decide(policy, "GET", path, f"{query}&x=1" if query else "x=1", auth=auth)
    assert decision.worker_class == "federation_reader"
    assert decision.key_kind == "uri"
    assert decision.key_source == (f"{path}?{query}" if query else path)
    assert decision.key == again.key, "the same URI hashes alike whoever asks"
    assert different.key_kind == "uri"
    assert different.key != decision.key
