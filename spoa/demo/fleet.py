"""Several routers in front of one set of worker pods, each with its own view of them.

A deployment runs more than one router (HAProxy and the agent, one pair per
pod) behind one Service, and a client's requests reach any of them: a user, a
room, a remote server must reach the same worker through every one. What a
router knows of the workers is what its DNS told it, and when. :class:`Fleet`
gives each router a DNS zone of its own, so that one router can be shown the
pods in another order than the next, live through a rolling restart of the
workers while another is down, or start after a scale-up it never saw.

Pods are demo workers, each on an address of its own in 127.0.0.0/8 (all of it
reaches this machine) and all on one port, as Kubernetes pods have their own
IP and one container port: HAProxy sees what it sees in a cluster. A pod that
is replaced comes back on a new address, never an old one.
"""

from __future__ import annotations

import asyncio
import csv
import io
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from .ports import free_port
from .stack import ZONE, Router, StackError, stop_process
from .workers import DemoWorker, WorkerSpec

T = TypeVar("T")
Discovery = Literal["srv", "a"]

#: The classes of ``policies/synapse-workers.yaml`` whose requests are hashed,
#: with the key they are hashed on.
HASHED: Mapping[str, str] = {
    "synchrotron": "user",
    "event_creator": "room",
    "federation_inbound": "origin",
}


@dataclass(frozen=True, slots=True)
class Pod:
    """One worker pod: its name (``<class>-<n>``), class and address."""

    name: str
    worker_class: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """``HOST:PORT``, as HAProxy logs it (``srv=``) and the demo worker reports it."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Slot:
    """One server slot of a backend, as HAProxy's stats show it."""

    name: str
    status: str
    address: str
    weight: int


class Fleet:
    """Worker pods, the main process, and routers that each see the pods through their own DNS.

    ``serve=False`` leaves the pods' addresses to something else to answer on
    (a benchmark's faster stand-in); ``discovery`` is how the routers find
    the pods: SRV records (Kubernetes' headless services) or A records of one
    name per class (compose's replicas).
    """

    def __init__(
        self,
        workdir: Path,
        policy: Path,
        *,
        discovery: Discovery = "srv",
        serve: bool = True,
        check_inter: str = "500ms",
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.policy = policy
        self.discovery = discovery
        self.serve = serve
        self.check_inter = check_inter
        #: The port every pod listens on.
        self.port = free_port() if port is None else port
        self.pods: dict[str, list[Pod]] = {}
        self.routers: list[Router] = []
        self.main: DemoWorker | None = None
        self.main_address = ""
        self._workers: dict[Pod, DemoWorker] = {}
        self._born = 0
        self._names: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the fleet's event loop (DNS and demo workers live there)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- pods ----------------------------------------------------------------------

    def start_main(self, address: str | None = None) -> None:
        """The main process: a demo worker, or ``address`` (HOST:PORT) served by someone else."""
        if address is None:
            spec = WorkerSpec("main-1", "main", "127.0.0.1", 0)
            self.main = self.call(DemoWorker(spec).start())
            address = f"127.0.0.1:{self.main.port}"
        self.main_address = address

    def add_pod(self, worker_class: str) -> Pod:
        """A new pod of ``worker_class`` on a new address, serving at once (not yet in DNS)."""
        self._born += 1
        if self._born > 250 * 250:
            raise StackError("no loopback address left for another pod")
        number = self._names.get(worker_class, 0) + 1
        self._names[worker_class] = number
        host = f"127.0.{1 + (self._born - 1) // 250}.{1 + (self._born - 1) % 250}"
        pod = Pod(f"{worker_class}-{number}", worker_class, host, self.port)
        if self.serve:
            spec = WorkerSpec(pod.name, worker_class, host, self.port)
            self._workers[pod] = self.call(DemoWorker(spec).start())
        self.pods.setdefault(worker_class, []).append(pod)
        return pod

    def remove_pod(self, pod: Pod) -> None:
        """Stop a pod (its connections close, as a deleted pod's do); DNS still names it."""
        self.pods[pod.worker_class].remove(pod)
        worker = self._workers.pop(pod, None)
        if worker is not None:
            self.call(worker.stop())

    def replace_pod(self, pod: Pod) -> Pod:
        """A pod restarted: the old one gone, a new one of its class on a new address."""
        self.remove_pod(pod)
        return self.add_pod(pod.worker_class)

    # -- routers -------------------------------------------------------------------

    def router(self, name: str) -> Router:
        """A router of the shipped configuration, with its own agent, ports and DNS zone."""
        router = Router(
            workdir=self.workdir / name,
            policy=self.policy,
            port=free_port(),
            stats_port=free_port(),
            agent_port=free_port(),
            agent_http=f"127.0.0.1:{free_port()}",
            check_inter=self.check_inter,
            poll_interval=0.5,
            main_address=self.main_address,
        )
        self.call(router.start_dns())
        if self.discovery == "a":
            # Only the classes with pods: HAProxy resolves an A name with libc
            # at start too (init-addr), through this machine's resolver, which
            # does not know the zone (a tenth of a second a slot here).
            for worker_class in self.pods:
                router.worker_names[worker_class] = f"{self.a_name(worker_class)}:{self.port}"
        self.routers.append(router)
        return router

    @staticmethod
    def a_name(worker_class: str) -> str:
        """The name whose A records are a class's pods, with A-record discovery."""
        return f"{worker_class.replace('_', '-')}.{ZONE}"

    def show(
        self,
        router: Router,
        order: Callable[[list[Pod]], Iterable[Pod]] = list,
        pods: Mapping[str, Sequence[Pod]] | None = None,
    ) -> None:
        """Publish in ``router``'s DNS the pods of every class (default: those running now),
        each class's records in ``order``."""
        for worker_class, chosen in (self.pods if pods is None else pods).items():
            listed = list(order(list(chosen)))
            if self.discovery == "srv":
                router.publish_at(worker_class, [(p.name, p.host, p.port) for p in listed])
            else:
                router.zone.set_addresses(self.a_name(worker_class), [p.host for p in listed])

    def start(self, router: Router, *, agent: bool = True) -> None:
        """Start ``router``'s agent (unless ``agent`` is false) and HAProxy."""
        if agent:
            router.start_agent()
        router.start_haproxy()

    def stop_agent(self, router: Router) -> None:
        """Stop ``router``'s agent only: its HAProxy routes by the fallback."""
        router.stop_agent()
        router.agent = None

    def stop(self, router: Router) -> None:
        """Stop ``router``'s HAProxy and agent; its DNS zone stays, to start it again."""
        stop_process(router.haproxy)
        router.haproxy = None
        self.stop_agent(router)

    def slots(self, router: Router, worker_class: str) -> list[Slot]:
        """The server slots of ``be_<worker_class>`` on ``router`` (the main backup left out)."""
        url = f"http://127.0.0.1:{router.stats_port}/stats;csv"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return [
            Slot(row["svname"], row["status"], row.get("addr") or "", int(row["weight"] or 0))
            for row in csv.DictReader(io.StringIO(text.lstrip("# ")))
            if row["pxname"] == f"be_{worker_class}"
            and row["svname"] not in ("FRONTEND", "BACKEND", "main")
        ]

    def settled(self, router: Router, view: Mapping[str, Sequence[Pod]] | None = None) -> bool:
        """Whether ``router`` holds exactly ``view`` (default: the running pods): each pod
        UP in a slot of its own, no slot still holding a pod that is gone, and its agent UP
        (when it runs one)."""
        expected = self.pods if view is None else view
        try:
            for worker_class in expected:
                want = sorted(p.address for p in expected[worker_class])
                held = [s for s in self.slots(router, worker_class) if s.address]
                up = sorted(s.address for s in held if s.status.startswith("UP"))
                if up != want or len(held) != len(want):
                    return False
            return router.agent is None or self.agent_up(router)
        except OSError:
            return False

    def serving(self, router: Router, pods: Iterable[Pod]) -> bool:
        """Whether every one of ``pods`` is UP in ``router`` (others may be there too)."""
        try:
            by_class: dict[str, set[str]] = {}
            for pod in pods:
                if pod.worker_class not in by_class:
                    by_class[pod.worker_class] = {
                        s.address
                        for s in self.slots(router, pod.worker_class)
                        if s.status.startswith("UP")
                    }
                if pod.address not in by_class[pod.worker_class]:
                    return False
        except OSError:
            return False
        return True

    def agent_up(self, router: Router) -> bool:
        """Whether ``router``'s HAProxy has its agent UP."""
        return router.server_states().get(("be_spoa", "agent1"), "").startswith("UP")

    def wait(
        self, router: Router, condition: Callable[[], bool], what: str, timeout: float = 40.0
    ) -> None:
        """Wait until ``condition()``, failing at once if ``router``'s HAProxy or agent exits.

        A vanished pod's slot is freed after HAProxy's ``hold obsolete`` (10 s
        in the shipped configuration)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc, log in ((router.haproxy, "haproxy.log"), (router.agent, "agent.log")):
                if proc is not None and proc.poll() is not None:
                    tail = (router.workdir / log).read_text(errors="replace")[-2000:]
                    raise StackError(f"{log} shows an exit ({proc.returncode}):\n{tail}")
            if condition():
                return
            time.sleep(0.2)
        raise StackError(f"{router.workdir.name}: {what} not seen within {timeout:.0f}s")

    def wait_settled(self, router: Router, view: Mapping[str, Sequence[Pod]] | None = None) -> None:
        """Wait until :meth:`settled`."""
        self.wait(router, lambda: self.settled(router, view), "the pods of its DNS view")

    def close(self) -> None:
        """Stop every router and pod."""
        try:
            for router in self.routers:
                self.call(router.stop())
            for pod in list(self._workers):
                self.call(self._workers.pop(pod).stop())
            if self.main is not None:
                self.call(self.main.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def agreement(first: Sequence[str], second: Sequence[str]) -> float:
    """The share of keys placed on the same worker in two placements of the same requests."""
    if len(first) != len(second) or not first:
        raise ValueError("two placements of the same, non-empty, requests")
    return sum(a == b for a, b in zip(first, second, strict=True)) / len(first)
