"""Per-user keys for opaque tokens, through real HAProxy and the agent.

The shipped haproxy.cfg, the agent with a site policy that extends the
bundled synapse-workers and asks a homeserver's whoami (a demo worker that
knows the demo's opaque ``mat_`` tokens), and demo workers for every class.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoa.demo.client import send_all
from spoa.demo.ports import free_port
from spoa.demo.stack import DemoStack
from spoa.demo.workers import DemoWorker, WorkerSpec
from spoa.traffic import TrafficRequest, mas_token
from tests.integration.stack_runner import StackRunner, running_stack

pytestmark = pytest.mark.integration

RATE = 5
SS = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"


def sync(token: str, sliding: bool = False) -> TrafficRequest:
    if sliding:
        return TrafficRequest("sync", "POST", SS, "pos=1", {"Authorization": f"Bearer {token}"})
    return TrafficRequest(
        "sync", "GET", "/_matrix/client/v3/sync", "since=s1", {"Authorization": f"Bearer {token}"}
    )


class Site:
    def __init__(
        self, runner: StackRunner[DemoStack], homeserver: DemoWorker, policy: Path
    ) -> None:
        self.runner = runner
        self.homeserver = homeserver
        self.policy = policy

    def workers(self, requests: list[TrafficRequest]) -> list[str]:
        outcomes = send_all(self.runner.stack.port, requests, concurrency=8)
        assert all(o.status == 200 for o in outcomes), [o for o in outcomes if o.status != 200]
        return [o.worker for o in outcomes]

    def metric(self, name: str, label: str) -> float:
        import urllib.request

        url = f"http://{self.runner.stack.agent_http}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith(f"{name}{{") and label in line:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {name} {label} in the metrics")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("whoami")
    port = free_port()
    policy = workdir / "site.yaml"
    policy.write_text(
        "version: 1\n"
        "extends: synapse-workers\n"
        "whoami:\n"
        f"  url: http://127.0.0.1:{port}/_matrix/client/v3/account/whoami\n"
        f"  max_per_second: {RATE}\n"
        "  error_ttl: 1s\n"
    )
    with running_stack(workdir, policy) as runner:
        homeserver = runner.call(DemoWorker(WorkerSpec("hs-1", "hs", "127.0.0.1", port)).start())
        try:
            yield Site(runner, homeserver, policy)
        finally:
            runner.call(homeserver.stop())


def test_two_devices_of_one_user_reach_one_sync_worker_after_the_first_lookup(site: Site) -> None:
    rng = random.Random(3)
    # Alice's devices, and enough other users that token keys would spread.
    alice = [mas_token("alice", rng) for _ in range(4)]
    others = [mas_token(f"user{n}", rng) for n in range(12)]
    # First sight: token keys, and lookups start, as many at once as the
    # caps allow; the tokens not looked up yet are at their next requests.
    deadline = time.monotonic() + 15
    while site.homeserver.whoami_requests < len(alice + others):
        assert time.monotonic() < deadline, site.homeserver.whoami_requests
        site.workers([sync(t) for t in alice + others])
        time.sleep(0.2)
    # From now on, by user: every device of alice on one worker, v2 or sliding sync.
    served = site.workers([sync(t, sliding) for t in alice for sliding in (False, True)] * 3)
    assert len(set(served)) == 1, served
    assert all(w.startswith("synchrotron-") for w in served)
    spread = set(site.workers([sync(t) for t in others]))
    assert len(spread) > 1, "users spread over the sync workers"
    assert site.metric("spoa_whoami_lookups_total", 'result="user"') >= len(alice + others)
    assert site.metric("spoa_whoami_cache_requests_total", 'result="hit"') >= len(served)


def test_a_flood_of_unknown_tokens_causes_at_most_the_capped_lookups(site: Site) -> None:
    time.sleep(1.5)  # a full budget, as after any quiet second
    before = site.homeserver.whoami_requests
    started = time.monotonic()
    flood = [sync(f"mat_flood{n:05d}") for n in range(10_000)]
    workers = site.workers(flood)
    elapsed = time.monotonic() - started
    time.sleep(0.5)  # lookups started last may still be answering
    lookups = site.homeserver.whoami_requests - before
    assert len(workers) == 10_000
    cap = RATE + RATE * (elapsed + 0.5)
    print(f"\n10,000 unknown tokens in {elapsed:.1f} s: {lookups} lookups (cap {cap:.0f})")
    assert 0 < lookups <= cap
    skipped = site.metric("spoa_whoami_lookups_skipped_total", 'reason="rate_limited"')
    assert skipped >= 10_000 - lookups - 4 * RATE


def test_with_the_homeserver_down_routing_goes_on_by_token(site: Site) -> None:
    rng = random.Random(9)
    site.runner.call(site.homeserver.stop())
    try:
        tokens = [mas_token("dora", rng) for _ in range(6)]
        for _ in range(3):
            served = site.workers([sync(t) for t in tokens])
            assert all(w.startswith("synchrotron-") for w in served)
            time.sleep(0.3)
        assert site.metric("spoa_whoami_lookups_total", 'result="error"') >= 1
    finally:
        site.runner.call(site.homeserver.start())
    # Back up: after error_ttl the tokens are looked up again and meet on one worker.
    deadline = time.monotonic() + 15
    while len(set(site.workers([sync(t) for t in tokens]))) != 1:
        assert time.monotonic() < deadline, "dora's devices never met again"
        time.sleep(0.5)


def test_no_token_appears_in_the_agents_log_metrics_or_status(site: Site) -> None:
    import urllib.request

    stack = site.runner.stack
    pages = []
    for path in ("/metrics", "/status.json", "/"):
        with urllib.request.urlopen(f"http://{stack.agent_http}{path}", timeout=5) as response:
            pages.append(response.read().decode())
    log = (stack.workdir / "agent.log").read_text()
    for text in (*pages, log):
        assert "mat_" not in text
    assert "whoami" in pages[2] and "users" in pages[2]
