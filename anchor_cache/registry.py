"""The tasks one model serves, each with its classifier and anchor cache, one version per name.

The server keeps each task name's current spec with a revision, shared by every replica; this
registry is one replica's served copy, and knows of the store only its blobs (`BlobStore`).
Preparing a task (loading or building its cache) is slow and touches no shared state; swapping the
prepared task in is a single dict assignment. So a replacement builds while the old version keeps
serving, and a failed build leaves the old version in place. `revision(name)` says which revision
this replica last applied.

A damaged cache blob is quarantined and rebuilt (caches are derivable). A damaged β is quarantined
and the task serves without it; its `reweighting` info then reads {"lost": "<reason; where it went>"}.
Every task loads on its own: one that cannot is recorded in `failures()` while the rest serve; so
is a version the server could not read (a damaged record), until it is deleted or replaced.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anchor_cache.arguments import one_line
from anchor_cache.auto import CANDIDATES, choose
from anchor_cache.blobs import (
    BlobStore,
    beta_blob,
    cache_blob,
    cache_identity,
    cache_key,
    choice_blob,
    collect_garbage,
    find_beta,
    find_cache,
    find_choice,
    find_shipped_beta,
    save_beta,
    save_cache,
    save_choice,
    shipped_beta_key,
)
from anchor_cache.classifier import CACHED_METHODS, Classifier, calibrate
from anchor_cache.errors import CacheMismatchError, ConflictError, NotFoundError, UnavailableError, ValidationError
from anchor_cache.models import LoadedModel
from anchor_cache.priors import PriorShift, class_frequencies
from anchor_cache.reweighting import learn_pool_beta, pool_config, pool_hash, pool_rows
from anchor_cache.task import AUTO, HEAD_METHODS, Method, TaskSpec, preview
from anchor_cache.traffic import TrafficAccuracy

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class AutoState:
    """A `method: auto` task's side: the spec as stored (the served task's `spec` is what serves),
    what was chosen ({"status": "choosing"} until then) and the key the choice is stored under."""

    stored: TaskSpec
    info: dict[str, Any]
    key: str

    @property
    def choosing(self) -> bool:
        return self.info.get("status") == "choosing"

    @property
    def estimate(self) -> dict[str, float] | None:
        return self.info.get("estimate")


@dataclass(frozen=True)
class ServedTask:
    spec: TaskSpec
    classifier: Classifier
    key: str  # content hash of model, tokenizer, task and method: names its cache and β
    revision: int  # the store revision this version of the task came from
    cache_bytes: int
    anchor_tokens: int
    build_seconds: float
    loaded_from_disk: bool
    beta: torch.Tensor | None = None  # learned re-weighting for spec.method
    # how β was trained (loss curve, time, examples); {"lost": reason} when a damaged β was quarantined
    reweighting: dict[str, Any] | None = None
    content_free: torch.Tensor | None = None  # (C,) log content-free probabilities when spec.calibrate
    prior: PriorShift | None = None  # the spec's class prior for its own method; adapt's state lives here
    auto: AutoState | None = None  # set for a `method: auto` task
    traffic: TrafficAccuracy | None = None  # a chosen `method: auto` task's: its accuracy on recent rows
    # the same for the other label-word methods a request may ask for, made on first use (model thread)
    _other_content_free: dict[Method, torch.Tensor] = dataclasses.field(default_factory=dict, init=False, compare=False,
                                                                        repr=False)

    @property
    def cached(self) -> bool:
        return self.spec.method in CACHED_METHODS

    @property
    def written(self) -> TaskSpec:
        """The spec as the store holds it (`method: auto` serves as the method it chose)."""
        return self.auto.stored if self.auto is not None else self.spec

    @property
    def temperature(self) -> float:
        """`method: auto`'s temperature, fitted on the chosen method's out-of-fold predictions."""
        estimate = self.auto.estimate if self.auto is not None else None
        return float(estimate["temperature"]) if estimate is not None else 1.0

    def beta_for(self, method: Method) -> torch.Tensor | None:
        """β applies to the method it was trained in; other methods requested per call run without."""
        return self.beta if method == self.spec.method else None

    def calibrated_for(self, method: Method) -> bool:
        """Whether `method`'s scores are calibrated: on a calibrated task, every method that scores
        the label words (a pool head's scores are its own)."""
        return self.content_free is not None and method not in HEAD_METHODS

    def scores(self, logits: torch.Tensor, method: Method) -> torch.Tensor:
        """Calibrated label scores when `calibrated_for(method)`, raw otherwise. A method other than
        the task's own is calibrated against its own content-free scores, computed (a forward of the
        content-free inputs) the first time it is asked for: call this on the model thread."""
        if not self.calibrated_for(method):
            return logits
        if method == self.spec.method:
            return calibrate(logits, self.content_free)
        if method not in self._other_content_free:
            self._other_content_free[method] = self.classifier.content_free_logprobs(method).to(logits.device)
        return calibrate(logits, self._other_content_free[method])

    def logprobs(self, logits: torch.Tensor, method: Method) -> torch.Tensor:
        """The served log-probabilities: `scores`, then for the task's own method moved to its class
        prior (`adapt` first observes the rows, so a batch already counts towards its estimate); what
        is served also counts towards the accuracy estimated on the task's traffic."""
        if method != self.spec.method:
            return torch.log_softmax(self.scores(logits, method), -1)
        logprobs = torch.log_softmax(self.scores(logits, method) / self.temperature, -1)
        if self.prior is not None:
            self.prior.observe(logprobs)
            logprobs = torch.log_softmax(self.prior.correct(logprobs), -1)
        if self.traffic is not None:
            self.traffic.observe(logprobs)
        return logprobs


def provisional(spec: TaskSpec) -> TaskSpec:
    """How a `method: auto` task serves until its method is chosen: Hidden_anchor without β."""
    return spec.model_copy(update={"method": Method.HIDDEN_ANCHOR, "reweight": False})


def resolved(spec: TaskSpec, info: dict[str, Any]) -> TaskSpec:
    """A `method: auto` task as the method its choice names (calibration only where it applies)."""
    method = Method(info["method"])
    return spec.model_copy(update={"method": method, "reweight": bool(info["reweight"]),
                                   "calibrate": spec.calibrate and method not in HEAD_METHODS})


def _log_progress(name: str, what: str, then: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
    """Logs `what` done of total at every tenth of the total, then calls `then` (a job's progress)."""

    def report(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            log.info("task %s: %s %d/%d", name, what, done, total)
        if then is not None:
            then(done, total)

    return report


class TaskRegistry:
    def __init__(self, lm: LoadedModel, store: BlobStore, max_tasks: int, max_demo_tokens: int,
                 shipped_betas: Path | None = None, prior_window: int = 2000, prior_min_samples: int = 200,
                 traffic_window: int = 2000, traffic_min_samples: int = 200) -> None:
        self.lm = lm
        self.prior_window, self.prior_min_samples = prior_window, prior_min_samples  # `prior: adapt`'s
        self.traffic_window, self.traffic_min_samples = traffic_window, traffic_min_samples  # TrafficAccuracy's
        self.store = store
        self.shipped_betas = shipped_betas  # β files shipped with the server, read when the store has none
        self.max_tasks = max_tasks
        self.max_demo_tokens = max_demo_tokens
        self._tasks: dict[str, ServedTask] = {}
        self._failed: dict[str, str] = {}  # task name -> why it could not load
        self._revisions: dict[str, int] = {}  # task name -> the store revision applied here last
        self._errors: dict[str, tuple[int, str]] = {}  # task name -> (revision, why it did not build here)

    # --- preparing a task -------------------------------------------------------------------------

    def key_of(self, spec: TaskSpec) -> str:
        """The cache key of `spec` under this model (tokenises its demonstrations); for `method:
        auto`, the key its choice is stored under."""
        if spec.method == AUTO:
            return self.choice_key(spec)
        clf = Classifier(self.lm, spec)
        return cache_key(cache_identity(self.lm, clf.prompt, spec.method, clf.seed))

    def choice_key(self, spec: TaskSpec, clf: Classifier | None = None) -> str:
        """What a `method: auto` choice depends on besides the pool (its manifest holds the pool's
        hash); `clf`: the spec's provisional classifier, when one is at hand."""
        clf = clf or Classifier(self.lm, provisional(spec))
        return cache_key(cache_identity(self.lm, clf.prompt, Method.HIDDEN_ANCHOR, clf.seed) | {"choice": AUTO})

    def check(self, spec: TaskSpec) -> Classifier:
        """The cheap checks of `prepare` (tokenising, limits), without running the model: a spec
        that passes them is stored, then built by every replica."""
        clf = Classifier(self.lm, provisional(spec) if spec.method == AUTO else spec)
        n_demo = len(clf.prompt.context.ids)
        if n_demo > self.max_demo_tokens:
            raise ValidationError(
                f"task {spec.name!r}: demonstrations take {n_demo} tokens, the limit is {self.max_demo_tokens}"
            )
        positions = self.lm.max_positions
        query = len(clf.prompt.encode(""))
        if positions is not None and n_demo + query + 1 > positions:
            raise ValidationError(
                f"task {spec.name!r}: demonstrations ({n_demo} tokens) and the template ({query}) leave no room for "
                f"a text within the model's {positions} positions; use fewer or shorter demonstrations"
            )
        return clf

    def prepare(self, spec: TaskSpec, revision: int = 0) -> ServedTask:
        """Validate the task and load (or build and store) its cache and β; registers nothing.

        A damaged cache blob is quarantined and rebuilt; a damaged β blob is quarantined and the
        task comes back without β, its `reweighting` saying {"lost": reason}. A `method: auto` task
        serves as the method its stored choice names, or, until one is made for its pool, as
        `provisional` (the server then chooses in a background job: `choose_method`)."""
        if spec.method != AUTO:
            return self._prepare(spec, revision)
        clf = Classifier(self.lm, provisional(spec))
        key = self.choice_key(spec, clf)
        try:
            info = find_choice(self.store, key)
        except CacheMismatchError as exc:
            self._quarantine(choice_blob(key), exc, f"task {spec.name}: choosing its method again")
            info = None
        if info is not None and (info.get("pool") != pool_hash(clf)
                                 or set(info.get("candidates", ())) != {c.name for c in CANDIDATES}):
            info = None  # chosen on another pool, or among other candidates
        served = self._prepare(resolved(spec, info) if info is not None else provisional(spec), revision)
        auto = AutoState(stored=spec, info=info or {"status": "choosing"}, key=key)
        pool_estimate, traffic = auto.estimate, None
        if pool_estimate is not None:
            traffic = TrafficAccuracy(pool_estimate["accuracy"] - pool_estimate["low"],
                                      pool_estimate["high"] - pool_estimate["accuracy"], self.traffic_window,
                                      self.traffic_min_samples)
        return dataclasses.replace(served, auto=auto, traffic=traffic)

    @staticmethod
    def needs_choice(served: ServedTask) -> bool:
        return served.auto is not None and served.auto.choosing

    def choose_method(self, served: ServedTask, should_stop: Callable[[], bool] | None = None,
                      on_fold: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Choose a `method: auto` task's method on its pool (auto.py) and store the choice; the
        task serves it once its record is applied again."""
        clf, name, auto = served.classifier, served.spec.name, served.auto
        if auto is None:
            raise ValueError(f"task {name!r} is not a method: auto task")
        texts, classes = pool_rows(clf)
        log.info("task %s: choosing its method on %d pool rows", name, len(texts))
        choice = choose(clf, texts, classes, pool_config(Method.HIDDEN_ANCHOR), should_stop=should_stop,
                        on_fold=_log_progress(name, "choosing its method, fold", on_fold))
        info = choice.info() | {"pool": pool_hash(clf), "chosen_at": time.time()}
        save_choice(self.store, auto.key, info)
        estimate = choice.estimate
        log.info("task %s: chose %s (cross-validated accuracy %.1f%%, 95%% interval %.1f-%.1f%%)", name,
                 choice.chosen.name, 100 * estimate.accuracy, 100 * estimate.low, 100 * estimate.high)
        return info

    def _prepare(self, spec: TaskSpec, revision: int) -> ServedTask:
        start = time.perf_counter()
        clf = self.check(spec)
        identity = cache_identity(self.lm, clf.prompt, spec.method, clf.seed)
        key, loaded = cache_key(identity), False
        if spec.method in CACHED_METHODS:
            try:
                cache = find_cache(self.store, identity, self.lm)
            except CacheMismatchError as exc:
                self._quarantine(cache_blob(key), exc, f"task {spec.name}: rebuilding its cache")
                cache = None
            loaded = cache is not None
            if loaded:
                clf.install_cache(spec.method, cache)
            else:
                save_cache(self.store, clf.prefix(spec.method).cache, identity, self.lm.name)
        beta, info = None, None
        try:
            # `reweight: false` serves without β even where one is stored under the same key (learned
            # while the task, or a method: auto choice, asked for it)
            beta, info = (spec.reweight and find_beta(self.store, key, self.lm)) or (None, None)
        except CacheMismatchError as exc:
            moved = self._quarantine(beta_blob(key), exc, f"task {spec.name}: serving without β")
            info = {"lost": f"{exc}; moved to {moved}"}
        if beta is None and info is None and spec.examples is not None and spec.reweight:
            # Shipped for the built-in task's pool: not for a task with no pool to have learned it
            # from, nor for one that asked for none. Another pool serves it until its own is learned.
            beta, info = self._shipped_beta(identity) or (None, None)
        clf.head(spec.method, beta)  # a head method fits its head on the pool now, not on the first request
        prefix = clf.prefix(spec.method)
        served = self.with_beta(
            ServedTask(
                spec=spec,
                classifier=clf,
                key=key,
                revision=revision,
                cache_bytes=prefix.kv_bytes,
                anchor_tokens=prefix.cache.num_tokens if prefix.cache is not None else 0,
                build_seconds=0.0,
                loaded_from_disk=loaded,
                prior=PriorShift(spec.prior, class_frequencies(pool_rows(clf)[1], len(spec.labels)),
                                 self.prior_window, self.prior_min_samples),
            ),
            beta,
            info,
        )
        served = dataclasses.replace(served, build_seconds=time.perf_counter() - start)
        log.info(
            "task %s (revision %d) ready: %s, cache %d tokens / %d bytes, %s in %.2fs%s", spec.name, revision,
            spec.method, served.anchor_tokens, served.cache_bytes, "loaded from the store" if loaded else "built",
            served.build_seconds, ", with learned β" if served.beta is not None else "",
        )
        return served

    def _shipped_beta(self, identity: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]] | None:
        """A β shipped for this task and these weights (in any dtype); a damaged one is skipped, as
        the task then learns β again."""
        if self.shipped_betas is None:
            return None
        try:
            return find_shipped_beta(self.shipped_betas, shipped_beta_key(identity, self.lm), self.lm)
        except CacheMismatchError as exc:
            log.warning("shipped β skipped: %s", exc)
            return None

    def with_beta(self, served: ServedTask, beta: torch.Tensor | None, info: dict[str, Any] | None) -> ServedTask:
        """The task with β applied; calibration is recomputed under it (computed once, then cached),
        and the accuracy on traffic starts again: rows served under another β are another method's."""
        content_free = None
        if served.spec.calibrate:
            content_free = served.classifier.content_free_logprobs(served.spec.method, beta)
        traffic = served.traffic.emptied() if served.traffic is not None else None
        return dataclasses.replace(served, beta=beta, reweighting=info, content_free=content_free, traffic=traffic)

    def save_beta(self, served: ServedTask) -> None:
        """Store the task's β and training info as one blob."""
        save_beta(self.store, served.key, served.beta, served.reweighting or {})

    @staticmethod
    def needs_pool_beta(served: ServedTask) -> bool:
        """A task with an `examples` pool whose β is missing, or was learned from another pool (a β
        an admin job trained is kept); not with `reweight: false`."""
        if served.spec.examples is None or served.spec.method == Method.KNN or not served.spec.reweight:
            return False
        info = served.reweighting or {}
        if served.beta is None:
            return True
        return info.get("source") == "examples" and info.get("pool") != pool_hash(served.classifier)

    def learn_pool_beta(self, served: ServedTask, should_stop: Callable[[], bool] | None = None,
                        on_step: Callable[[int, int], None] | None = None) -> ServedTask:
        """Learn β from the task's pool and store its blob; returns the task with it (not served yet)."""
        name = served.spec.name
        log.info("task %s: learning β from its %d pool examples", name, len(pool_rows(served.classifier)[0]))
        beta, info = learn_pool_beta(served.classifier, should_stop, _log_progress(name, "learning β, step", on_step))
        trained = self.with_beta(served, beta, info)
        self.save_beta(trained)
        log.info("task %s: β learned in %.1fs (loss %.4f -> %.4f)", name, info["seconds"], info["epoch_losses"][0],
                 info["epoch_losses"][-1])
        return trained

    # --- the served set ---------------------------------------------------------------------------

    def check_room(self, name: str) -> None:
        """The one max_tasks check: a new name needs a free place (replacing one always fits)."""
        if name not in self._tasks and len(self._tasks) >= self.max_tasks:
            raise ConflictError(f"already serving {self.max_tasks} tasks (max_tasks); delete one first")

    def put(self, served: ServedTask) -> None:
        """Serve `served` (replacing its name); clears a recorded failure of that name."""
        self.check_room(served.spec.name)
        self._tasks[served.spec.name] = served
        self._failed.pop(served.spec.name, None)
        self._revisions[served.spec.name] = served.revision

    def fail(self, name: str, revision: int, reason: str) -> None:
        """Record that revision `revision` of `name` cannot serve here (a previous version, if any,
        keeps serving: a failed change never takes a working task away)."""
        if name not in self._tasks:
            self._failed[name] = reason
        self._revisions[name] = revision
        self._errors[name] = (revision, reason)

    def build_error(self, name: str, revision: int) -> str | None:
        """Why revision `revision` of `name` did not build here, or None (it built, or was skipped)."""
        failed_revision, reason = self._errors.get(name, (None, None))
        return reason if failed_revision == revision else None

    def remove(self, name: str, revision: int | None = None) -> ServedTask | None:
        """Stop serving `name` and forget its failure; returns the task if it was serving.
        `revision`: the store's tombstone being applied (None: raise NotFoundError for an unknown name)."""
        if revision is None and name not in self._tasks and name not in self._failed:
            raise NotFoundError(f"unknown task {preview(name)}; known tasks: {sorted(self._tasks)}")
        if revision is not None:
            self._revisions[name] = revision
        self._failed.pop(name, None)
        return self._tasks.pop(name, None)

    def revision(self, name: str) -> int:
        """The store revision of `name` this replica applied last (0: none)."""
        return self._revisions.get(name, 0)

    def get(self, name: str) -> ServedTask:
        if name in self._tasks:
            return self._tasks[name]
        if name in self._failed:
            raise UnavailableError(f"task {name!r} failed to load: {self._failed[name]}")
        raise NotFoundError(f"unknown task {preview(name)}; known tasks: {sorted(self._tasks)}")

    def all(self) -> list[ServedTask]:
        """The serving tasks (failed ones are in `failures()`)."""
        return list(self._tasks.values())

    def failures(self) -> dict[str, str]:
        """Task name -> why it could not load; names in no absolute path."""
        return dict(self._failed)

    # --- applying versions ------------------------------------------------------------------------

    def apply(self, name: str, revision: int, spec: dict[str, Any] | None, error: str | None = None
              ) -> ServedTask | None:
        """Make this replica serve revision `revision` of `name` (build, then swap in); returns the
        task it put, if any. `spec` None is a deletion; `error`, a version that could not be read,
        which fails the name. A revision no newer than the one applied here is skipped, so
        revisions only move forward. Never raises for a task that cannot serve: that is recorded in
        `failures()`. Raises UnavailableError when the blob store fails mid-build, leaving the
        revision to be applied again."""
        if name in self._revisions and revision <= self._revisions[name]:
            return None  # applied already, or a newer revision was applied meanwhile
        if error is not None:
            self.remove(name, revision)
            self.fail(name, revision, error)
            log.error("task %s: %s", name, error)
            return None
        if spec is None:
            if self.remove(name, revision) is not None:
                log.info("task %s deleted (revision %d)", name, revision)
            return None
        try:
            served = self.prepare(TaskSpec.model_validate(spec), revision)
            self.put(served)
            return served
        except UnavailableError:
            # The store went away mid-build: nothing is wrong with this revision, so it is not
            # recorded as applied, and the next resync builds it again once the store is back.
            log.warning("task %s (revision %d): the state store is unreachable; building it again when it is "
                        "back", name, revision)
            raise
        except Exception as exc:  # one task that cannot load must leave the others serving
            self.fail(name, revision, one_line(exc))
            log.error("task %s (revision %d) failed to load: %s", name, revision, one_line(exc))
            return None

    def _quarantine(self, blob: str, reason: BaseException, consequence: str) -> str:
        """Move a damaged blob aside and log one line; returns where it went."""
        moved = self.store.quarantine_blob(blob)
        log.error("%s: %s; moved to %s", consequence, one_line(reason), moved)
        return moved

    # --- garbage collection -----------------------------------------------------------------------

    def collect_garbage(self, grace_s: float, stored: dict[str, tuple[int, dict[str, Any]]],
                        unreadable: list[str]) -> int:
        """Delete cache and β blobs whose key no live spec has (served, or `stored`: name ->
        (revision, spec) of every live version the server keeps) and that nobody wrote or loaded for
        `grace_s` seconds; returns the bytes freed. While some live spec's key is unknown (one of
        `unreadable`, a failed task whose β an operator may still recover), β blobs are kept: unlike
        caches they cannot be rebuilt."""
        serving = dict(self._tasks)  # a snapshot: a build may `put` meanwhile
        live = {served.key for served in serving.values()}
        live |= {served.auto.key for served in serving.values() if served.auto is not None}
        unknown = [f"{name} (failed to load)" for name in self.failures()]
        unknown += [f"{name} (unreadable)" for name in unreadable]
        for name, (revision, spec) in stored.items():
            served = serving.get(name)
            if served is not None and served.revision == revision:
                continue
            try:
                live.add(self.key_of(TaskSpec.model_validate(spec)))
            except Exception as exc:  # a spec that cannot be prepared has no key
                unknown.append(f"{name} ({one_line(exc)})")
        if unknown:
            log.warning("garbage collection keeps all β blobs: no key for %s", ", ".join(unknown))
        freed = collect_garbage(self.store, live, grace_s, keep_beta=bool(unknown))
        if freed:
            log.info("garbage collection freed %d bytes", freed)
        return freed
