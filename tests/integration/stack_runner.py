"""Run a DemoStack (the shipped haproxy.cfg, the agent, demo workers, DNS) from sync tests."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

from spoa.demo.client import Outcome, send
from spoa.demo.ports import free_port
from spoa.demo.stack import DemoStack, Router
from spoa.traffic import TrafficRequest

T = TypeVar("T")
S = TypeVar("S", bound=Router)


class StackRunner(Generic[S]):
    """A Router (or DemoStack) on its own event loop thread, driven by blocking calls."""

    def __init__(self, stack: S) -> None:
        self.stack = stack
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def send(self, request: TrafficRequest) -> Outcome:
        return send(self.stack.port, request)

    def log(self) -> str:
        path = self.stack.workdir / "haproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_lines(self, since: int = 0) -> list[str]:
        return [line for line in self.log()[since:].splitlines() if " fe_matrix " in line]

    def kill_agent(self) -> None:
        self.stack.stop_agent(signal.SIGKILL)

    def wait_agent(self, status: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.stack.server_states().get(("be_spoa", "agent1"), "").startswith(status):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"agent not {status} after {timeout}s")

    def close(self) -> None:
        try:
            self.call(self.stack.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


@contextmanager
def running_stack(
    workdir: Path, policy: Path, factory: type[DemoStack] = DemoStack, **options: Any
) -> Iterator[StackRunner[DemoStack]]:
    stack = factory(
        workdir=workdir,
        policy=policy,
        port=free_port(),
        stats_port=free_port(),
        agent_port=free_port(),
        check_inter="300ms",
        agent_http=f"127.0.0.1:{free_port()}",
        poll_interval=0.2,
        **options,
    )
    runner = StackRunner(stack)
    try:
        runner.call(stack.start())
        runner.call(stack.wait_ready(40))
        yield runner
    finally:
        runner.close()


_FIELD = re.compile(r"(\w+)=(\S*)")


def log_fields(line: str) -> dict[str, str]:
    """The key=value fields of one HAProxy log line of the shipped log-format."""
    fields = dict(_FIELD.findall(line))
    parts = line.split()
    # %ci:%cp [%tr] %ft %b/%s srv=%si:%sp timers %ST %B %tsc %HM %HPO key=value...
    if len(parts) > 10:
        fields["backend_server"] = parts[3]
        fields["status"] = parts[6]
        fields["method"] = parts[9]
        fields["path"] = parts[10]
    return fields
