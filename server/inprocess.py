"""The engine facade the server talks to (in the spirit of vLLM's `EngineClient`).

It owns the loaded model, the task registry and the batching scheduler, and answers in the
server's terms: tokenise a text for a task, submit queries, turn logits into predictions, build a
task, describe a task.

Services do their own bookkeeping (jobs, limits, files) and reach the model only through this
facade, except the two job kinds that run whole engine procedures in their own threads: β training
(`train_reweighting` on the task's classifier) and the analyses (`run_analysis` on the model).

Loading runs on the scheduler's model thread in the background, so /health answers while the model
converts or loads. A task that cannot load is reported as failed while every other task serves; a
model that cannot load is fatal (`on_fatal`), so the process exits and its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from anchor_cache.classifier import CACHED_METHODS
from anchor_cache.cpus import ThreadFit, torch_threads, usable_cpus
from anchor_cache.errors import ConflictError, UnavailableError
from anchor_cache.graphs import PackedGraphs
from anchor_cache.models import LoadedModel, load_model, resolve_model_dir
from anchor_cache.packed import packed_label_logits
from anchor_cache.registry import ServedTask, TaskRegistry
from anchor_cache.reweighting import TrainConfig, TrainResult, train_reweighting
from anchor_cache.task import Method, TaskSpec
from server.engine_client import Scores, TaskView, derived, text_bytes_bound
from server.metrics import Metrics
from server.scheduler import BatchLimits, Collect, Scheduler, Work
from server.settings import Settings
from server.shipped import SHIPPED_BETAS
from server.store import StateStore, TaskRecord
from server.store.records import stored_specs

log = logging.getLogger(__name__)


def fit_threads(settings: Settings) -> ThreadFit | None:
    """Size torch's thread pool to the CPUs this process may use and the HTTP processes beside it
    (anchor_cache/cpus.py); unless the `torch_threads` setting fixes it or the model is on a GPU,
    the engine then refits it before each batch (`ThreadFit`). Called by the server's entry
    points, not by the app, so tests that build apps keep their own setting."""
    usable = usable_cpus()
    http = max(1, settings.api_servers)
    gpu = settings.device.startswith("cuda") or (settings.device == "auto" and torch.cuda.is_available())
    threads = settings.torch_threads or torch_threads(usable, http, gpu)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # settable only before torch's first parallel work
        torch.set_num_interop_threads(1)
    fitted = not (settings.torch_threads or gpu)
    log.info("torch runs %d thread(s)%s: %d usable CPU(s), %d HTTP process(es)%s%s", threads,
             " at first, then as many as the CPUs left free by other work" if fitted else "", usable, http,
             ", the model on a GPU" if gpu else "", " (the torch_threads setting)" if settings.torch_threads else "")
    return ThreadFit(usable, threads) if fitted else None


def score_parts(work: list[Work], parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each part's (n, 2, C) rows on the host: its served log-probabilities (`ServedTask.logprobs`:
    calibrated where the task is, under the task's class prior), then its raw log-probabilities
    for a calibrated task, its logits otherwise (`scores_of`). One log-softmax per (task, method)
    of the batch, where the forward ran, rather than per request."""
    groups: dict[tuple[int, Method], list[int]] = {}
    for i, w in enumerate(work):
        groups.setdefault((id(w.task), w.method), []).append(i)
    scored: list[torch.Tensor | None] = [None] * len(parts)
    for (_, method), members in groups.items():
        served: ServedTask = work[members[0]].task
        logits = torch.cat([parts[i] for i in members])
        second = torch.log_softmax(logits, -1) if served.calibrated_for(method) else logits
        rows = torch.stack([served.logprobs(logits, method), second], 1)
        for i, part in zip(members, rows.split([parts[i].shape[0] for i in members]), strict=True):
            scored[i] = part
    return scored


def scores_of(part: torch.Tensor, queue_s: float, calibrated: bool) -> Scores:
    """A request's `score_parts` rows as Scores; `calibrated`: its task and method are."""
    rows = part.tolist()
    served, second = [r[0] for r in rows], [r[1] for r in rows]
    return Scores(logits=None if calibrated else second, logprobs=served,
                  raw_logprobs=second if calibrated else None, queue_s=queue_s)


class InProcessEngine:
    def __init__(self, settings: Settings, metrics: Metrics, store: StateStore, behind_frontends: bool = False,
                 thread_fit: ThreadFit | None = None) -> None:
        self.settings = settings
        self.behind_frontends = behind_frontends  # the engine core of server/supervisor.py
        self.thread_fit = thread_fit  # refits torch's threads before each batch; None: they stay as they are
        metrics.torch_threads.set(thread_fit.threads if thread_fit is not None else torch.get_num_threads())
        self.metrics = metrics
        self.store = store
        self.lm: LoadedModel | None = None
        self._registry: TaskRegistry | None = None  # once the model loaded; served once `ready`
        self.scheduler: Scheduler | None = None
        self.graphs: PackedGraphs | None = None  # CUDA graphs of the packed forward, by shape
        self.startup_error: str | None = None
        self.progress = "starting"  # what start-up is doing now, for /ready's 503
        self.started = time.monotonic()
        self.ready_after_s: float | None = None
        self._max_token_bytes = 0
        self._views: dict[str, TaskView] = {}  # by task name, for the version served now

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.ready_after_s is not None

    def report(self, doing: str) -> None:
        self.progress = doing
        log.info("start-up: %s", doing)

    async def start(self, load_tasks: Callable[[], Awaitable[None]], on_fatal: Callable[[], None] | None = None
                    ) -> None:
        """Load the model, then `load_tasks()` (the server's records, each through `apply`), then
        serve. A failure of either is fatal."""
        s = self.settings
        limits = BatchLimits(s.max_batch_size, s.max_batch_tokens, s.max_wait_ms / 1000, s.max_queued_requests,
                             s.refill_wait_fraction)
        self.scheduler = Scheduler(self._run_batch, limits, self.metrics)
        self.scheduler.start()
        try:
            self.progress = f"loading the model {s.model!r}"
            self.lm = await self.scheduler.run_exclusive(lambda: load_model(s.model, s.device, s.dtype))
            # Only HTTP frontends' socket messages share the core's loop: a CPU forward runs on it.
            self.scheduler.forwards_on_loop = self.behind_frontends and self.lm.device.type == "cpu"
            if s.cuda_graphs and self.lm.device.type == "cuda":
                self.graphs = PackedGraphs(self.lm)
            self._max_token_bytes = 4 * max(len(token) for token in self.lm.tokenizer.get_vocab())
            self._registry = TaskRegistry(self.lm, self.store, s.max_tasks, s.max_demo_tokens, SHIPPED_BETAS,
                                          s.prior_window, s.prior_min_samples, s.traffic_window, s.traffic_min_samples)
            await load_tasks()
        except Exception as exc:  # tasks fail one by one as they load; this is the model or the state store
            log.error("start-up failed: %s", exc)
            what = "the model could not be loaded" if self.lm is None else "the state store could not be read"
            self.startup_error = f"start-up failed: {what} (the server log says why)"
            if on_fatal is not None:
                on_fatal()
            return
        registry = self._registry
        self.ready_after_s = time.monotonic() - self.started
        log.info("ready after %.1fs: tasks %s%s", self.ready_after_s, [t.spec.name for t in registry.all()],
                 f"; failed {sorted(registry.failures())}" if registry.failures() else "")

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()

    def require_ready(self) -> None:
        """UnavailableError until the model and every task loaded."""
        self._ready()

    def _ready(self) -> TaskRegistry:
        if not self.ready:
            raise UnavailableError(self.startup_error or "the model and tasks are still loading; retry shortly")
        return self._registry

    # --- what is served -------------------------------------------------------------------------

    def task(self, name: str) -> ServedTask:
        return self._ready().get(name)

    def tasks(self) -> list[ServedTask]:
        return self._ready().all()

    def failures(self) -> dict[str, str]:
        return self._registry.failures() if self.ready else {}

    def knows(self, name: str) -> bool:
        return self.ready and any(t.spec.name == name for t in self._registry.all())

    def describe(self) -> dict[str, Any]:
        """The loaded model as GET /info shows it."""
        lm = self.lm
        if lm is None:
            return {"model": None, "device": None, "dtype": None}
        return {"model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch.")}

    @property
    def num_layers(self) -> int:
        if self.lm is None:
            raise UnavailableError("the model is still loading; retry shortly")
        return self.lm.model.config.num_hidden_layers

    def task_facts(self, served: ServedTask) -> dict[str, Any]:
        """Numbers about a served task that only the engine can count."""
        prompt = served.classifier.prompt
        return {"demonstrations": len(prompt.demonstrations), "context_tokens": len(prompt.context.ids)}

    def demonstration_texts(self, served: ServedTask) -> set[str]:
        return {d.text for d in served.classifier.prompt.demonstrations}

    def check_reweightable(self, served: ServedTask) -> None:
        """Fails unless the task serves β (a β trained for a `reweight: false` task would be dropped
        when it is loaded again) and its method has demonstration label words for β to weight."""
        if not served.spec.reweight:
            raise ConflictError(f"task {served.spec.name!r} serves without β (`reweight: false`, or `method: auto` "
                                "chose or is choosing a method without it); set `reweight: true` to train β")
        served.classifier.label_keys(served.spec.method)

    def track(self, served: ServedTask) -> None:
        name = served.spec.name
        self.metrics.cache_bytes.labels(name).set(served.cache_bytes)
        self.metrics.task_loads.labels(name, "disk" if served.loaded_from_disk else "built").inc()
        self.metrics.traffic_accuracy.remove_by_labels({"task": name})  # this version's traffic starts afresh
        estimate = served.auto.estimate if served.auto is not None else None
        if estimate is not None:
            for bound, key in (("estimate", "accuracy"), ("low", "low"), ("high", "high")):
                self.metrics.estimated_accuracy.labels(name, bound).set(estimate[key])

    # --- classification (the EngineClient protocol, server/engine_client.py) ---------------------

    def model_name(self) -> str:
        self.require_ready()
        return self.lm.name

    def compute_type(self) -> str:
        self.require_ready()
        return self.lm.device.type

    def max_text_bytes(self, max_tokens: int) -> int:
        return text_bytes_bound(max_tokens, self._max_token_bytes)

    @property
    def max_token_bytes(self) -> int:
        return self._max_token_bytes

    @functools.cached_property
    def vocab_size(self) -> int:
        """Token ids the model embeds."""
        return self._ready().lm.model.get_input_embeddings().num_embeddings

    def template_tokens(self, spec: TaskSpec) -> int:
        """Tokens the template itself adds to every query (with an empty text)."""
        lm = self._ready().lm
        return len(lm.tokenizer(spec.render(""), add_special_tokens=False)["input_ids"])

    async def view(self, name: str) -> TaskView:
        return self.view_of(self.task(name))

    def view_of(self, served: ServedTask) -> TaskView:
        """The view of this version of a task, made once per version (every request asks)."""
        view = self._views.get(served.spec.name)
        if view is None or view.handle is not served:
            view = TaskView(spec=served.spec, revision=served.revision, prompt=served.classifier.prompt,
                            anchor_tokens=served.anchor_tokens, has_pool=bool(served.classifier.pool()),
                            handle=served)
            self._views[served.spec.name] = view
        return view

    def submit(self, view: TaskView, method: Method, queries: list[list[int]], deadline: float
               ) -> asyncio.Future[Scores]:
        """Queue tokenised queries of the task version `view.handle`. Each row is charged for what it
        attends over: its cached anchor tokens (the task's own cache size stands in for other
        cached methods) and the tokens re-encoded before it."""
        served: ServedTask = view.handle
        cached = served.anchor_tokens if method in CACHED_METHODS else 0
        attended = cached + view.reencoded_tokens(method)
        queue_s = 0.0

        def started(waited: float) -> None:
            nonlocal queue_s
            queue_s = waited

        scored = self.scheduler.submit(served, method, queries, attended, deadline, started)
        # Cancelled: the scheduler skips what has not reached the model yet.
        calibrated = served.calibrated_for(method)
        return derived(scored, lambda part: scores_of(part, queue_s, calibrated), scored.cancel)

    def _run_batch(self, work: list[Work]) -> list[torch.Tensor] | Collect:
        """`_batch` at the thread count fitted for it (see `ThreadFit`), on the thread that runs it."""
        fit = self.thread_fit
        if fit is None:
            return self._batch(work)
        threads = fit.fit()
        if torch.get_num_threads() != threads:  # OpenMP's count is per thread: this one runs the forward
            torch.set_num_threads(threads)
            self.metrics.torch_threads.set(threads)
        start = time.perf_counter()
        try:
            return self._batch(work)
        finally:
            fit.ran(time.perf_counter() - start)

    @torch.inference_mode()
    def _batch(self, work: list[Work]) -> list[torch.Tensor] | Collect:
        """One packed forward for every row of every part, whatever their tasks and methods; the
        logits come to the host in one copy, as float32, and are scored there (`score_parts`). On
        a GPU the forward is only launched: the copy lands in pinned memory, and the scheduler
        collects it after launching the next batch."""
        rows = [row for w in work
                for row in w.task.classifier.packed_rows(w.queries, w.method, w.task.beta_for(w.method))]
        logits = packed_label_logits(self.lm, rows, graphs=self.graphs)
        flat = torch.cat([row.float().reshape(-1) for row in logits])
        widths = [logits[row].numel() for row in itertools.accumulate((len(w.queries) for w in work[:-1]), initial=0)]
        if not flat.is_cuda:
            return self._scored(work, widths, flat)
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        @torch.inference_mode()  # scoring may run a forward (a method's first content-free calibration)
        def collect() -> list[torch.Tensor]:
            copied.synchronize()
            return self._scored(work, widths, host)

        return collect

    def _scored(self, work: list[Work], widths: list[int], host: torch.Tensor) -> list[torch.Tensor]:
        """The batch's flat host logits split into its parts (a part's rows share their task's
        label count, `widths`), scored; the tasks' accuracy on traffic, which scoring moved, is
        published."""
        sizes = [len(w.queries) * width for w, width in zip(work, widths, strict=True)]
        parts = [part.view(len(w.queries), width)
                 for part, w, width in zip(host.split(sizes), work, widths, strict=True)]
        scored = score_parts(work, parts)
        self._track_traffic(work)
        return scored

    def _track_traffic(self, work: list[Work]) -> None:
        """Each `method: auto` task's accuracy estimated on its traffic, as scored so far, as a metric
        (only a part scored in the task's own method counts towards it)."""
        for served in {id(w.task): w.task for w in work if w.method == w.task.spec.method}.values():
            found = served.traffic.reading()[1] if served.traffic is not None else None
            if found is not None:
                for bound, value in zip(("estimate", "low", "high"), found, strict=True):
                    self.metrics.traffic_accuracy.labels(served.spec.name, bound).set(value)

    # --- building tasks -------------------------------------------------------------------------

    def check_room(self, name: str) -> None:
        """ConflictError when a new task `name` would exceed max_tasks."""
        self._ready().check_room(name)

    def revision(self, name: str) -> int:
        """The revision of `name` applied here last (0: none)."""
        return self._ready().revision(name)

    def build_error(self, name: str, revision: int) -> str | None:
        """Why revision `revision` of `name` did not build here, or None."""
        return self._ready().build_error(name, revision)

    needs_choice = staticmethod(TaskRegistry.needs_choice)
    needs_pool_beta = staticmethod(TaskRegistry.needs_pool_beta)

    def choose_method(self, served: ServedTask, should_stop: Callable[[], bool],
                      on_fold: Callable[[int, int], None]) -> dict[str, Any]:
        """`method: auto`'s choice for `served`, stored (blocking: run it in a job thread)."""
        return self._ready().choose_method(served, should_stop, on_fold)

    def learn_pool_beta(self, served: ServedTask, should_stop: Callable[[], bool],
                        on_step: Callable[[int, int], None]) -> ServedTask:
        """β from the task's pool, stored; the task with it, not served yet (blocking)."""
        return self._ready().learn_pool_beta(served, should_stop, on_step)

    def train_beta(self, served: ServedTask, train: tuple[list[str], list[int]],
                   dev: tuple[list[str], list[int]] | None, cfg: TrainConfig,
                   should_stop: Callable[[], bool]) -> TrainResult:
        """β trained on labelled rows for `served` (blocking)."""
        return train_reweighting(served.classifier, *train, cfg, dev=dev, progress=False, should_stop=should_stop)

    def with_beta(self, served: ServedTask, beta: torch.Tensor, info: dict[str, Any]) -> ServedTask:
        return self._ready().with_beta(served, beta, info)

    def save_beta(self, served: ServedTask) -> None:
        """Store the task's β blob (blocking I/O)."""
        self._ready().save_beta(served)

    def model_dir(self) -> str:
        """Where the model's files are, for frontends that load its tokenizer."""
        return str(resolve_model_dir(self.settings.model))

    def model(self) -> LoadedModel:
        """The loaded model, for the analyses' own forwards."""
        return self._ready().lm

    async def check(self, spec: TaskSpec) -> None:
        """The cheap checks of a build (tokenising, limits), off the event loop, before a write is stored."""
        registry = self._ready()
        await asyncio.to_thread(registry.check, spec)

    def _loaded(self) -> TaskRegistry:
        """The registry once the model loaded (tasks apply from then on, before the server is ready)."""
        if self._registry is None:
            raise UnavailableError(self.startup_error or "the model is still loading; retry shortly")
        return self._registry

    async def apply(self, record: TaskRecord) -> ServedTask | None:
        """Serve a store record (build on the model thread, between batches, then swap in); None when
        it deleted the task, failed (see failures()) or was already superseded here."""
        registry = self._loaded()
        served = await self.scheduler.run_exclusive(
            lambda: registry.apply(record.name, record.revision, record.spec, record.error))
        if served is not None:
            self.track(served)
        elif record.spec is None:
            self.metrics.forget_task(record.name)
            self._views.pop(record.name, None)
        return served

    async def collect_garbage(self, records: dict[str, TaskRecord], grace_s: float) -> None:
        """Delete caches no spec refers to, served or among `records`, on the model thread (it
        tokenises specs to key them)."""
        registry = self._loaded()
        stored, unreadable = stored_specs(records)
        await self.scheduler.run_exclusive(lambda: registry.collect_garbage(grace_s, stored, unreadable))
