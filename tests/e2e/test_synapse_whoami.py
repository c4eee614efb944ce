"""Per-user keys from the homeserver's whoami, against the real Synapse.

Synapse's own ``syt_`` tokens are resolved as if they were opaque
(``resolve: all``), as MAS tokens would be: the agent asks Synapse's main
process who each new token is. Two devices of one user then meet on one
sync worker; a flood of unknown tokens costs Synapse at most the capped
number of lookups; and with the main process down, routing goes on by token.

This module runs last: its final test stops Synapse's main process.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import xxhash

from tests.e2e.conftest import Deployment, User, close_all, make_users, run

pytestmark = pytest.mark.e2e

SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
BODY = {"lists": {"all": {"ranges": [[0, 5]], "timeline_limit": 1, "required_state": []}}}
RATE = 5
USERS = 4


def agent_metric(
    deployment: Deployment, name: str, label: str, missing: float | None = None
) -> float:
    url = f"http://{deployment.router.agent_http}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            labels = line.partition("{")[2].partition("}")[0].split(",")
            if line.startswith(f"{name}{{") and set(label.split(",")) <= set(labels):
                return float(line.rsplit(" ", 1)[1])
    if missing is not None:
        return missing
    raise AssertionError(f"no {name} {label}")


def whoami_requests(deployment: Deployment) -> int:
    """Whoami requests Synapse's main process served (its access log)."""
    log = deployment.synapse.workdir / "main.log"
    return sum(
        1 for line in log.read_text(errors="replace").splitlines() if "/account/whoami" in line
    )


async def sync_with(session: aiohttp.ClientSession, url: str, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(
        f"{url}{SLIDING_SYNC}?timeout=0", json=BODY, headers=headers
    ) as response:
        await response.read()
        return response.status


@pytest.fixture(scope="module")
def whoami_policy(deployment: Deployment) -> Iterator[Path]:
    """The deployment's policy, now a site policy: synapse-workers plus whoami."""
    policy = deployment.router.policy
    original = policy.read_text()
    url = f"http://127.0.0.1:{deployment.synapse.main_port}/_matrix/client/v3/account/whoami"
    policy.write_text(
        "version: 1\nname: site\nextends: synapse-workers\n"
        f"whoami:\n  url: {url}\n  resolve: all\n  max_per_second: {RATE}\n"
        "  max_concurrent: 4\n  error_ttl: 1s\n"
    )
    deadline = time.monotonic() + 10
    while "site" not in json.dumps(status(deployment).get("policy")):
        assert time.monotonic() < deadline, "the site policy was not loaded"
        time.sleep(0.1)
    yield policy
    policy.write_text(original)


def status(deployment: Deployment) -> dict[str, object]:
    url = f"http://{deployment.router.agent_http}/status.json"
    with urllib.request.urlopen(url, timeout=5) as response:
        answer: dict[str, object] = json.loads(response.read())
        return answer


async def devices(url: str, prefix: str, count: int) -> list[tuple[User, User]]:
    """``count`` users, each logged in on two devices."""
    first = await make_users(url, prefix, count)
    pairs = []
    for user in first:
        second = User(type(user.client)(url, user.user_id), user.user_id)
        login = await second.client.login("correct horse battery staple", device_name="second")
        assert getattr(login, "access_token", None), login
        pairs.append((user, second))
    return pairs


def test_two_devices_of_a_user_meet_on_one_sync_worker_after_the_first_lookup(
    deployment: Deployment, whoami_policy: Path
) -> None:
    tokens: dict[str, list[str]] = {}

    token_keyed = 'rule="sliding_sync",key_kind="token"'
    before = agent_metric(deployment, "spoa_decisions_total", token_keyed, missing=0.0)

    async def scenario() -> None:
        pairs = await devices(deployment.url, "hank", USERS)
        for a, b in pairs:
            tokens[a.user_id] = [a.client.access_token, b.client.access_token]
        all_tokens = [t for pair in tokens.values() for t in pair]
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 20
            while agent_metric(deployment, "spoa_whoami_lookups_total", 'result="user"') < len(
                all_tokens
            ):
                assert time.monotonic() < deadline, "the tokens were not looked up"
                for token in all_tokens:
                    assert await sync_with(session, deployment.url, token) == 200
                await asyncio.sleep(0.3)
            mark.append(deployment.log_size())
            for _ in range(3):
                for token in all_tokens:
                    assert await sync_with(session, deployment.url, token) == 200
        await close_all([u for pair in pairs for u in pair])

    mark: list[int] = []
    run(scenario())
    lines = [x for x in deployment.settled_lines(mark[0]) if x.get("rule") == "sliding_sync"]
    assert len(lines) == 3 * 2 * USERS
    per_key: dict[str, set[str]] = defaultdict(set)
    for line in lines:
        assert line["status"] == "200", line
        per_key[line["key"]].add(deployment.worker_of(line))
    # One key per user, not per device, each on one worker: the user's key,
    # from whoami, since resolve: all gave the syt_ tokens token keys at first.
    assert agent_metric(deployment, "spoa_decisions_total", token_keyed) > before
    users = {str(xxhash.xxh32_intdigest(f"hank{n}#0".encode())) for n in range(USERS)}
    assert set(per_key) == users, per_key
    assert all(len(workers) == 1 for workers in per_key.values()), per_key


def test_a_flood_of_unknown_tokens_causes_at_most_the_capped_lookups(
    deployment: Deployment, whoami_policy: Path
) -> None:
    time.sleep(1.2)  # the rate budget refills, as after any quiet second
    before = whoami_requests(deployment)
    statuses: dict[int, int] = defaultdict(int)

    async def flood() -> float:
        connector = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(connector=connector) as session:
            slots = asyncio.Semaphore(32)

            async def one(n: int) -> None:
                async with slots:
                    statuses[await sync_with(session, deployment.url, f"mat_flood{n:05d}")] += 1

            started = time.monotonic()
            await asyncio.gather(*(one(n) for n in range(10_000)))
            return time.monotonic() - started

    elapsed = asyncio.run(flood())
    time.sleep(1)  # the access log of the last lookups
    lookups = whoami_requests(deployment) - before
    cap = RATE + RATE * (elapsed + 1)
    print(f"\n10,000 unknown tokens in {elapsed:.1f} s: {lookups} whoami lookups (cap {cap:.0f})")
    assert dict(statuses) == {401: 10_000}
    assert 0 < lookups <= cap


def test_with_the_main_process_down_routing_goes_on_by_token(
    deployment: Deployment, whoami_policy: Path
) -> None:
    statuses: list[int] = []
    fresh: list[User] = []

    async def login() -> None:
        fresh.extend(await make_users(deployment.url, "ivy", 3))

    async def traffic() -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(5):
                for user in fresh:
                    statuses.append(
                        await sync_with(session, deployment.url, user.client.access_token)
                    )
                await asyncio.sleep(0.2)
        await close_all(fresh)

    run(login())  # tokens the agent has never seen
    errors_before = agent_metric(deployment, "spoa_whoami_lookups_total", 'result="error"')
    deployment.synapse.stop_worker("main", signal.SIGKILL)
    mark = deployment.log_size()
    run(traffic())
    assert statuses and all(s == 200 for s in statuses), statuses
    lines = [x for x in deployment.settled_lines(mark) if x.get("rule") == "sliding_sync"]
    assert len(lines) == len(statuses)
    assert all(x["status"] == "200" and x["via"] == "agent" for x in lines)
    assert agent_metric(deployment, "spoa_whoami_lookups_total", 'result="error"') > errors_before
