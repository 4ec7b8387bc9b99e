"""The task service: create, replace and delete tasks, and learn their re-weighting β, as jobs.

A write is checked (tokenising, limits: what can fail without running the model), then stored as
the task's next revision in the state store, which is the moment it is acknowledged: a crash or
SIGTERM after that leaves it for the next start, and every replica builds it (server/replication.py).
The build prepares the new version off to the side (on the model thread, between batches) and swaps
it in only when it succeeded, so the old version keeps serving during a replacement; a build that
fails anyway is rolled back by storing the previous version as a newer revision. Concurrent writes
are ordered by revision and the later one wins everywhere; `If-Match` makes a write conditional.
β trains in a nice-19 thread while classification goes on; its blob is stored, then a new revision
of the same spec tells every replica to reload the task with it. A failed or cancelled run leaves
the previous β serving. Replaced and deleted caches are garbage-collected once no spec refers to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from anchor_cache.data import read_jsonl, training_draw
from anchor_cache.errors import (
    ConflictError,
    NotFoundError,
    PreconditionFailedError,
    UnavailableError,
    ValidationError,
)
from anchor_cache.registry import ServedTask
from anchor_cache.reweighting import TrainConfig
from anchor_cache.task import TEXT_SLOT, Method, TaskSpec, label_index, preview
from server.datafiles import dataset_file, inline_rows
from server.engine_client import AdminEngineClient
from server.jobs import Job, JobRunner, in_background_thread
from server.protocol import Learning, LearningStep, ReweightRequest, TaskInfo
from server.replication import Replication
from server.settings import Settings
from server.store import ABSENT, TaskRecord

log = logging.getLogger(__name__)

# RFC 9110 §8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE; If-Match takes "*" or a list of them.
_ENTITY_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
_ENTITY_TAGS = re.compile(rf"{_ENTITY_TAG.pattern}(?:[ \t]*,[ \t]*{_ENTITY_TAG.pattern})*")


@dataclass(frozen=True)
class _Learning:
    step: LearningStep
    job: Job
    revision: int  # the version of the task it learns for


class TaskService:
    def __init__(self, engine: AdminEngineClient, replication: Replication, jobs: JobRunner,
                 settings: Settings) -> None:
        self.engine = engine
        self.store = replication.store
        self.replication = replication
        self.jobs = jobs
        self.settings = settings
        self.training: set[str] = set()  # task names with a training job running here
        self._learning: dict[str, _Learning] = {}  # task name -> the job learning from its pool here

    # --- reading --------------------------------------------------------------------------------

    def info(self, served: ServedTask) -> TaskInfo:
        spec = served.spec
        return TaskInfo(
            name=spec.name, labels=spec.labels, template=spec.template, separator=spec.separator, method=spec.method,
            anchor_tokens=served.anchor_tokens, cache_bytes=served.cache_bytes,
            cache_hash=served.key if served.cached else None, build_seconds=round(served.build_seconds, 4),
            loaded_from_disk=served.loaded_from_disk, calibrate=spec.calibrate, reweighted=served.beta is not None,
            revision=served.revision,
            reweighting=served.reweighting, prior=served.prior.info() if served.prior is not None else None,
            auto=served.auto.info if served.auto is not None else None, learning=self.learning(served),
            traffic=served.traffic.info() if served.traffic is not None else None,
            **self.engine.task_facts(served),
        )

    def learning(self, served: ServedTask) -> Learning | None:
        """What a job here is still learning from the served task's pool, and how far it got; None
        when none is, or the job's version of the task was replaced or deleted meanwhile."""
        entry = self._learning.get(served.spec.name)
        if entry is None or entry.revision != served.revision:
            return None
        return Learning(step=entry.step, job=entry.job.id, progress=entry.job.progress)

    def all_learning(self) -> dict[str, Learning]:
        return {served.spec.name: learning for served in self.engine.tasks()
                if (learning := self.learning(served)) is not None}

    @contextlib.contextmanager
    def _learning_from_pool(self, served: ServedTask, step: LearningStep, job: Job) -> Iterator[None]:
        """Shows `step` of `job` for `served` until its result is served (or the job ends)."""
        name, entry = served.spec.name, _Learning(step, job, served.revision)
        job.progress = None  # a job's previous step counted other things
        self._learning[name] = entry
        try:
            yield
        finally:
            if self._learning.get(name) is entry:  # else a newer write's job has taken its place
                del self._learning[name]

    def get(self, name: str) -> TaskInfo:
        return self.info(self.engine.task(name))

    def all(self) -> tuple[list[TaskInfo], dict[str, str]]:
        """Serving tasks, and the tasks that failed to load with the reason."""
        return [self.info(t) for t in self.engine.tasks()], self.engine.failures()

    # --- writing --------------------------------------------------------------------------------

    async def write(self, spec: TaskSpec, replace: bool, if_match: str | None = None) -> Job:
        """Check the spec, store it as the task's next revision, then build it here as a job (the
        other replicas build it when the store tells them). A create of a name the store has gets
        409, a replace whose `if_match` revision is stale 412, on whichever replica."""
        self.engine.require_ready()
        if spec.method == Method.HIDDEN_RANDOM_TOP:
            raise ValidationError("method hidden_random_top is an evaluation method (it needs a dev set); "
                                  "serve hidden_anchor or hidden_random")
        spec = await asyncio.to_thread(inline_rows, self.settings, spec)
        self._check_sizes(spec)
        overhead = self.engine.template_tokens(spec)
        if overhead > self.settings.max_input_tokens:
            raise ValidationError(f"the template alone takes {overhead} tokens, more than max_input_tokens "
                                  f"({self.settings.max_input_tokens}): every classify would fail")
        await self.engine.check(spec)
        self.engine.check_room(spec.name)
        previous = await self._record(spec.name)
        self._check_store_kept(spec.name, previous)
        expect = ABSENT if not replace else self._expected(spec.name, previous, if_match)
        record = await self._store(self.store.write, spec.name, spec.model_dump(mode="json"), "admin", expect)
        kind = "replace_task" if previous is not None and previous.live else "create_task"
        job = Job(kind=kind, target=spec.name)
        return self.jobs.submit(kind, spec.name, lambda cancel: self._apply(record, previous, job, cancel), job)

    def _check_sizes(self, spec: TaskSpec) -> None:
        """The limits that need no tokenizer, before any work that grows with the spec: every
        demonstration adds at least its label token, and a context of more bytes than
        `max_demo_tokens` tokens could ever cover is too long whatever it tokenises to. The pool is
        what β learns from, so it is held to `max_train_examples` like a training request."""
        s = self.settings
        if len(spec.demonstrations) > s.max_demo_tokens:
            raise ValidationError(f"{len(spec.demonstrations)} demonstrations; each takes at least one token and the "
                                  f"limit is {s.max_demo_tokens} tokens (max_demo_tokens)")
        before, _, after = spec.template.partition(TEXT_SLOT)
        frame = len((before + after + " " + spec.separator).encode())
        size = sum(frame + len(d.text.encode()) + len(d.label.encode()) for d in spec.demonstrations)
        if size > self.engine.max_text_bytes(s.max_demo_tokens):
            raise ValidationError(f"the demonstrations take {size} bytes, certainly more than the limit of "
                                  f"{s.max_demo_tokens} tokens (max_demo_tokens)")
        if len(spec.examples or []) > s.max_train_examples:
            raise ValidationError(f"the labelled pool (`examples`) has {len(spec.examples)} rows; the limit is "
                                  f"{s.max_train_examples} (max_train_examples): send a sample of it")

    async def _apply(self, record: TaskRecord, previous: TaskRecord | None, job: Job,
                     cancel: threading.Event) -> dict[str, Any]:
        """Build the stored revision here; if it cannot serve, store the previous version back (a
        newer revision, so every replica returns to it) and fail the job with the reason. A task
        with an `examples` pool and no β learned from it then learns β (the job's progress) and
        stores it as the next revision."""
        try:
            served = await self.replication.apply(record)
        except UnavailableError as exc:  # stored, so not rolled back: every replica builds it when the store is back
            raise UnavailableError(f"task {record.name!r} is stored as revision {record.revision} but could not be "
                                   f"built: {exc}. Every replica builds it once the store is back") from exc
        reason = self.engine.build_error(record.name, record.revision)
        if reason is not None:
            await self._roll_back(record, previous)
            raise ValidationError(f"task {record.name!r} did not build: {reason}")
        if served is not None:
            served = await self._finish(served, job, cancel)
        await self._collect_garbage()
        current = served or self.engine.task(record.name)  # a later write may have been applied already
        return self.info(current).model_dump() | {"written_revision": record.revision}

    async def _finish(self, served: ServedTask, job: Job, cancel: threading.Event) -> ServedTask:
        """What a built task still needs from its pool: a `method: auto` task's choice, then β
        where the method wants one. Each is stored as the next revision, so every replica serves it."""
        if self.engine.needs_choice(served):
            served = await self._choose(served, job, cancel) or served
        if self.engine.needs_pool_beta(served):
            served = await self._learn_pool_beta(served, job, cancel) or served
        return served

    async def _choose(self, served: ServedTask, job: Job, cancel: threading.Event) -> ServedTask | None:
        """`method: auto`'s cross-validation in a nice-19 thread; the choice is stored and the task
        applied again as the next revision. None when a newer write came first."""
        def progress(done: int, total: int) -> None:
            job.progress = {"folds_done": done, "folds": total}

        with self._learning_from_pool(served, "choose_method", job):
            await in_background_thread(lambda: self.engine.choose_method(served, cancel.is_set, progress),
                                       "anchorserve-choosing")
            return await self._store_again(served, None)

    async def _store_again(self, served: ServedTask, built: ServedTask | None) -> ServedTask | None:
        """The spec as written, stored as the next revision, so every replica applies what was just
        learned for it: the task as applied here (`built` when the apply gave none back); None when
        a newer write came first, or another replica stored its result first."""
        current = await self._record(served.spec.name)
        try:  # the same spec and source (a configured task stays configured)
            record = await self._store(self.store.write, served.spec.name, served.written.model_dump(mode="json"),
                                       current.source if current is not None else "admin", served.revision)
        except PreconditionFailedError:
            return None
        return await self.replication.apply(record) or built

    async def _learn_pool_beta(self, served: ServedTask, job: Job, cancel: threading.Event) -> ServedTask | None:
        """β from the task's pool in a nice-19 thread, stored as a new revision of the same spec;
        None when a newer write came first (its own build learns again if it needs to)."""
        def progress(done: int, total: int) -> None:
            job.progress = {"done": done, "total": total}

        with self._learning_from_pool(served, "learn_pool_beta", job):
            trained = await in_background_thread(
                lambda: self.engine.learn_pool_beta(served, cancel.is_set, progress), "anchorserve-training")
            return await self._store_again(served, trained)

    def finish_from_pools(self) -> list[Job]:
        """At start: a job per served task whose pool still owes it something: a `method: auto`
        choice, or a β it does not have yet. Each task serves meanwhile (a choosing task as
        Hidden_anchor, a task waiting for β without it, with its calibration), so a first start
        answers at once instead of after minutes of training."""
        jobs = []
        for served in self.engine.tasks():
            choosing = self.engine.needs_choice(served)
            if choosing or self.engine.needs_pool_beta(served):
                job = Job(kind="choose_method" if choosing else "learn_pool_beta", target=served.spec.name)

                async def finish(cancel: threading.Event, served: ServedTask = served, job: Job = job
                                 ) -> dict[str, Any]:
                    done = await self._finish(served, job, cancel)
                    return self.info(self.engine.task(served.spec.name) if done is served else done).model_dump()

                jobs.append(self.jobs.submit(job.kind, job.target, finish, job))
                log.info("task %s serves %s while its pool %s (job %s)", served.spec.name,
                         "as hidden_anchor" if choosing else "without β",
                         "chooses its method" if choosing else "teaches it β", job.id)
        return jobs

    async def _roll_back(self, failed: TaskRecord, previous: TaskRecord | None) -> None:
        spec = previous.spec if previous is not None else None
        source = previous.source if previous is not None else "admin"
        try:
            record = await self._store(self.store.write, failed.name, spec, source, failed.revision)
        except (PreconditionFailedError, UnavailableError) as exc:  # a newer write won, or the store is down
            log.warning("task %s: revision %d did not build and was not rolled back: %s", failed.name,
                        failed.revision, exc)
            return
        log.warning("task %s: revision %d did not build; revision %d restores the previous version",
                    failed.name, failed.revision, record.revision)
        await self.replication.apply(record)

    async def delete(self, name: str, if_match: str | None = None) -> None:
        """Store a tombstone for `name` and stop serving it here (other replicas follow)."""
        self.engine.require_ready()
        if name in self.training:
            raise ConflictError(f"task {name!r} has a training job running; wait for it or cancel it")
        previous = await self._record(name)
        self._check_store_kept(name, previous)
        if previous is None or not previous.live:
            raise NotFoundError(f"unknown task {preview(name)}")
        record = await self._store(self.store.write, name, None, "admin", self._expected(name, previous, if_match))
        await self.replication.apply(record)
        await self._collect_garbage()

    def _check_store_kept(self, name: str, record: TaskRecord | None) -> None:
        """Refuse a write when the store holds an older revision of `name` than this replica
        applied (or none at all): it lost data (a Redis restarted without persistence, a state dir
        restored from an old copy) and its revision counter went back, so the write would get a
        revision every replica skips as stale: acknowledged, never served."""
        applied = self.engine.revision(name)
        stored = record.revision if record is not None else 0
        if stored < applied:
            log.error("the state store %s holds revision %d of task %s but this replica applied revision %d: the "
                      "store lost data; admin writes are refused until it is restored", self.store.url, stored,
                      name, applied)
            raise UnavailableError(f"the state store lost task {preview(name)} (it holds revision {stored}, this "
                                   f"replica serves {applied}); admin writes are refused until the store is restored "
                                   "from its persistence; classification goes on")

    async def _record(self, name: str) -> TaskRecord | None:
        return await self._store(self.store.record, name)

    @staticmethod
    async def _store(call: Any, *args: Any) -> Any:
        """A store call off the event loop; a store that cannot be reached refuses the write (503)."""
        try:
            return await asyncio.to_thread(call, *args)
        except UnavailableError as exc:
            raise UnavailableError(f"{exc}. Admin writes are refused until it is back; classification "
                                   "goes on with the tasks each replica holds") from exc

    @staticmethod
    def _expected(name: str, record: TaskRecord | None, if_match: str | None) -> int | None:
        """The revision a write must find in the store, as RFC 9110 evaluates `If-Match`: None
        without the header (unconditional); else the task's current revision when the header is
        `*` or lists that revision's ETag as a strong tag (If-Match compares strongly, so a weak
        `W/"12"` never matches). Anything else, a missing task or a value that is no list of
        entity tags included, fails the precondition: 412, never a write."""
        if if_match is None:
            return None
        value = if_match.strip()
        current = record.revision if record is not None and record.live else None
        if current is None:
            raise PreconditionFailedError(f"If-Match: {preview(if_match)} but task {preview(name)} does not exist")
        strong = {tag for weak, tag in _ENTITY_TAG.findall(value) if not weak} if _ENTITY_TAGS.fullmatch(value) \
            else set()
        if value != "*" and str(current) not in strong:
            raise PreconditionFailedError(f"If-Match: {preview(if_match)} does not match task {preview(name)}, whose "
                                          f"ETag is \"{current}\" (a weak W/ tag never matches): GET it again")
        return current

    async def _collect_garbage(self) -> None:
        """Best effort: the change is already stored, so a failed collection is only logged."""
        try:
            await self.replication.collect_garbage(self.settings.gc_grace_s)
        except Exception:
            log.exception("garbage collection failed; it runs again after the next change")

    # --- re-weighting ---------------------------------------------------------------------------

    async def reweight(self, name: str, body: ReweightRequest) -> Job:
        served = self.engine.task(name)
        if name in self.training:
            raise ConflictError(f"task {name!r} has a training job running; wait for it")
        self.engine.check_reweightable(served)
        self.training.add(name)  # claimed before any await, so a concurrent training gets 409
        try:
            texts, labels = await asyncio.to_thread(self._training_rows, body, served)
        except BaseException:
            self.training.discard(name)
            raise
        return self.jobs.submit("reweighting", name, lambda cancel: self._train(served, body, texts, labels, cancel))

    def _training_rows(self, body: ReweightRequest, served: ServedTask) -> tuple[list[str], list[int]]:
        """Training rows as (texts, classes), never including a demonstration text."""
        labels = served.spec.labels
        demo_texts = self.engine.demonstration_texts(served)
        if body.examples is not None:
            rows = [(e.text, label_index(e.label, labels)) for e in body.examples if e.text not in demo_texts]
        else:
            train = read_jsonl(dataset_file(self.settings, body.data.path, "train"), labels)
            used = {i for i, r in enumerate(train) if r.text in demo_texts}
            rows = [(r.text, r.label) for r in training_draw(train, used, len(labels), body.data.per_class,
                                                              body.data.seed)]
        if not rows:
            raise ValidationError("no training examples left (examples equal to demonstrations are dropped)")
        if len(rows) > self.settings.max_train_examples:
            raise ValidationError(f"{len(rows)} training examples; the limit is {self.settings.max_train_examples}")
        return [t for t, _ in rows], [c for _, c in rows]

    async def _train(self, served: ServedTask, body: ReweightRequest, texts: list[str], labels: list[int],
                     cancel: threading.Event) -> dict[str, Any]:
        """Train in a nice-19 thread (classification keeps flowing), then swap β in if the task is unchanged."""
        name = served.spec.name
        n_dev = int(len(texts) * body.dev_fraction)
        order = np.random.default_rng(body.seed).permutation(len(texts))
        dev_idx, train_idx = order[:n_dev], order[n_dev:]
        cfg = TrainConfig(method=served.spec.method, lr=body.lr, epochs=body.epochs, batch_size=body.batch_size,
                          seed=body.seed, patience=body.patience)

        def work() -> ServedTask:
            result = self.engine.train_beta(
                served, ([texts[i] for i in train_idx], [labels[i] for i in train_idx]),
                ([texts[i] for i in dev_idx], [labels[i] for i in dev_idx]) if n_dev else None, cfg, cancel.is_set)
            info = {"seconds": round(result.seconds, 3), "epoch_losses": result.epoch_losses,
                    "step_losses": result.step_losses, "dev_losses": result.dev_losses,
                    "train_examples": len(train_idx), "dev_examples": n_dev, "lr": body.lr, "epochs": body.epochs,
                    "batch_size": body.batch_size, "trained_at": time.time()}
            return self.engine.with_beta(served, result.beta, info)

        try:
            trained = await in_background_thread(work, "anchorserve-training")
            await self._store(self.engine.save_beta, trained)
            try:  # a new revision of the same spec: every replica reloads the task, with β
                record = await self._store(self.store.write, name, served.spec.model_dump(mode="json"), "admin",
                                           served.revision)
            except PreconditionFailedError:
                raise ConflictError(f"task {name!r} was replaced during training; the new β was discarded") from None
            await self.replication.apply(record)
        finally:
            self.training.discard(name)
        return {"task": name} | trained.reweighting
