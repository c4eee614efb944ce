"""Demo workers say who they are and on which address they answered."""

from __future__ import annotations

import asyncio

from spoa.demo.client import send
from spoa.demo.workers import DemoWorker, WorkerSpec
from spoa.traffic import TrafficRequest


def test_a_demo_worker_answers_with_its_name_class_and_address() -> None:
    async def scenario() -> None:
        worker = await DemoWorker(WorkerSpec.parse("client_reader-7=127.0.0.1:0")).start()
        try:
            request = TrafficRequest("t", "GET", "/_matrix/client/v3/profile/@a:x", None, {})
            outcome = await asyncio.get_running_loop().run_in_executor(
                None, send, worker.port, request
            )
        finally:
            await worker.stop()
        assert outcome.status == 200
        assert (outcome.worker, outcome.worker_class) == ("client_reader-7", "client_reader")
        assert outcome.address == f"127.0.0.1:{worker.port}"

    asyncio.run(scenario())
