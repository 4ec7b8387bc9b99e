"""Keeps this replica's served tasks equal to the state store's records, and relays job cancels.

Every write goes to the store first (compare-and-set on the task's revision), then each replica
applies the new revision: the writer at once, the others when the store's change notification
(Redis pub/sub, or a polled counter on one host) wakes this loop, or at the latest at the next full
resync every `sync_interval_s`, so a missed message heals. Applying builds the new version while
the old one keeps serving and swaps it in when ready; revisions only move forward (registry.apply
skips a stale one), so concurrent writes end the same on every replica: the later revision wins.
A build that the store's outage interrupted is not counted as applied, so every resync tries it
again until the store is back and it builds: replicas converge on the store's current revision.

When the store cannot be reached, the replica keeps serving what it has; the loop logs it once,
retries, and resyncs when the store is back.

At start, the configured tasks are seeded into the store first: a configured spec is stored unless
the store has that name from an admin write (which wins over configuration, deletions included),
and a seeded task no longer configured is deleted. Replicas of one deployment share one
configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from anchor_cache.errors import ConflictError, PreconditionFailedError, UnavailableError
from anchor_cache.registry import ServedTask
from anchor_cache.task import TaskSpec
from server.engine_client import AdminEngineClient
from server.jobs import JobRunner
from server.store import ABSENT, StateStore, TaskRecord

log = logging.getLogger(__name__)


def seed(store: StateStore, configured: list[TaskSpec]) -> None:
    """Store each configured spec unless the store has that name from an admin write or the same
    configured spec (a configured spec that changed replaces the seeded one), then delete seeded
    tasks no longer configured."""
    for spec in configured:
        data = spec.model_dump(mode="json")
        record = store.record(spec.name)
        if record is not None and (record.source == "admin" or record.spec == data):
            continue
        try:
            written = store.write(spec.name, data, "config", ABSENT if record is None else record.revision)
            log.info("task %s: configured spec stored as revision %d", spec.name, written.revision)
        except (ConflictError, PreconditionFailedError):
            log.info("task %s: another replica stored it first", spec.name)
    names = {spec.name for spec in configured}
    for record in store.records().values():
        if record.source == "config" and record.spec is not None and record.name not in names:
            try:
                store.write(record.name, None, "config", record.revision)
                log.info("task %s: no longer configured, deleted", record.name)
            except PreconditionFailedError:
                pass


class Replication:
    def __init__(self, engine: AdminEngineClient, store: StateStore, jobs: JobRunner, interval_s: float) -> None:
        self.engine = engine
        self.store = store
        self.jobs = jobs
        self.interval_s = interval_s
        self._applying: dict[str, int] = {}  # task name -> newest revision being applied here
        self._loop: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()  # applies started by a sync
        self.store_down: str | None = None  # why the store could not be reached, while it cannot

    async def load(self, configured: list[TaskSpec], gc_grace_s: float) -> None:
        """At start: seed the configured tasks, apply every record (each on its own: one that cannot
        load is a failure of that task), then collect the blobs nothing uses."""
        await asyncio.to_thread(seed, self.store, configured)
        records = await asyncio.to_thread(self.store.records)
        for i, record in enumerate(records.values(), 1):
            self.engine.report(f"loading task {record.name!r} ({i} of {len(records)})")
            await self.apply(record)
        await self.engine.collect_garbage(records, gc_grace_s)

    async def collect_garbage(self, grace_s: float) -> None:
        """Delete the blobs no record's spec, nor any served task, refers to."""
        records = await asyncio.to_thread(self.store.records)
        await self.engine.collect_garbage(records, grace_s)

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="anchorserve-replication")

    async def stop(self) -> None:
        for task in [self._loop, *self._pending]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def apply(self, record: TaskRecord) -> ServedTask | None:
        """Apply `record` here now (the writer does not wait for its own notification)."""
        name = record.name
        self._applying[name] = max(self._applying.get(name, 0), record.revision)
        try:
            served = await self.engine.apply(record)
        finally:
            if self._applying.get(name) == record.revision:
                del self._applying[name]
        return served

    async def sync(self) -> None:
        """Apply every record newer than what this replica serves, each in its own task."""
        records = await asyncio.to_thread(self.store.records)
        for record in records.values():
            newest_here = max(self.engine.revision(record.name), self._applying.get(record.name, 0))
            if record.revision > newest_here:
                task = asyncio.create_task(self._apply_or_retry(record),
                                           name=f"apply-{record.name}-{record.revision}")
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)

    async def _apply_or_retry(self, record: TaskRecord) -> None:
        """A sync's apply: a build the store's outage stopped is left to the next sync (the registry
        did not count it as applied), which runs at least every `interval_s`."""
        try:
            await self.apply(record)
        except UnavailableError as exc:
            self.store_down = str(exc)

    async def _run(self) -> None:
        seen = -1
        while True:
            try:
                seen = await asyncio.to_thread(self.store.wait_for_change, seen, self.interval_s)
                await self.sync()
                await self.jobs.relay(self.store)
                if self.store_down is not None:
                    log.warning("state store %s is reachable again; resynced", self.store.url)
                    self.store_down = None
            except UnavailableError as exc:
                if self.store_down is None:
                    log.error("%s; serving the tasks held in memory until it is back", exc)
                self.store_down = str(exc)
                seen = -1
                await asyncio.sleep(min(1.0, self.interval_s))
            except Exception:  # the loop must outlive any one bad sync
                log.exception("state sync failed; retrying")
                await asyncio.sleep(self.interval_s)
