"""`EngineClient`: what the classify service needs from an engine, in vLLM's sense (its
`vllm/engine/protocol.py`), implemented in process (`server.inprocess.InProcessEngine`) and across a socket
(`server.remote.RemoteEngine`, the client of an engine-core process).

The service tokenises where it runs, so a task reaches it as a `TaskView`: the task's spec bound
to the tokenizer, at one revision. The engine answers a submitted request with `Scores`, computed
for the whole batch on the engine's side: label-word logits, and log-probabilities (calibrated for
a calibrated task, the raw ones beside them).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from anchor_cache.classifier import Prediction
from anchor_cache.errors import AnchorServeError
from anchor_cache.prompt import TaskPrompt
from anchor_cache.task import Method, TaskSpec

if TYPE_CHECKING:
    import torch

    from anchor_cache.models import LoadedModel
    from anchor_cache.registry import ServedTask
    from anchor_cache.reweighting import TrainConfig, TrainResult
    from server.store import TaskRecord


class TaskChanged(AnchorServeError):
    """The task was replaced after the request was tokenised against it: tokenise again."""

    kind = "conflict"


@dataclass(frozen=True)
class TaskView:
    """A served task at one revision, as much as tokenising and checking a request needs.

    `handle` is the engine's own object for this version (the in-process engine's ServedTask, so a
    task replaced while a request waits still answers with the labels it was tokenised for); a
    remote engine names the version by `revision` instead."""

    spec: TaskSpec
    revision: int
    prompt: TaskPrompt
    anchor_tokens: int  # cached anchor tokens a row of the task's cached methods attends over
    has_pool: bool  # the task has labelled `examples` (what the pool methods need)
    handle: Any = None

    @property
    def name(self) -> str:
        return self.spec.name

    def reencoded_tokens(self, method: Method) -> int:
        """Tokens re-encoded before every query of `method`: the whole demonstration context for
        vanilla, its formatting and labels for text_anchor, none for cached methods and zero-shot."""
        match method:
            case Method.VANILLA:
                return len(self.prompt.context.ids)
            case Method.TEXT_ANCHOR:
                return len(self.prompt.encode_text_anchor_context())
            case _:
                return 0


@dataclass(frozen=True)
class Scores:
    """One request's results, a row per input in input order."""

    # The label words' logits (a head's scores), before softmax; None for a calibrated task, which
    # shows its calibrated log-probabilities where others show logits (`shown_logits`).
    logits: list[list[float]] | None
    logprobs: list[list[float]]  # log-softmax of the served scores: calibrated for a calibrated task
    raw_logprobs: list[list[float]] | None  # before calibration, for a calibrated task; else None
    queue_s: float = 0.0  # waited in the engine's queue before the first forward

    @property
    def shown_logits(self) -> list[list[float]]:
        """What the API shows as the logits: a calibrated task's raw logits are not what it serves."""
        return self.logits if self.logits is not None else self.logprobs

    def predictions(self, labels: list[str]) -> tuple[list[Prediction], list[Prediction] | None]:
        """Per input, the served prediction and (for a calibrated task) the raw one."""
        served = [_prediction(labels, row) for row in self.logprobs]
        raw = [_prediction(labels, row) for row in self.raw_logprobs] if self.raw_logprobs is not None else None
        return served, raw


def _prediction(labels: list[str], logprobs: list[float]) -> Prediction:
    best = max(range(len(logprobs)), key=logprobs.__getitem__)
    return Prediction(index=best, label=labels[best],
                      probs={label: math.exp(lp) for label, lp in zip(labels, logprobs, strict=True)},
                      logprobs=dict(zip(labels, logprobs, strict=True)))


T = TypeVar("T")
R = TypeVar("R")


def derived(inner: asyncio.Future[T], transform: Callable[[T], R], on_cancel: Callable[[], None]
            ) -> asyncio.Future[R]:
    """A future resolved from `inner` through `transform` (its error or cancellation passed on as
    is). Cancelling it while `inner` is pending calls `on_cancel`, so an engine drops the work."""
    outer: asyncio.Future[R] = asyncio.get_running_loop().create_future()

    def resolve(done: asyncio.Future[T]) -> None:
        if outer.done():
            return
        if done.cancelled():
            outer.cancel()
        elif (exc := done.exception()) is not None:
            outer.set_exception(exc)
        else:
            outer.set_result(transform(done.result()))

    def cancel(done: asyncio.Future[R]) -> None:
        if done.cancelled() and not inner.done():
            on_cancel()

    inner.add_done_callback(resolve)
    outer.add_done_callback(cancel)
    return outer


def text_bytes_bound(max_tokens: int, max_token_bytes: int) -> int:
    """UTF-8 bytes beyond which a text certainly has more than `max_tokens` tokens: no token covers
    more bytes than the longest vocabulary entry (`max_token_bytes`, ×4 for non-byte-level
    vocabularies), and the template adds at most a couple of merges at its edges."""
    return (max_tokens + 2) * max_token_bytes


class EngineClient(Protocol):
    """The engine as the classify service sees it. Every method raises AnchorServeError kinds
    (`unavailable` while loading or when the engine is gone, `not_found` for an unknown task)."""

    def model_name(self) -> str:
        """The served model's name (UnavailableError until the model is loaded)."""
        ...

    def compute_type(self) -> str:
        """The model's device type (cpu, cuda, ...): TEI's x-compute-type."""
        ...

    def max_text_bytes(self, max_tokens: int) -> int:
        """UTF-8 bytes beyond which a text certainly has more than `max_tokens` tokens."""
        ...

    async def view(self, name: str) -> TaskView:
        """The task as served now."""
        ...

    def submit(self, view: TaskView, method: Method, queries: list[list[int]], deadline: float
               ) -> asyncio.Future[Scores]:
        """Queue tokenised queries; the future resolves to their Scores, or fails at `deadline`
        (time.monotonic()) with DeadlineExceeded. Cancelling it drops the request's queued rows."""
        ...


class AdminEngineClient(EngineClient, Protocol):
    """The whole engine as the server's other services see it (tasks, analyses, replication, the
    core's endpoint, the public routes): the only way they reach the model, the registry and its
    blobs. The in-process engine implements it; blocking calls (training, choosing, storing a
    blob) run in the caller's thread."""

    ready: bool
    progress: str  # what start-up is doing now
    startup_error: str | None

    def require_ready(self) -> None: ...
    def report(self, doing: str) -> None: ...
    def describe(self) -> dict[str, Any]: ...
    def task(self, name: str) -> ServedTask: ...
    def tasks(self) -> list[ServedTask]: ...
    def failures(self) -> dict[str, str]: ...
    def knows(self, name: str) -> bool: ...
    def view_of(self, served: ServedTask) -> TaskView: ...

    # building and changing tasks
    async def check(self, spec: TaskSpec) -> None: ...
    def check_room(self, name: str) -> None: ...
    def template_tokens(self, spec: TaskSpec) -> int: ...
    async def apply(self, record: TaskRecord) -> ServedTask | None: ...
    async def collect_garbage(self, records: dict[str, TaskRecord], grace_s: float) -> None: ...
    def revision(self, name: str) -> int: ...
    def build_error(self, name: str, revision: int) -> str | None: ...
    def task_facts(self, served: ServedTask) -> dict[str, Any]: ...

    # what a task's pool or a training request teaches it
    def needs_choice(self, served: ServedTask) -> bool: ...
    def needs_pool_beta(self, served: ServedTask) -> bool: ...
    def choose_method(self, served: ServedTask, should_stop: Callable[[], bool],
                      on_fold: Callable[[int, int], None]) -> dict[str, Any]: ...
    def learn_pool_beta(self, served: ServedTask, should_stop: Callable[[], bool],
                        on_step: Callable[[int, int], None]) -> ServedTask: ...
    def check_reweightable(self, served: ServedTask) -> None: ...
    def demonstration_texts(self, served: ServedTask) -> set[str]: ...
    def train_beta(self, served: ServedTask, train: tuple[list[str], list[int]],
                   dev: tuple[list[str], list[int]] | None, cfg: TrainConfig,
                   should_stop: Callable[[], bool]) -> TrainResult: ...
    def with_beta(self, served: ServedTask, beta: torch.Tensor, info: dict[str, Any]) -> ServedTask: ...
    def save_beta(self, served: ServedTask) -> None: ...

    # the analyses and the engine socket
    @property
    def num_layers(self) -> int: ...
    def model(self) -> LoadedModel: ...
    def model_dir(self) -> str: ...
    @property
    def max_token_bytes(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
