"""End to end: a real Synapse with workers behind the shipped HAProxy config and the agent.

A real Matrix client (matrix-nio) registers, logs in, creates and joins rooms,
sends messages, types, sends receipts, uploads and downloads media, syncs
(initial and long-polling incremental) and paginates, all through HAProxy;
HAProxy's log then shows where each request went. Then the suite stops a
sync worker and starts it again, kills the agent and brings it back, and
edits the policy, while the client keeps going.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections import defaultdict

import pytest
from nio import (
    JoinResponse,
    MemoryDownloadResponse,
    RoomCreateResponse,
    RoomMessagesResponse,
    RoomPreset,
    RoomSendResponse,
    RoomTypingResponse,
    SyncResponse,
    UpdateReceiptMarkerResponse,
    UploadResponse,
)

from tests.e2e.conftest import (
    Deployment,
    close_all,
    make_users,
    run,
    spread_over_sync_workers,
    sync_loop,
)
from tests.e2e.synapse import WORKERS

pytestmark = pytest.mark.e2e

USERS = 6


# -- the client's whole session ------------------------------------------------------------


def test_every_client_operation_succeeds_and_lands_where_the_policy_says(
    deployment: Deployment,
) -> None:
    since = deployment.log_size()
    everyone: list[str] = []

    async def session() -> None:
        users = await spread_over_sync_workers(deployment, "alice", USERS)
        everyone.extend(u.user_id for u in users)
        owner = users[0]
        rooms = []
        for n in range(3):
            created = await owner.client.room_create(
                name=f"room {n}", preset=RoomPreset.public_chat
            )
            assert isinstance(created, RoomCreateResponse), created
            rooms.append(created.room_id)
        for user in users[1:]:
            for room in rooms:
                joined = await user.client.join(room)
                assert isinstance(joined, JoinResponse), joined
        # Initial syncs, then long-polling incremental ones in the background.
        for user in users:
            first = await user.client.sync(timeout=0, full_state=True)
            assert isinstance(first, SyncResponse), first
        stop = asyncio.Event()
        loops = [asyncio.create_task(sync_loop(u, stop)) for u in users]
        last_events: dict[str, str] = {}
        for turn in range(4):
            for user in users:
                room = rooms[(turn + users.index(user)) % len(rooms)]
                typing = await user.client.room_typing(room, True, timeout=3000)
                assert isinstance(typing, RoomTypingResponse), typing
                sent = await user.client.room_send(
                    room, "m.room.message", {"msgtype": "m.text", "body": f"hello {turn}"}
                )
                assert isinstance(sent, RoomSendResponse), sent
                last_events[room] = sent.event_id
        for user in users:
            for room, event_id in last_events.items():
                receipt = await user.client.update_receipt_marker(room, event_id)
                assert isinstance(receipt, UpdateReceiptMarkerResponse), receipt
        uploaded, _ = await owner.client.upload(
            lambda *_: b"not really a cat picture", "image/png", "cat.png", filesize=24
        )
        assert isinstance(uploaded, UploadResponse), uploaded
        for user in users[:3]:
            downloaded = await user.client.download(mxc=uploaded.content_uri)
            assert isinstance(downloaded, MemoryDownloadResponse), downloaded
            assert downloaded.body == b"not really a cat picture"
        # Authenticated media too (Matrix 1.11).
        server, media_id = uploaded.content_uri.removeprefix("mxc://").split("/")
        request = urllib.request.Request(
            f"{deployment.url}/_matrix/client/v1/media/download/{server}/{media_id}",
            headers={"Authorization": f"Bearer {owner.client.access_token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.read() == b"not really a cat picture"
        for user in users:
            for room in rooms:
                page = await user.client.room_messages(room, limit=5)
                assert isinstance(page, RoomMessagesResponse), page
                assert page.chunk
        await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*loops)
        for user in users:
            assert user.syncs_ok >= 2 and user.sync_errors == 0, (user.user_id, user)
        await close_all(users)

    run(session())
    lines = [x for x in deployment.settled_lines(since) if x.get("via")]
    assert len(lines) > 200

    # Every request was answered by Synapse through the class the agent named.
    classes_with_workers = {w.worker_class for w in WORKERS}
    for line in lines:
        assert line["via"] == "agent", line
        assert line["status"].startswith(("2", "3")), line
        backend, _, server = line["backend_server"].partition("/")
        assert backend == f"be_{line['class']}", line
        if line["class"] in classes_with_workers:
            assert server != "main", f"a worker of {line['class']} was up: {line}"
            worker = deployment.worker_of(line)
            assert any(w.name == worker and w.worker_class == line["class"] for w in WORKERS)
        else:
            assert server == "main", line
    rules = {line["rule"] for line in lines}
    assert {
        "room_creation",
        "sync",
        "initial_sync",
        "event_sending",
        "room_messages",
        "typing",
        "receipts",
        "media",
        "client_reader",
    } <= rules, rules

    # Each user's incremental syncs on one sync worker; both workers used.
    per_user: dict[str, set[str]] = defaultdict(set)
    for line in lines:
        if line["rule"] == "sync":
            per_user[line["key"]].add(deployment.worker_of(line))
    assert len(per_user) == len(everyone)
    assert all(len(workers) == 1 for workers in per_user.values()), per_user
    assert {next(iter(w)) for w in per_user.values()} == {"synchrotron-1", "synchrotron-2"}

    # Room creations on the event creator, keyed by their user.
    creations = [x for x in lines if x["rule"] == "room_creation"]
    assert len(creations) == 3 and len({x["key"] for x in creations}) == 1, creations
    assert all(deployment.worker_of(x) == "event_creator-1" for x in creations)

    # One room's sends on one event creator.
    per_room: dict[str, set[str]] = defaultdict(set)
    for line in lines:
        if line["rule"] == "event_sending" and "/send/" in line["path"]:
            per_room[line["key"]].add(deployment.worker_of(line))
    assert len(per_room) == 3
    assert all(workers == {"event_creator-1"} for workers in per_room.values())

    # Media on the media repository, and only there.
    media = [x for x in lines if "/media/" in x["path"]]
    assert len(media) >= 5
    assert all(deployment.worker_of(x) == "media_repository-1" for x in media)
    assert all(x["rule"] == "media" for x in media)
    assert all(
        "/media/" not in x["path"] for x in lines if deployment.worker_of(x) != "media_repository-1"
    )


def test_a_stopped_sync_worker_hands_its_users_over_and_gets_them_back(
    deployment: Deployment,
) -> None:
    synapse = deployment.synapse

    async def scenario() -> None:
        users = await spread_over_sync_workers(deployment, "bob", USERS)

        async def phase(seconds: float) -> tuple[int, dict[str, set[str]]]:
            mark = deployment.log_size()
            before_ok = sum(u.syncs_ok for u in users)
            stop = asyncio.Event()
            loops = [asyncio.create_task(sync_loop(u, stop)) for u in users]
            await asyncio.sleep(seconds)
            stop.set()
            await asyncio.gather(*loops)
            where: dict[str, set[str]] = defaultdict(set)
            for line in deployment.settled_lines(mark):
                if line.get("rule") == "sync" and line["status"] == "200":
                    where[line["key"]].add(deployment.worker_of(line))
            return sum(u.syncs_ok for u in users) - before_ok, where

        _, home = await phase(3)
        assert len(home) == len(users) and all(len(w) == 1 for w in home.values()), home
        on_sync1 = {key for key, w in home.items() if w == {"synchrotron-1"}}
        assert on_sync1 and len(on_sync1) < len(users), "both sync workers must have users"

        synapse.stop_worker("synchrotron-1")
        await asyncio.sleep(1.5)  # let the health check mark sync1 down
        ok, moved = await phase(4)
        assert ok >= len(users)
        assert all(w == {"synchrotron-2"} for w in moved.values()), moved

        synapse.start_worker("synchrotron-1")
        synapse.wait_worker("synchrotron-1")
        await asyncio.sleep(2)  # rise 2 x 500 ms
        _, back = await phase(4)
        for key, workers in back.items():
            assert workers == home[key], (key, workers, home[key])
        await close_all(users)

    run(scenario())


def test_the_client_notices_nothing_when_the_agent_dies_and_it_comes_back(
    deployment: Deployment,
) -> None:
    router = deployment.router

    async def scenario() -> None:
        users = await make_users(deployment.url, "carol", 3)
        created = await users[0].client.room_create(name="outage", preset=RoomPreset.public_chat)
        assert isinstance(created, RoomCreateResponse)
        room = created.room_id
        for user in users[1:]:
            assert isinstance(await user.client.join(room), JoinResponse)
        for user in users:
            assert isinstance(await user.client.sync(timeout=0), SyncResponse)
        stop = asyncio.Event()
        loops = [asyncio.create_task(sync_loop(u, stop)) for u in users]
        await asyncio.sleep(1)

        mark = deployment.log_size()
        router.stop_agent(signal.SIGKILL)
        for n in range(10):
            for user in users:
                sent = await user.client.room_send(
                    room, "m.room.message", {"msgtype": "m.text", "body": f"outage {n}"}
                )
                assert isinstance(sent, RoomSendResponse), sent
            page = await users[n % 3].client.room_messages(room, limit=5)
            assert isinstance(page, RoomMessagesResponse), page
            await asyncio.sleep(0.1)
        outage = [x for x in deployment.settled_lines(mark) if x.get("via")]
        assert any(x["via"] == "fallback" for x in outage)
        assert all(x["status"].startswith(("2", "3")) for x in outage), outage

        router.start_agent()
        deployment.runner.wait_agent("UP")
        mark = deployment.log_size()
        sent = await users[0].client.room_send(
            room, "m.room.message", {"msgtype": "m.text", "body": "agent back"}
        )
        assert isinstance(sent, RoomSendResponse)
        stop.set()
        await asyncio.gather(*loops)
        assert all(u.sync_errors == 0 for u in users), [u.sync_errors for u in users]
        # (Long-polls begun during the outage end later: look at the send.)
        after = deployment.wait_lines(mark, lambda x: x.get("rule", "").endswith("sending"))
        assert after and after[-1]["via"] == "agent", after
        await close_all(users)

    run(scenario())


def test_editing_the_policy_moves_requests_with_no_reload(deployment: Deployment) -> None:
    router = deployment.router
    policy = router.policy
    haproxy_pid = router.haproxy.pid if router.haproxy else 0
    synapse_pids = {name: proc.pid for name, proc in deployment.synapse.procs.items()}

    async def scenario() -> None:
        (user,) = await make_users(deployment.url, "dave", 1)
        created = await user.client.room_create(name="policy edit", preset=RoomPreset.public_chat)
        assert isinstance(created, RoomCreateResponse)
        room = created.room_id
        mark = deployment.log_size()
        assert isinstance(await user.client.room_messages(room, limit=5), RoomMessagesResponse)
        (before,) = deployment.wait_lines(mark, lambda x: x.get("rule") == "room_messages")
        assert deployment.worker_of(before) == "client_reader-1"

        text = policy.read_text()
        policy.write_text(
            text.replace(
                "  - name: room_messages\n    class: client_reader",
                "  - name: room_messages\n    class: event_creator",
            )
        )
        deadline = time.monotonic() + 15
        while True:
            mark = deployment.log_size()
            page = await user.client.room_messages(room, limit=5)
            assert isinstance(page, RoomMessagesResponse), page
            (line,) = deployment.wait_lines(mark, lambda x: x.get("rule") == "room_messages")
            if deployment.worker_of(line) == "event_creator-1":
                break
            assert time.monotonic() < deadline, "the policy edit was not applied"
            await asyncio.sleep(0.2)
        assert line["class"] == "event_creator"
        policy.write_text(text)
        await close_all([user])

    run(scenario())
    assert router.haproxy is not None and router.haproxy.pid == haproxy_pid
    assert router.haproxy.poll() is None
    assert {n: p.pid for n, p in deployment.synapse.procs.items()} == {
        **synapse_pids,
        "synchrotron-1": deployment.synapse.procs["synchrotron-1"].pid,
    }
