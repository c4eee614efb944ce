"""The real Synapse deployment of the end-to-end suite, shared by its modules.

One deployment for the e2e package (PostgreSQL, Redis, Synapse's main
process and workers, HAProxy with the shipped configuration, the agent),
stopped once its last test has run, and the Matrix client helpers the tests
use.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nio import AsyncClient, LoginResponse, RegisterResponse, SyncResponse

from spoa.demo.ports import free_port
from spoa.demo.stack import Router
from tests.e2e.synapse import Postgres, Redis, Synapse
from tests.integration.stack_runner import StackRunner, log_fields

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery staple"


@dataclass
class Deployment:
    runner: StackRunner[Router]
    synapse: Synapse
    started: float
    url: str = ""
    #: HAProxy server slot ("be_synchrotron/w1") -> Synapse worker name.
    slots: dict[str, str] = field(default_factory=dict)

    @property
    def router(self) -> Router:
        return self.runner.stack

    def log_lines(self, since: int = 0) -> list[dict[str, str]]:
        return [log_fields(line) for line in self.runner.log_lines(since)]

    def log_size(self) -> int:
        return len(self.runner.log())

    def map_slots(self) -> None:
        """Which worker each HAProxy server slot holds (from the stats addresses)."""
        by_port = {str(port): name for name, port in self.synapse.ports.items()}
        by_port[str(self.synapse.main_port)] = "main"
        for row in self.router.stats():
            address = row.get("addr", "")
            if address:
                self.slots[f"{row['pxname']}/{row['svname']}"] = by_port.get(
                    address.rpartition(":")[2], address
                )

    def worker_of(self, line: dict[str, str]) -> str:
        return self.slots.get(line["backend_server"], line["backend_server"])

    def settled_lines(self, since: int = 0, quiet: float = 0.3) -> list[dict[str, str]]:
        """HAProxy's log lines after ``since``, once the log has stopped growing (bounded)."""
        deadline = time.monotonic() + 5
        size = self.log_size()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.log_size()
            if now == size:
                break
            size = now
        return self.log_lines(since)

    def wait_lines(
        self,
        since: int,
        wanted: Callable[[dict[str, str]], bool],
        count: int = 1,
        timeout: float = 10.0,
    ) -> list[dict[str, str]]:
        """HAProxy's log lines after ``since`` that ``wanted`` picks, once ``count`` are written.

        HAProxy writes a request's line after the response has left, so a
        client that has its answer may not find the line yet: wait, bounded.
        """
        deadline = time.monotonic() + timeout
        while True:
            lines = [x for x in self.log_lines(since) if x.get("via") and wanted(x)]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


@pytest.fixture(scope="package")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    started = time.monotonic()
    workdir = tmp_path_factory.mktemp("e2e")
    policy = workdir / "policy.yaml"
    shutil.copy(ROOT / "policies" / "synapse-workers.yaml", policy)
    port = free_port()
    postgres, redis = Postgres(), Redis()
    postgres.start()
    redis.start()
    synapse = Synapse(workdir / "synapse", f"http://127.0.0.1:{port}/", postgres, redis)
    router = Router(
        workdir=workdir / "router",
        policy=policy,
        port=port,
        stats_port=free_port(),
        agent_port=free_port(),
        agent_http=f"127.0.0.1:{free_port()}",
        check_inter="500ms",
        poll_interval=0.2,
    )
    runner = StackRunner(router)
    try:
        synapse.start()
        router.main_address = f"127.0.0.1:{synapse.main_port}"
        runner.call(router.start_dns())
        for worker_class, endpoints in synapse.endpoints().items():
            router.publish(worker_class, endpoints)
        router.start_agent()
        router.start_haproxy()
        expected = {c: len(e) for c, e in synapse.endpoints().items()}
        runner.call(router.wait_up(expected, 60))
        deployment = Deployment(runner, synapse, started, f"http://127.0.0.1:{port}")
        deployment.map_slots()
        yield deployment
    finally:
        elapsed = time.monotonic() - started
        rss = synapse.rss_bytes()
        runner.close()
        synapse.stop()
        redis.stop()
        postgres.stop()
        print(
            f"\ne2e: {elapsed:.0f} s from PostgreSQL start to teardown; "
            f"Synapse processes' resident memory {rss / 2**20:.0f} MiB at the end"
        )


# -- a client ------------------------------------------------------------------------------


@dataclass
class User:
    client: AsyncClient
    user_id: str
    syncs_ok: int = 0
    sync_errors: int = 0


async def make_users(url: str, prefix: str, count: int) -> list[User]:
    users = []
    for n in range(count):
        client = AsyncClient(url)
        registered = await client.register(f"{prefix}{n}", PASSWORD)
        assert isinstance(registered, RegisterResponse), registered
        await client.close()
        # A fresh client logs in, as a real one would after registering.
        client = AsyncClient(url, registered.user_id)
        login = await client.login(PASSWORD, device_name=f"{prefix}{n}")
        assert isinstance(login, LoginResponse), login
        users.append(User(client, login.user_id))
    return users


async def spread_over_sync_workers(
    deployment: Deployment, prefix: str, count: int, extra: int = 12
) -> list[User]:
    """``count`` users, and more (up to ``extra``) until both sync workers have one.

    Where a user's syncs land follows from the ring (the servers' addresses,
    here loopback ports picked at start): a handful of users all on one worker
    is a fair draw, not a fault, and a test of both workers needs users on each.
    """
    users = await make_users(deployment.url, prefix, count)
    for n in range(extra + 1):
        homes = await sync_homes(deployment, users)
        if len(set(homes.values())) > 1:
            return users
        users += await make_users(deployment.url, f"{prefix}more{n}", 1)
    raise AssertionError(f"{len(users)} users' syncs all on one worker: {homes}")


async def sync_homes(deployment: Deployment, users: list[User]) -> dict[str, str]:
    """The sync worker of each user (its key -> worker), from one incremental sync each."""
    mark = deployment.log_size()
    for user in users:
        if user.client.next_batch is None:
            assert isinstance(await user.client.sync(timeout=0), SyncResponse)
        response = await user.client.sync(timeout=0, since=user.client.next_batch)
        assert isinstance(response, SyncResponse), response
    lines = await asyncio.to_thread(
        deployment.wait_lines, mark, lambda x: x.get("rule") == "sync", len(users)
    )
    return {line["key"]: deployment.worker_of(line) for line in lines}


async def sync_loop(user: User, stop: asyncio.Event) -> None:
    """Long-polling incremental syncs until told to stop; failures are counted."""
    while not stop.is_set():
        response = await user.client.sync(timeout=1500, since=user.client.next_batch)
        if isinstance(response, SyncResponse):
            user.syncs_ok += 1
        else:
            user.sync_errors += 1
            await asyncio.sleep(0.2)


async def close_all(users: list[User]) -> None:
    for user in users:
        await user.client.close()


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 300))  # type: ignore[arg-type]
