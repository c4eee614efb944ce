"""Several routers of the shipped configuration send each key to the same worker.

A deployment runs two or more routers (HAProxy with the shipped haproxy.cfg
and its own agent, one pair a pod) behind one Service, and a client's
requests reach any of them. Here each router has its own DNS view of one set
of worker pods (:mod:`spoa.demo.fleet`): shown them in another order, started
after a rolling restart it did not see, restarted while a pod came back on a
new address or while the pods were scaled up and down, or routing by its
fallback. For users on sync workers, rooms on event creators and remote
servers on inbound federation workers, every router must pick the same pod.

On HAProxy 3.0 and later a pod's place on the ring comes from its address
(``hash-key addr-port``), whatever the router lived through. HAProxy 2.6 has
no ``hash-key``: places come from server-template's slot numbers, which
follow each router's history. There routers that learned the same pods
together agree, in whatever order DNS listed them (the first tests, on every
version); the tests of divergent histories check every answer as elsewhere,
then report how many keys still met and end as expected failures.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from spoa.demo.client import Client
from spoa.demo.fleet import HASHED, Fleet, Pod
from spoa.demo.stack import Router, haproxy_at_least, haproxy_version
from spoa.traffic import TrafficRequest, one_per_key
from tests.integration.stack_runner import log_fields

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "policies" / "synapse-workers.yaml"
PODS = 6
KEYS = 150
REQUESTS: dict[str, list[TrafficRequest]] = {
    worker_class: one_per_key(kind, KEYS, seed=22) for worker_class, kind in HASHED.items()
}

#: Where each request went, by class: the address of the pod that answered.
Placement = dict[str, list[str]]


def _place_class(router: Router, worker_class: str) -> list[str]:
    # One request at a time on one connection: bounded load
    # (hash-balance-factor on be_event_creator) moves a key to the next pod
    # when its own already serves its share of the requests in flight, which
    # at one request in flight is one.
    client = Client(router.port)
    addresses = []
    try:
        for request in REQUESTS[worker_class]:
            outcome = client.send(request)
            assert outcome.status == 200, (router.workdir.name, request.target, outcome.status)
            assert outcome.worker_class == worker_class, (request.target, outcome)
            addresses.append(outcome.address)
    finally:
        client.close()
    return addresses


def place(router: Router) -> Placement:
    """Every request of :data:`REQUESTS` through ``router`` (classes side by side)."""
    with ThreadPoolExecutor(len(HASHED)) as pool:
        futures = {c: pool.submit(_place_class, router, c) for c in HASHED}
        return {c: future.result() for c, future in futures.items()}


def via(router: Router, since: int = 0) -> dict[str, int]:
    """How many requests ``router`` logged (from byte ``since`` of its log) as decided by
    the agent, by the fallback, or by neither."""
    with (router.workdir / "haproxy.log").open("rb") as log:
        log.seek(since)
        lines = log.read().decode(errors="replace").splitlines()
    found = Counter(fields["via"] for fields in map(log_fields, lines) if "via" in fields)
    return {who: found[who] for who in ("agent", "fallback", "-")}


def log_size(router: Router) -> int:
    return (router.workdir / "haproxy.log").stat().st_size


def shares(placements: Sequence[Placement]) -> dict[str, float]:
    """Per class, the share of keys every router sent to the pod the first one chose."""
    first, *others = placements
    return {
        c: sum(all(p[c][n] == first[c][n] for p in others) for n in range(KEYS)) / KEYS
        for c in HASHED
    }


def assert_spread(fleet: Fleet, placement: Placement) -> None:
    """Keys reach every pod of their class: hashing by key, not one pod for all."""
    for worker_class, addresses in placement.items():
        assert set(addresses) == {p.address for p in fleet.pods[worker_class]}, worker_class


def slots(fleet: Fleet, router: Router) -> dict[str, dict[str, str]]:
    """Per class, the slot (w1, w2, ...) each pod's address holds on ``router``."""
    return {c: {s.address: s.name for s in fleet.slots(router, c) if s.address} for c in HASHED}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), POLICY)
    try:
        fleet.start_main()
        for worker_class in HASHED:
            for _ in range(PODS):
                fleet.add_pod(worker_class)
        yield fleet
    finally:
        fleet.close()


class TestRoutersThatLearnedThePodsTogether:
    """Three routers started together, each shown the pods in its own order."""

    @pytest.fixture(scope="class")
    @classmethod
    def routers(cls, fleet: Fleet) -> Iterator[list[Router]]:
        shuffled = random.Random(3).sample
        orders = {
            "listed": list,
            "reversed": lambda pods: list(reversed(pods)),
            "shuffled": lambda pods: shuffled(pods, len(pods)),
        }
        routers = []
        for name, order in orders.items():
            router = fleet.router(f"together-{name}")
            fleet.show(router, order)
            fleet.start(router)
            routers.append(router)
        for router in routers:
            fleet.wait_settled(router)
        yield routers
        for router in routers:
            fleet.stop(router)

    def test_routers_shown_the_pods_in_other_orders_send_every_key_to_one_pod(
        self, fleet: Fleet, routers: list[Router]
    ) -> None:
        placements = [place(r) for r in routers]
        assert_spread(fleet, placements[0])
        assert shares(placements) == {c: 1.0 for c in HASHED}
        assert all(via(r)["fallback"] == via(r)["-"] == 0 for r in routers)

    def test_a_router_on_its_fallback_sends_every_key_where_the_agents_do(
        self, fleet: Fleet, routers: list[Router]
    ) -> None:
        listed, _, on_fallback = routers
        fleet.stop_agent(on_fallback)
        fleet.wait(on_fallback, lambda: not fleet.agent_up(on_fallback), "its agent DOWN")
        mark = log_size(on_fallback)
        placements = [place(listed), place(on_fallback)]
        assert shares(placements) == {c: 1.0 for c in HASHED}
        # HAProxy logs a request once it has answered it, and drops a line
        # now and then when two threads log at once (its DroppedLogs).
        sent = KEYS * len(HASHED)
        fleet.wait(
            on_fallback,
            lambda: sum(via(on_fallback, mark).values()) >= sent * 0.98,
            "a log line for the requests",
            timeout=10,
        )
        logged = via(on_fallback, mark)
        assert (logged["agent"], logged["-"]) == (0, 0), logged


class TestRoutersWithOtherHistories:
    """One router lives through every change of the pods; the other restarts across it.

    Each test stops the second router, changes the pods, waits until the first
    has followed (a vanished pod's slot is freed after ``hold obsolete``),
    starts the second again and compares. The slots must really differ between
    the two, or the test would prove nothing.
    """

    @pytest.fixture(scope="class")
    @classmethod
    def pair(cls, fleet: Fleet) -> Iterator[tuple[Router, Router]]:
        lived, restarted = fleet.router("lived"), fleet.router("restarted")
        for router in (lived, restarted):
            fleet.show(router)
            fleet.start(router)
        for router in (lived, restarted):
            fleet.wait_settled(router)
        assert shares([place(lived), place(restarted)]) == {c: 1.0 for c in HASHED}
        yield lived, restarted
        for router in (lived, restarted):
            fleet.stop(router)

    def compare(self, fleet: Fleet, lived: Router, restarted: Router, what: str) -> None:
        fleet.wait_settled(lived)
        fleet.show(restarted)
        fleet.start(restarted)
        fleet.wait_settled(restarted)
        assert slots(fleet, lived) != slots(fleet, restarted), "the histories did not diverge"
        placements = [place(lived), place(restarted)]
        assert_spread(fleet, placements[0])
        met = shares(placements)
        if not haproxy_at_least(3, 0):
            figures = ", ".join(f"{c} {share:.0%}" for c, share in met.items())
            pytest.xfail(
                f"HAProxy {haproxy_version()} has no hash-key: after {what}, keys on the "
                f"same pod through both routers: {figures}"
            )
        assert met == {c: 1.0 for c in HASHED}

    def test_a_router_started_after_a_rolling_restart_agrees_with_one_that_lived_it(
        self, fleet: Fleet, pair: tuple[Router, Router]
    ) -> None:
        lived, restarted = pair
        fleet.stop(restarted)
        # maxSurge 1: a new pod per class, seen UP, then an old one deleted.
        for step in range(PODS):
            old = {c: fleet.pods[c][0] for c in HASHED}
            new = [fleet.add_pod(c) for c in HASHED]
            fleet.show(lived)
            fleet.wait(lived, partial(fleet.serving, lived, new), f"step {step}'s new pods")
            for pod in old.values():
                fleet.remove_pod(pod)
            fleet.show(lived)
        self.compare(fleet, lived, restarted, "a rolling restart")

    def test_a_router_restarted_while_a_pod_came_back_on_a_new_address_agrees(
        self, fleet: Fleet, pair: tuple[Router, Router]
    ) -> None:
        lived, restarted = pair
        fleet.stop(restarted)
        gone = [fleet.pods[c][PODS // 2] for c in HASHED]
        for pod in gone:
            fleet.remove_pod(pod)
        fleet.show(lived)
        fleet.wait_settled(lived)
        back = [fleet.add_pod(pod.worker_class) for pod in gone]
        assert {p.host for p in back}.isdisjoint(p.host for p in gone)
        fleet.show(lived)
        self.compare(fleet, lived, restarted, "a pod back on a new address")

    def test_a_router_restarted_across_a_scale_up_and_down_agrees(
        self, fleet: Fleet, pair: tuple[Router, Router]
    ) -> None:
        lived, restarted = pair
        fleet.stop(restarted)
        # Two more a class: be_event_creator and be_federation_inbound have 8 slots.
        added: list[Pod] = [fleet.add_pod(c) for c in HASHED for _ in range(2)]
        fleet.show(lived)
        fleet.wait(lived, lambda: fleet.serving(lived, added), "the pods scaled up")
        # Scaled down to the count it started from, not by the pods just added.
        for worker_class in HASHED:
            for pod in fleet.pods[worker_class][:2]:
                fleet.remove_pod(pod)
        fleet.show(lived)
        self.compare(fleet, lived, restarted, "a scale up and down")
