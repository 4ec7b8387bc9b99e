"""The job runner's records in the state store: what another replica reads must be the job's last state."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from server.jobs import JobRunner
from server.store.local import LocalStore


class HeldStore(LocalStore):
    """A real local store whose next job write, once `hold_next` is set, waits for `release`: a
    replication tick's progress write caught in a slow store."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.hold_next = threading.Event()
        self.holding = threading.Event()
        self.release = threading.Event()
        self.overtaken = threading.Event()  # another write began while the held one waited

    def put_job(self, job_id: str, record: dict[str, Any], ttl_s: float) -> None:
        if self.hold_next.is_set():
            self.hold_next.clear()
            self.holding.set()
            self.release.wait(10)
        elif self.holding.is_set() and not self.release.is_set():
            self.overtaken.set()
        super().put_job(job_id, record, ttl_s)


def test_a_progress_write_held_in_the_store_never_lands_after_the_final_record(tmp_path):
    async def scenario() -> dict[str, Any] | None:
        store = HeldStore(tmp_path)
        runner = JobRunner(store, ttl_s=60)
        finish = asyncio.Event()

        async def work(cancel: threading.Event) -> dict[str, Any]:
            await finish.wait()
            return {"answer": 42}

        job = runner.submit("reweighting", "sentiment", work)
        running = next(task for task in asyncio.all_tasks() if task.get_name() == job.id)
        while (store.get_job(job.id) or {}).get("status") != "running":
            await asyncio.sleep(0)
        store.hold_next.set()
        tick = asyncio.create_task(runner.relay(store))
        await asyncio.to_thread(store.holding.wait, 10)
        finish.set()
        while job.finished is None:
            await asyncio.sleep(0)
        # Unfixed, the final write overtakes the held one at once; fixed, it waits for it (and this
        # wait runs out).
        await asyncio.to_thread(store.overtaken.wait, 0.5)
        store.release.set()
        await asyncio.wait_for(asyncio.gather(tick, running), 10)
        return store.get_job(job.id)

    record = asyncio.run(scenario())
    assert record is not None and record["status"] == "succeeded" and record["result"] == {"answer": 42}
