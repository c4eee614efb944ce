"""The whoami cache: per-user keys for opaque tokens, every cost bounded.

Unit tests drive :class:`WhoamiResolver` with a fake homeserver (a function)
and a fake clock; the last tests run it against a real HTTP server on
loopback. Through real HAProxy: tests/integration/test_whoami_routing.py;
with a real Synapse: tests/e2e/.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from spoa.httpd import HttpRequest, HttpResponse, HttpServer
from spoa.policy import PolicyError, Request, Resolve, WhoamiSpec, compile_policy
from spoa.policy.reload import PolicyHolder
from spoa.routing import RouteHandler
from spoa.spop import Message, Notify, SetVar
from spoa.spop.testing import decode_actions
from spoa.whoami import WhoamiResolver, WhoamiStats, localpart_of

SPEC = WhoamiSpec(url="http://127.0.0.1:1/_matrix/client/v3/account/whoami")
MAT = "mat_opaqueopaqueopaque_1"
MAT2 = "mat_opaqueopaqueopaque_2"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Homeserver:
    """A fake whoami: answers from a table; counts and can hold its answers."""

    def __init__(self, users: dict[str, str] | None = None) -> None:
        self.users = users or {}
        self.asked: list[str] = []
        self.gate: asyncio.Event | None = None
        self.status_override: int | None = None
        self.fail: BaseException | None = None

    async def __call__(self, token: str) -> tuple[int, bytes]:
        self.asked.append(token)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        if self.status_override is not None:
            return self.status_override, b"{}"
        user = self.users.get(token)
        if user is None:
            return 401, b'{"errcode": "M_UNKNOWN_TOKEN"}'
        return 200, json.dumps({"user_id": f"@{user}:example.org"}).encode()


def resolver(
    homeserver: Homeserver, clock: Clock | None = None, **settings: object
) -> WhoamiResolver:
    spec = replace(SPEC, **settings)  # type: ignore[arg-type]
    return WhoamiResolver(spec, fetch=homeserver, clock=clock or Clock())


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


# -- the cache ----------------------------------------------------------------------------


def test_a_new_token_keeps_its_token_key_until_its_user_is_known() -> None:
    async def test() -> None:
        home = Homeserver({MAT: "alice"})
        users = resolver(home)
        assert users.user_for(MAT) is None
        await settle()
        assert users.user_for(MAT) == "alice"
        assert users.user_for(MAT) == "alice"
        assert home.asked == [MAT]
        assert users.stats.lookups["user"] == 1
        assert (users.hits, users.stats.misses) == (2, 1)

    run(test)


def test_one_lookup_in_flight_per_token_however_many_requests() -> None:
    async def test() -> None:
        home = Homeserver({MAT: "alice"})
        home.gate = asyncio.Event()
        users = resolver(home)
        for _ in range(50):
            assert users.user_for(MAT) is None
        await settle()
        assert home.asked == [MAT] and users.in_flight == 1
        home.gate.set()
        await settle()
        assert users.user_for(MAT) == "alice" and users.in_flight == 0

    run(test)


def test_rejected_tokens_are_remembered_for_the_negative_ttl() -> None:
    async def test() -> None:
        clock = Clock()
        home = Homeserver()
        users = resolver(home, clock, negative_ttl=60.0)
        users.user_for(MAT)
        await settle()
        assert users.stats.lookups["unknown_token"] == 1
        clock.now += 59
        assert users.user_for(MAT) is None
        await settle()
        assert home.asked == [MAT] and users.stats.negative_hits == 1
        clock.now += 2
        home.users[MAT] = "alice"
        users.user_for(MAT)
        await settle()
        assert users.user_for(MAT) == "alice" and len(home.asked) == 2

    run(test)


def test_known_users_expire_after_the_ttl() -> None:
    async def test() -> None:
        clock = Clock()
        home = Homeserver({MAT: "alice"})
        users = resolver(home, clock, ttl=3600.0)
        users.user_for(MAT)
        await settle()
        clock.now += 3599
        assert users.sweep() == 0
        assert users.user_for(MAT) == "alice"
        clock.now += 2
        assert users.sweep() == 1
        assert users.user_for(MAT) is None  # expired: looked up again
        await settle()
        assert users.user_for(MAT) == "alice" and len(home.asked) == 2

    run(test)


def test_the_sweeper_forgets_expired_users_in_the_order_they_expire() -> None:
    async def test() -> None:
        home = Homeserver({MAT: "alice", MAT2: "bob"})
        users = WhoamiResolver(replace(SPEC, ttl=1.0), fetch=home)
        sweeper = asyncio.get_running_loop().create_task(users.run(interval=0.05))
        users.user_for(MAT)
        await settle()
        await asyncio.sleep(0.5)
        users.user_for(MAT2)
        await settle()
        assert users.entries() == (2, 0)
        await asyncio.sleep(0.7)  # alice's TTL is over, not bob's
        assert users.user_for(MAT2) == "bob" and users.entries()[0] == 1
        await asyncio.sleep(0.5)
        assert users.entries()[0] == 0
        sweeper.cancel()
        await users.close()

    run(test)


def test_the_cache_is_bounded_and_forgets_the_oldest_first() -> None:
    async def test() -> None:
        tokens = [f"mat_{n}" for n in range(10)]
        home = Homeserver({t: f"u{n}" for n, t in enumerate(tokens)})
        users = resolver(home, max_entries=4, max_negative_entries=2, max_per_second=1000.0)
        for token in tokens:
            users.user_for(token)
            await settle()
        assert users.entries() == (4, 0)
        assert [users.user_for(t) for t in tokens[-4:]] == ["u6", "u7", "u8", "u9"]
        for n in range(5):
            users.user_for(f"bad_{n}")
            await settle()
        assert users.entries() == (4, 2)

    run(test)


# -- the bounds on the homeserver's load -----------------------------------------------------


def test_lookups_in_flight_are_capped_and_the_rest_keep_token_keys() -> None:
    async def test() -> None:
        home = Homeserver()
        home.gate = asyncio.Event()
        users = resolver(home, max_concurrent=3, max_per_second=1000.0)
        for n in range(20):
            assert users.user_for(f"mat_{n}") is None
        await settle()
        assert len(home.asked) == 3 and users.in_flight == 3
        assert users.stats.skipped["busy"] == 17
        home.gate.set()
        await settle()
        assert users.in_flight == 0

    run(test)


def test_a_flood_of_unknown_tokens_costs_at_most_the_rate_cap() -> None:
    async def test() -> None:
        clock = Clock()
        home = Homeserver()
        users = resolver(home, clock, max_per_second=20.0, max_concurrent=256)
        # 10,000 random tokens over 5 (fake) seconds: a burst of 20, then 20/s.
        for n in range(10_000):
            users.user_for(f"mat_flood_{n}")
            if n % 200 == 199:
                await settle()
                clock.now += 0.1
        await settle()
        assert 20 <= len(home.asked) <= 20 + 20 * 5 + 1, len(home.asked)
        assert users.stats.skipped["rate_limited"] == 10_000 - len(home.asked)

    run(test)


FAILURES = [
    pytest.param(TimeoutError(), "timeout", id="timeout"),
    pytest.param(ConnectionRefusedError(), "error", id="refused"),
    pytest.param(OSError("unreachable"), "error", id="unreachable"),
]


@pytest.mark.parametrize(("failure", "result"), FAILURES)
def test_a_failing_homeserver_is_counted_and_retried_after_the_error_ttl(
    failure: BaseException, result: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def test() -> None:
        clock = Clock()
        home = Homeserver({MAT: "alice"})
        home.fail = failure
        users = resolver(home, clock, error_ttl=10.0)
        users.user_for(MAT)
        await settle()
        assert users.stats.lookups[result] == 1
        assert users.user_for(MAT) is None and len(home.asked) == 1
        home.fail = None
        clock.now += 11
        users.user_for(MAT)
        await settle()
        assert users.user_for(MAT) == "alice"

    with caplog.at_level(logging.WARNING, logger="spoa.whoami"):
        run(test)
    assert caplog.records and all(MAT not in r.getMessage() for r in caplog.records)


def test_a_slow_homeserver_times_out_within_the_timeout() -> None:
    async def test() -> None:
        home = Homeserver({MAT: "alice"})
        home.gate = asyncio.Event()  # never set
        users = resolver(home, timeout=0.05)
        users.user_for(MAT)
        await asyncio.sleep(0.2)
        assert users.stats.lookups["timeout"] == 1 and users.in_flight == 0

    run(test)


@pytest.mark.parametrize(
    ("status", "result"),
    [(500, "error"), (429, "error"), (403, "unknown_token"), (200, "bad_response")],
)
def test_other_answers_are_classified(status: int, result: str) -> None:
    async def test() -> None:
        home = Homeserver()
        home.status_override = status
        users = resolver(home)
        users.user_for(MAT)
        await settle()
        assert users.stats.lookups[result] == 1
        assert users.user_for(MAT) is None

    run(test)


@pytest.mark.parametrize(
    ("body", "localpart"),
    [
        (b'{"user_id": "@alice:example.org"}', "alice"),
        (b'{"user_id": "@bob:example.org:8448", "device_id": "X"}', "bob"),
        (b'{"user_id": "alice"}', None),
        (b'{"user_id": "@:example.org"}', None),
        (b'{"user_id": 5}', None),
        (b"[]", None),
        (b"not json", None),
        (b"\xff\xfe", None),
        (b"", None),
    ],
)
def test_only_a_well_formed_user_id_names_a_user(body: bytes, localpart: str | None) -> None:
    assert localpart_of(body) == localpart


# -- the policy's setting ---------------------------------------------------------------------

POLICY = b"""\
version: 1
classes: {main: , sync: }
default: {class: main}
rules:
  - {name: sync, class: sync, key: user, path: '^/sync$'}
  - {name: token, class: sync, key: token, path: '^/token$'}
whoami:
  url: http://127.0.0.1:8008/_matrix/client/v3/account/whoami
"""


class Known:
    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self.asked: list[str] = []

    def user_for(self, token: str) -> str | None:
        self.asked.append(token)
        return self.users.get(token)


def test_user_rules_key_opaque_tokens_by_the_user_the_cache_names() -> None:
    policy = compile_policy(POLICY)
    known = Known({MAT: "alice", MAT2: "alice"})
    first = policy.decide(Request("GET", "/sync", None, f"Bearer {MAT}"), known)
    second = policy.decide(Request("GET", "/sync", f"access_token={MAT2}"), known)
    syt = policy.decide(Request("GET", "/sync", None, "Bearer syt_YWxpY2U_x_y"), known)
    assert (first.key_kind, first.key_source) == ("user", "alice")
    assert first.key == second.key == syt.key
    assert known.asked == [MAT, MAT2]  # syt_ tokens name their user themselves
    unknown = policy.decide(Request("GET", "/sync", None, "Bearer mat_nobody"), known)
    assert (unknown.key_kind, unknown.key_source) == ("token", "mat_nobody")
    # Token rules, and decisions without a cache, never ask.
    policy.decide(Request("GET", "/token", None, f"Bearer {MAT}"), known)
    assert policy.decide(Request("GET", "/sync", None, f"Bearer {MAT}")).key_kind == "token"
    assert known.asked == [MAT, MAT2, "mat_nobody"]


def test_resolve_all_asks_for_syt_tokens_too() -> None:
    policy = compile_policy(POLICY + b"  resolve: all\n")
    assert policy.whoami is not None and policy.whoami.resolve is Resolve.ALL
    known = Known({"syt_YWxpY2U_x_y": "carol"})
    decision = policy.decide(Request("GET", "/sync", None, "Bearer syt_YWxpY2U_x_y"), known)
    assert decision.key_source == "carol" and known.asked == ["syt_YWxpY2U_x_y"]


def test_every_setting_has_a_default() -> None:
    whoami = compile_policy(POLICY).whoami
    assert whoami == WhoamiSpec(url="http://127.0.0.1:8008/_matrix/client/v3/account/whoami")
    assert whoami.resolve is Resolve.OPAQUE and whoami.wait == 0.0
    assert (whoami.timeout, whoami.ttl, whoami.negative_ttl, whoami.error_ttl) == (
        2.0,
        3600.0,
        60.0,
        10.0,
    )
    assert (whoami.max_entries, whoami.max_negative_entries) == (50_000, 10_000)
    assert (whoami.max_concurrent, whoami.max_per_second) == (4, 20.0)


def test_durations_take_units() -> None:
    text = (
        POLICY + b"  wait: 20ms\n  timeout: 1.5\n  ttl: 2h\n  negative_ttl: 5m\n  error_ttl: 3s\n"
    )
    whoami = compile_policy(text).whoami
    assert whoami is not None
    assert (whoami.wait, whoami.timeout, whoami.ttl, whoami.negative_ttl, whoami.error_ttl) == (
        0.02,
        1.5,
        7200.0,
        300.0,
        3.0,
    )


SETTING_ERRORS = {
    "no url": ("whoami: {resolve: all}", "7: whoami: missing required key 'url'"),
    "not http": ("whoami: {url: 'ftp://x/whoami'}", "7: whoami.url: expected an http(s) URL"),
    "credentials": (
        "whoami: {url: 'http://u:p@x/whoami'}",
        "7: whoami.url: the URL takes no query, fragment or credentials",
    ),
    "resolve": (
        "whoami: {url: 'http://x/', resolve: some}",
        "7: whoami.resolve: expected opaque or all",
    ),
    "wait too long": (
        "whoami: {url: 'http://x/', wait: 100ms}",
        "7: whoami.wait: must be within 0ms..50ms",
    ),
    "bad duration": (
        "whoami: {url: 'http://x/', ttl: forever}",
        "7: whoami.ttl: expected a duration (seconds, or 50ms, 2s, 10m, 1h)",
    ),
    "count": (
        "whoami: {url: 'http://x/', max_concurrent: 0}",
        "7: whoami.max_concurrent: must be within 1..256",
    ),
    "rate": (
        "whoami: {url: 'http://x/', max_per_second: 0}",
        "7: whoami.max_per_second: must be within",
    ),
    "unknown": ("whoami: {url: 'http://x/', cache: 5}", "7: whoami.cache: unknown key 'cache'"),
}


@pytest.mark.parametrize(("text", "expected"), SETTING_ERRORS.values(), ids=SETTING_ERRORS.keys())
def test_each_bad_setting_is_located(text: str, expected: str) -> None:
    base = POLICY.split(b"whoami:")[0]
    with pytest.raises(PolicyError) as caught:
        compile_policy(base + text.encode() + b"\n", "p.yaml")
    assert any(str(e).startswith(f"p.yaml:{expected}") for e in caught.value.errors), str(
        caught.value
    )


# -- in the handler -----------------------------------------------------------------------------


def notify(token: str) -> Notify:
    return Notify(
        1, 1, [Message("route", {"method": "GET", "path": "/sync", "auth": f"Bearer {token}"})]
    )


def key_of(payload: bytes) -> str | None:
    for action in decode_actions(payload, 0, len(payload)):
        if isinstance(action, SetVar) and action.name == "key":
            return str(action.value)
    return None


def holder_with(tmp_path: Path, text: bytes) -> PolicyHolder:
    path = tmp_path / "p.yaml"
    path.write_bytes(text)
    return PolicyHolder(str(path), settle=0)


def test_the_handler_answers_at_once_without_a_wait(tmp_path: Path) -> None:
    async def test() -> None:
        handler = RouteHandler(holder_with(tmp_path, POLICY))
        first = handler(notify(MAT))
        assert isinstance(first, bytes)
        assert handler.whoami.resolver is not None and handler.whoami.resolver.in_flight == 1
        await handler.close()

    run(test)


def test_with_a_wait_the_first_request_waits_for_the_lookup(tmp_path: Path) -> None:
    async def test() -> None:
        handler = RouteHandler(holder_with(tmp_path, POLICY + b"  wait: 50ms\n"))
        home = Homeserver({MAT: "alice", MAT2: "alice"})
        resolver = handler.whoami
        handler(notify("syt_YWxpY2U_x_y"))  # prepares the policy and its resolver
        assert resolver.resolver is not None
        resolver.resolver._fetch = home  # a fake homeserver behind the real handler
        waited = handler(notify(MAT))
        assert not isinstance(waited, bytes)
        alice = handler(notify("syt_YWxpY2U_x_y"))
        assert isinstance(alice, bytes)
        assert key_of(await waited) == key_of(alice)
        # A homeserver that does not answer costs the wait, no more.
        home.gate = asyncio.Event()
        slow = handler(notify(MAT2 + "x"))
        assert not isinstance(slow, bytes)
        loop = asyncio.get_running_loop()
        started = loop.time()
        payload = await slow
        assert 0.04 <= loop.time() - started < 0.5
        assert key_of(payload) not in (None, key_of(alice))  # its token key
        await handler.close()

    run(test)


def test_a_reload_keeps_the_cache_when_the_setting_stays(tmp_path: Path) -> None:
    async def test() -> None:
        holder = holder_with(tmp_path, POLICY)
        handler = RouteHandler(holder)
        handler(notify(MAT))
        first = handler.whoami.resolver
        (tmp_path / "p.yaml").write_bytes(POLICY.replace(b"'^/sync$'", b"'^/sync/?$'"))
        holder.reload()
        handler(notify(MAT))
        assert handler.whoami.resolver is first
        (tmp_path / "p.yaml").write_bytes(POLICY + b"  ttl: 10m\n")
        holder.reload()
        handler(notify(MAT))
        assert handler.whoami.resolver is not first
        (tmp_path / "p.yaml").write_bytes(POLICY.split(b"whoami:")[0])
        holder.reload()
        handler(notify(MAT))
        assert handler.whoami.resolver is None
        await handler.close()

    run(test)


# -- over real HTTP -------------------------------------------------------------------------------


def test_lookups_over_http_send_the_token_only_in_the_authorization_header() -> None:
    seen: list[HttpRequest] = []

    def answer(request: HttpRequest) -> HttpResponse:
        seen.append(request)
        if request.headers.get("authorization") == f"Bearer {MAT}":
            return HttpResponse(200, b'{"user_id": "@alice:example.org"}', "application/json")
        return HttpResponse(401, b'{"errcode": "M_UNKNOWN_TOKEN"}', "application/json")

    async def test() -> None:
        server = await HttpServer(answer).start("127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.port}/_matrix/client/v3/account/whoami"
        users = WhoamiResolver(WhoamiSpec(url=url), WhoamiStats())
        try:
            assert await users.lookup(MAT) == ("user", "alice")
            assert await users.lookup(MAT2) == ("unknown_token", None)
            assert users.user_for(MAT) == "alice"
        finally:
            await users.close()
            await server.stop()
        assert [r.target for r in seen] == ["/_matrix/client/v3/account/whoami"] * 2
        assert all(MAT not in r.target for r in seen)

    run(test)


def test_lookups_against_a_closed_port_fail_as_errors_and_route_on() -> None:
    async def test() -> None:
        users = WhoamiResolver(SPEC, WhoamiStats())  # port 1: nothing listens
        try:
            assert await users.lookup(MAT) == ("error", None)
        finally:
            await users.close()

    run(test)
