"""Routes beyond Synapse's docs/workers.md, in every bundled policy.

Native sliding sync (Element X), MSC4306 thread subscriptions, createRoom
keyed by user, federation query_auth, the quarantine stream writer, the
endpoints Synapse's sources register on workers since the docs were written,
and, with the Matrix Authentication Service, login, logout and refresh to
MAS. Each route comes with its near misses: a trailing slash, another
unstable prefix, another method.

Sources: element-hq/synapse 1.163 (synapse/rest/client/sync.py,
thread_subscriptions.py, auth_metadata.py, matrixrtc.py, delayed_events.py,
synapse/rest/admin/media.py, synapse/config/workers.py), element-hq/ess-helm
(the MAS routes, createRoom), /work/shared/reference/matrix-routing-2026.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from spoa.policy import CompiledPolicy, Request, load_policy

ROOT = Path(__file__).resolve().parents[2]
C = "/_matrix/client"
ADMIN = "/_synapse/admin"
SS = f"{C}/unstable/org.matrix.simplified_msc3575/sync"
ROOM = "%21abc%3Aexample.org"
EVENT = "%24root"
ALICE = "Bearer syt_YWxpY2U_AbCdEfGhIjKlMnOpQrSt_0a1B2c"
ALICE_OTHER_DEVICE = "Bearer syt_YWxpY2U_ZzYyXxWwVvUuTtSsRrQq_9z8Y7x"
BOB = "Bearer syt_Ym9i_AbCdEfGhIjKlMnOpQrSt_0a1B2c"


class Case(NamedTuple):
    method: str
    target: str
    #: Class per policy: synapse-workers, synapse-workers-mas, simple.
    workers: str
    mas: str
    simple: str
    rule: str | None = None

    def request(self, auth: str | None = ALICE) -> Request:
        path, mark, query = self.target.partition("?")
        return Request(self.method, path, query if mark else None, auth)


def same(method: str, target: str, worker_class: str, simple: str, rule: str) -> Case:
    """A route synapse-workers-mas shares with synapse-workers."""
    return Case(method, target, worker_class, worker_class, simple, rule)


CASES = [
    # -- native sliding sync: synchrotron (sync in simple), by user ----------------------
    same("POST", SS, "synchrotron", "sync", "sliding_sync"),
    same("POST", f"{SS}?pos=12345&timeout=30000", "synchrotron", "sync", "sliding_sync"),
    same("POST", f"{SS}?timeout=0", "synchrotron", "sync", "sliding_sync"),
    # The v2 sync split is unchanged.
    same("GET", f"{C}/v3/sync", "initial_sync", "sync", "initial_sync"),
    same("GET", f"{C}/v3/sync?since=s1", "synchrotron", "sync", "sync"),
    # Near misses: a slash, the old proxy's prefix, a stable version, no /sync.
    same("POST", f"{SS}/", "main", "generic", "default"),
    same("POST", f"{C}/unstable/org.matrix.msc3575/sync", "main", "generic", "default"),
    same("POST", f"{C}/v3/org.matrix.simplified_msc3575/sync", "main", "generic", "default"),
    same("POST", f"{C}/unstable/org.matrix.simplified_msc3575", "main", "generic", "default"),
    same("POST", f"{SS}x", "main", "generic", "default"),
    # -- MSC4306 / MSC4308 thread subscriptions: their stream writer ---------------------
    *(
        same(
            method,
            f"{C}/unstable/io.element.msc4306/rooms/{ROOM}/thread/{EVENT}/subscription",
            "thread_subscriptions",
            "generic",
            "thread_subscriptions",
        )
        for method in ("GET", "PUT", "DELETE")
    ),
    same(
        "GET",
        f"{C}/unstable/io.element.msc4308/thread_subscriptions?limit=10",
        "thread_subscriptions",
        "generic",
        "thread_subscriptions",
    ),
    same("GET", f"{C}/v1/rooms/{ROOM}/thread/{EVENT}/subscription", "main", "generic", "default"),
    same(
        "GET",
        f"{C}/unstable/io.element.msc4308/thread_subscriptions/",
        "main",
        "generic",
        "default",
    ),
    same(
        "GET",
        f"{C}/unstable/org.matrix.msc4306/rooms/{ROOM}/thread/{EVENT}/subscription",
        "main",
        "generic",
        "default",
    ),
    # -- createRoom: event creators, by user -------------------------------------------
    *(
        same("POST", f"{C}/{v}/createRoom", "event_creator", "generic", "room_creation")
        for v in ("api/v1", "r0", "v3", "unstable")
    ),
    same("POST", f"{C}/v3/createRoom/", "main", "generic", "default"),
    same("POST", f"{C}/v3/createRoomx", "main", "generic", "default"),
    # -- federation query_auth: federation readers ---------------------------------------
    same(
        "POST",
        f"/_matrix/federation/v1/query_auth/{ROOM}/{EVENT}",
        "federation_reader",
        "generic",
        "federation_reader",
    ),
    same("POST", f"/_matrix/federation/v2/query_auth/{ROOM}/{EVENT}", "main", "generic", "default"),
    # -- quarantine: its stream writer (media listings stay on the media repository) ----
    same(
        "POST",
        f"{ADMIN}/v1/media/quarantine/example.org/abc",
        "quarantined_media_changes",
        "generic",
        "quarantined_media_changes",
    ),
    same(
        "POST",
        f"{ADMIN}/v1/room/{ROOM}/media/quarantine",
        "quarantined_media_changes",
        "generic",
        "quarantined_media_changes",
    ),
    same("GET", f"{ADMIN}/v1/media/quarantine_changes", "media_repository", "generic", "media"),
    same("GET", f"{ADMIN}/v1/room/{ROOM}/media", "media_repository", "generic", "media"),
    # -- endpoints the sources register on workers -------------------------------------
    same("GET", f"{C}/v1/auth_metadata", "client_reader", "generic", "client_reader"),
    same(
        "GET",
        f"{C}/unstable/org.matrix.msc2965/auth_metadata",
        "client_reader",
        "generic",
        "client_reader",
    ),
    same(
        "GET",
        f"{C}/unstable/org.matrix.msc4143/rtc/transports",
        "client_reader",
        "generic",
        "client_reader",
    ),
    same(
        "GET",
        f"{C}/unstable/im.nheko.summary/rooms/{ROOM}/summary",
        "client_reader",
        "generic",
        "client_reader",
    ),
    same(
        "GET",
        f"{C}/unstable/org.matrix.msc4140/delayed_events/syd_abc",
        "client_reader",
        "generic",
        "client_reader_get",
    ),
    # Updating a delayed event is main-only.
    same(
        "POST",
        f"{C}/unstable/org.matrix.msc4140/delayed_events/syd_abc",
        "main",
        "generic",
        "default",
    ),
    same("GET", f"{C}/v1/rtc/transports", "main", "generic", "default"),
    # -- with MAS: login, logout (and logout/all), refresh to MAS ------------------------
    *(
        Case(
            method,
            f"{C}/{v}/{what}",
            "client_reader" if what == "login" else "main",
            "mas",
            "generic",
            None,
        )
        for v in ("api/v1", "r0", "v3", "unstable")
        for what, method in (
            ("login", "POST"),
            ("login", "GET"),
            ("logout", "POST"),
            ("refresh", "POST"),
        )
    ),
    Case("POST", f"{C}/v3/logout/all", "main", "mas", "generic"),
    Case("GET", f"{C}/v3/login/sso/redirect?redirectUrl=x", "main", "mas", "main"),
    Case("GET", f"{C}/v3/login/sso/redirect/oidc-google", "main", "mas", "main"),
    Case(
        "GET",
        "/_synapse/mas/is_localpart_available?localpart=a",
        "main",
        "client_reader",
        "generic",
    ),
    # Near misses of the MAS routes stay where synapse-workers puts them.
    Case("POST", f"{C}/v3/loginx", "main", "main", "generic"),
    Case("POST", f"{C}/v3/logoutall", "main", "main", "generic"),
    Case("POST", f"{C}/v4/login", "main", "main", "generic"),
    Case("POST", f"{C}/v3/register", "client_reader", "client_reader", "generic"),
    Case("GET", f"{C}/v3/account/whoami", "client_reader", "client_reader", "generic"),
]

POLICIES = {
    "workers": "synapse-workers.yaml",
    "mas": "synapse-workers-mas.yaml",
    "simple": "simple.yaml",
}


@pytest.fixture(scope="module")
def policies() -> dict[str, CompiledPolicy]:
    return {name: load_policy(str(ROOT / "policies" / file)) for name, file in POLICIES.items()}


@pytest.mark.parametrize("which", list(POLICIES))
@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c.method} {c.target}") for c in CASES])
def test_each_route_reaches_its_class_in_each_bundled_policy(
    policies: dict[str, CompiledPolicy], case: Case, which: str
) -> None:
    decision = policies[which].decide(case.request())
    expected = getattr(case, which)
    assert decision.worker_class == expected, (which, case, decision.rule)
    if case.rule is not None and which != "simple" and expected != "main":
        assert decision.rule == case.rule


KEYED = [
    pytest.param(which, target, id=f"{which}: {target}")
    for which in POLICIES
    for target in (SS, f"{SS}?pos=1", f"{C}/v3/createRoom")
    # simple sends room creation to generic workers, unkeyed.
    if not (which == "simple" and "createRoom" in target)
]


@pytest.mark.parametrize(("which", "target"), KEYED)
def test_sliding_sync_and_room_creation_are_keyed_by_user(
    policies: dict[str, CompiledPolicy], which: str, target: str
) -> None:
    policy = policies[which]
    path, _, query = target.partition("?")
    alice = policy.decide(Request("POST", path, query or None, ALICE))
    alice_again = policy.decide(Request("POST", path, query or None, ALICE_OTHER_DEVICE))
    bob = policy.decide(Request("POST", path, query or None, BOB))
    assert alice.key_kind == "user" and alice.key_source == "alice"
    assert alice.key == alice_again.key != bob.key
