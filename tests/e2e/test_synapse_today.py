"""End to end with what today's clients and deployments use, on a real Synapse.

Native sliding sync as Element X speaks it (initial request, then ``pos``
with long-polling), MSC4306 thread subscriptions written by their stream
writer, through the shipped HAProxy configuration and the agent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from typing import Any

import aiohttp
import pytest
from nio import RoomCreateResponse, RoomPreset, RoomSendResponse, SyncResponse

from tests.e2e.conftest import (
    Deployment,
    User,
    close_all,
    make_users,
    run,
    spread_over_sync_workers,
)

pytestmark = pytest.mark.e2e

SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
THREADS = "/_matrix/client/unstable/io.element.msc4306"
LISTS = {
    "lists": {
        "all": {"ranges": [[0, 20]], "timeline_limit": 1, "required_state": [["m.room.name", ""]]}
    }
}


async def sliding_sync(
    session: aiohttp.ClientSession, url: str, user: User, pos: str | None, timeout_ms: int
) -> dict[str, Any]:
    query = f"timeout={timeout_ms}" + (f"&pos={pos}" if pos else "")
    headers = {"Authorization": f"Bearer {user.client.access_token}"}
    async with session.post(f"{url}{SLIDING_SYNC}?{query}", json=LISTS, headers=headers) as r:
        body = await r.read()
        assert r.status == 200, (r.status, body[:300])
        answer: dict[str, Any] = json.loads(body)
        assert "pos" in answer, answer
        return answer


def test_native_sliding_sync_reaches_the_sync_workers_each_user_on_one(
    deployment: Deployment,
) -> None:
    mark = deployment.log_size()
    count = 0

    async def scenario() -> None:
        nonlocal count
        # Sliding sync is keyed by user as /sync is: users on both workers.
        users = await spread_over_sync_workers(deployment, "erin", 6)
        count = len(users)
        created = await users[0].client.room_create(name="ss", preset=RoomPreset.public_chat)
        assert isinstance(created, RoomCreateResponse), created
        for user in users[1:]:
            await user.client.join(created.room_id)
        async with aiohttp.ClientSession() as session:
            # Initial requests, then incremental ones with the position.
            positions = {}
            for user in users:
                first = await sliding_sync(session, deployment.url, user, None, 0)
                assert created.room_id in first.get("rooms", {}), first
                positions[user.user_id] = first["pos"]
            for user in users:
                answer = await sliding_sync(
                    session, deployment.url, user, positions[user.user_id], 0
                )
                positions[user.user_id] = answer["pos"]
            # Long-polls, woken by a message sent through the event creator.
            loop = asyncio.get_running_loop()
            started = loop.time()
            polls = [
                asyncio.create_task(
                    sliding_sync(session, deployment.url, u, positions[u.user_id], 20000)
                )
                for u in users
            ]
            await asyncio.sleep(1)
            sent = await users[0].client.room_send(
                created.room_id, "m.room.message", {"msgtype": "m.text", "body": "wake up"}
            )
            assert isinstance(sent, RoomSendResponse), sent
            woken = await asyncio.gather(*polls)
            assert loop.time() - started < 15, "the long-polls were not woken"
            for answer in woken:
                assert created.room_id in answer.get("rooms", {}), answer
        # A v2 sync of the same user goes to the same worker.
        for user in users:
            assert isinstance(await user.client.sync(timeout=0), SyncResponse)
            incremental = await user.client.sync(timeout=0, since=user.client.next_batch)
            assert isinstance(incremental, SyncResponse)
        await close_all(users)

    run(scenario())
    lines = [x for x in deployment.settled_lines(mark) if x.get("via")]
    sliding = [x for x in lines if x["path"].startswith(SLIDING_SYNC)]
    assert len(sliding) == count * 3
    per_user: dict[str, set[str]] = defaultdict(set)
    for line in sliding:
        assert (line["via"], line["class"], line["rule"]) == (
            "agent",
            "synchrotron",
            "sliding_sync",
        )
        assert line["status"] == "200", line
        per_user[line["key"]].add(deployment.worker_of(line))
    assert len(per_user) == count
    assert all(len(w) == 1 for w in per_user.values()), per_user
    assert set().union(*per_user.values()) == {"synchrotron-1", "synchrotron-2"}
    v2 = [x for x in lines if x["rule"] == "sync"]
    assert len(v2) >= count * 2
    for line in v2:
        assert {deployment.worker_of(line)} == per_user[line["key"]], line


def test_thread_subscriptions_reach_their_stream_writer(deployment: Deployment) -> None:
    mark = deployment.log_size()
    results: list[tuple[str, int, bytes]] = []

    async def scenario() -> None:
        (user,) = await make_users(deployment.url, "frieda", 1)
        created = await user.client.room_create(name="threads", preset=RoomPreset.public_chat)
        assert isinstance(created, RoomCreateResponse), created
        root = await user.client.room_send(
            created.room_id, "m.room.message", {"msgtype": "m.text", "body": "a thread root"}
        )
        assert isinstance(root, RoomSendResponse), root
        target = f"{deployment.url}{THREADS}/rooms/{created.room_id}/thread/{root.event_id}"
        headers = {"Authorization": f"Bearer {user.client.access_token}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            for method in ("PUT", "GET", "DELETE"):
                async with session.request(
                    method, f"{target}/subscription", json={} if method == "PUT" else None
                ) as response:
                    results.append((method, response.status, await response.read()))
        await close_all([user])

    run(scenario())
    assert [(m, s) for m, s, _ in results] == [("PUT", 200), ("GET", 200), ("DELETE", 200)], results
    assert json.loads(results[1][2]) == {"automatic": False}
    lines = deployment.wait_lines(mark, lambda x: x["path"].startswith(THREADS), count=3)
    assert len(lines) == 3
    for line in lines:
        assert (line["class"], line["rule"]) == ("thread_subscriptions", "thread_subscriptions")
        assert deployment.worker_of(line) == "thread_subscriptions-1", line


def test_sliding_sync_long_polls_stay_up_while_they_wait(deployment: Deployment) -> None:
    """A long-poll held for its whole timeout is answered, not cut by HAProxy or the agent."""

    async def scenario() -> None:
        (user,) = await make_users(deployment.url, "gus", 1)
        async with aiohttp.ClientSession() as session:
            first = await sliding_sync(session, deployment.url, user, None, 0)
            started = time.monotonic()
            again = await sliding_sync(session, deployment.url, user, first["pos"], 3000)
            assert 2.5 < time.monotonic() - started < 10
            assert again["pos"]
        await close_all([user])

    run(scenario())


def test_every_stream_writer_of_deploy_synapse_answers_its_own_requests(
    deployment: Deployment,
) -> None:
    """deploy/synapse/ as shipped: each stream's requests reach its writer, which accepts them."""
    mark = deployment.log_size()
    results: dict[str, tuple[int, bytes]] = {}

    async def scenario() -> None:
        (user,) = await make_users(deployment.url, "hedy", 1)
        created = await user.client.room_create(name="writers", preset=RoomPreset.public_chat)
        assert isinstance(created, RoomCreateResponse), created
        sent = await user.client.room_send(
            created.room_id, "m.room.message", {"msgtype": "m.text", "body": "read me"}
        )
        assert isinstance(sent, RoomSendResponse), sent
        me, room = user.user_id, created.room_id
        client = f"{deployment.url}/_matrix/client/v3"
        calls = {
            "typing": ("PUT", f"rooms/{room}/typing/{me}", {"typing": True, "timeout": 1000}),
            "to_device": ("PUT", "sendToDevice/m.spoa.test/t1", {"messages": {me: {"*": {}}}}),
            "account_data": ("PUT", f"user/{me}/account_data/m.spoa.test", {"a": 1}),
            "receipts": ("POST", f"rooms/{room}/receipt/m.read/{sent.event_id}", {}),
            "presence": ("PUT", f"presence/{me}/status", {"presence": "online"}),
            "push_rules": ("PUT", f"pushrules/global/room/{room}", {"actions": []}),
            "device_lists": ("PUT", f"devices/{user.client.device_id}", {"display_name": "x"}),
        }
        headers = {"Authorization": f"Bearer {user.client.access_token}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            for stream, (method, path, body) in calls.items():
                async with session.request(method, f"{client}/{path}", json=body) as response:
                    results[stream] = (response.status, await response.read())
        await close_all([user])

    run(scenario())
    assert {s: status for s, (status, _) in results.items()} == dict.fromkeys(results, 200), results
    lines = deployment.wait_lines(mark, lambda x: x["class"] in results, count=len(results))
    assert {line["class"] for line in lines} == set(results)
    for line in lines:
        assert line["status"] == "200", line
        assert deployment.worker_of(line) == f"{line['class']}-1", line


def test_synapse_learns_the_scheme_from_haproxy(deployment: Deployment) -> None:
    """X-Forwarded-Proto reaches every process: none assumes https for lack of it."""
    logs = sorted(deployment.synapse.workdir.glob("*.log"))
    assert len(logs) >= 20
    complaining = [p.name for p in logs if "lacks an x-forwarded-proto" in p.read_text()]
    assert complaining == []
