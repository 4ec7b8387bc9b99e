"""The classify service: everything between a parsed request and its predictions.

It resolves the task (the request's, or `default_task`) and checks the model the request names,
checks the request's limits, tokenises off the event loop (after a byte-length check, so a huge
input costs nothing; with truncation, cutting the end or the start of each text), submits to the
scheduler with a deadline, races the result against the client's disconnect and the deadline,
applies calibration, counts usage and times each step. The routes (`/v1/classify` in vLLM's shape,
`/predict` in TEI's) only parse and shape the response (vLLM's ServingClassification split).

Timing, as TEI's headers report it (`Timing`): the scheduler does not tell when a queued request's
forward starts, so the time between entering the queue and getting the logits back, waiting for a
batch included, counts as inference; queue time is only the admission into the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from anchor_cache.classifier import Prediction
from anchor_cache.errors import ValidationError
from anchor_cache.registry import ServedTask
from anchor_cache.task import Method
from server.engine import Engine
from server.errors import DeadlineExceeded, ModelNotServed
from server.metrics import Metrics
from server.settings import Settings

# The ASGI `receive` of the request: the service listens on it for the client's disconnect.
Receive = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Timing:
    """Seconds one request spent in each step (TEI's split, see the module docstring)."""

    total_s: float  # from entering the service to the predictions
    tokenization_s: float  # rendering the template and tokenising, off the event loop
    queue_s: float  # admission into the scheduler's queue
    inference_s: float  # from the queue to the predictions: waiting for a batch, forward(s), calibration
    compute_tokens: int  # tokens the forwards ran (= usage.prompt_tokens)


@dataclass(frozen=True)
class Classification:
    model: str
    task: str
    labels: list[str]
    predictions: list[Prediction]
    raw: list[Prediction] | None  # before calibration, for calibrated tasks
    logits: list[list[float]]  # the label words' logits, before softmax and calibration
    prompt_tokens: int
    timing: Timing


class ClassifyService:
    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.created = int(time.time())  # GET /v1/models' `created`

    # --- what is served ---------------------------------------------------------------------------

    def task_name(self, task: str | None) -> str:
        """The request's task, or the default: `default_task`, else the first configured task ("" when none)."""
        if task is not None:
            return task
        s = self.settings
        return s.default_task or (s.tasks[0].name if s.tasks else "")

    def model_name(self) -> str:
        """The served model's name (503 while loading)."""
        self.engine.require_ready()
        return self.engine.describe()["model"]

    def _check_model(self, model: str | None) -> None:
        """vLLM's _check_model: a request may name the served model (or the `model` setting it was loaded from)."""
        name = self.model_name()
        if model is not None and model not in (name, self.settings.model):
            raise ModelNotServed(f"the model {model!r} is not served here; this server serves {name!r} "
                                 "(GET /v1/models), or leave `model` out")

    # --- classification ---------------------------------------------------------------------------

    def _check_inputs(self, texts: list[str], truncate: bool) -> None:
        s = self.settings
        if not texts:
            raise ValidationError("input is empty: give a text or a non-empty list of texts")
        if len(texts) > s.max_inputs_per_request:
            raise ValidationError(
                f"{len(texts)} inputs in one request; the limit is {s.max_inputs_per_request} (max_inputs_per_request)"
            )
        if truncate:
            return
        too_long = self.engine.max_text_bytes(s.max_input_tokens)
        for i, text in enumerate(texts):
            if len(text.encode()) > too_long:
                raise ValidationError(
                    f"input {i} has {len(text.encode())} bytes, certainly more than the limit of {s.max_input_tokens} "
                    "tokens (max_input_tokens). Shorten it, send \"truncate\": true, or start the server with "
                    "ANCHORSERVE_TRUNCATE=true"
                )

    def _encode(self, served: ServedTask, texts: list[str], truncate: bool,
                direction: Literal["right", "left"]) -> list[list[int]]:
        """Token ids of each text in the task's template, within max_input_tokens (runs in a thread).
        The engine facade truncates at the end; cutting the start is done here, text by text."""
        max_tokens = self.settings.max_input_tokens
        if not truncate or direction == "right":
            return self.engine.encode(served, texts, max_tokens, truncate)
        # Any text longer than this many characters is cut anyway: keep its tail only, before tokenising.
        tail = self.engine.max_text_bytes(max_tokens)
        prompt = served.classifier.prompt
        return [prompt.encode_within(text[-tail:], max_tokens, direction="left") for text in texts]

    async def classify(
        self, task: str | None, texts: list[str], method: Method | None, receive: Receive, *,
        model: str | None = None, truncate: bool | None = None, direction: Literal["right", "left"] = "right",
    ) -> Classification:
        """Predictions for `texts` on `task` (None: the default task). `truncate` None follows the
        server's setting. DeadlineExceeded past request_timeout_s (counted from arrival, tokenising
        included) or when the client goes away first (its disconnect arrives on `receive`); either
        way its queued work is dropped before the forward."""
        start = time.perf_counter()
        s = self.settings
        name = self.task_name(task)
        self._check_model(model)
        if not name:
            raise ValidationError("no task given and none configured: send \"task\", or set default_task")
        served = self.engine.task(name)
        truncate = s.truncate if truncate is None else truncate
        self._check_inputs(texts, truncate)
        deadline = time.monotonic() + s.request_timeout_s
        method = method or served.spec.method
        self.engine.check_method(served, method)
        tokenizing = time.perf_counter()
        queries = await asyncio.to_thread(self._encode, served, texts, truncate, direction)
        queued = time.perf_counter()
        self.metrics.tokenize_seconds.observe(queued - tokenizing)
        for q in queries:
            self.metrics.request_tokens.observe(len(q))
        prefix = self.engine.prefix_tokens(served, method)
        future = await self.engine.submit(served, method, queries, prefix, deadline)
        admitted = time.perf_counter()
        logits = await self._race(future, receive)
        predictions, raw = self.engine.predictions(served, method, logits)
        done = time.perf_counter()
        prompt_tokens = sum(len(q) + prefix for q in queries)
        return Classification(
            model=self.engine.describe()["model"], task=name, labels=served.spec.labels, predictions=predictions,
            raw=raw, logits=logits.float().tolist(), prompt_tokens=prompt_tokens,
            timing=Timing(total_s=done - start, tokenization_s=queued - tokenizing, queue_s=admitted - queued,
                          inference_s=done - admitted, compute_tokens=prompt_tokens),
        )

    async def _race(self, future: asyncio.Future, receive: Receive) -> torch.Tensor:
        """The logits, or DeadlineExceeded: the scheduler fails the future at its deadline (and
        counts it); a client that leaves first has its queued work cancelled here."""

        async def disconnected() -> None:
            """Resolves when the client goes away (vLLM's with_cancellation listens the same way)."""
            while (await receive())["type"] != "http.disconnect":
                pass

        waiter = asyncio.ensure_future(asyncio.shield(future))
        gone = asyncio.ensure_future(disconnected())
        done, _ = await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if waiter in done:
            return waiter.result()
        future.cancel()  # the scheduler skips it if it has not started
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        self.metrics.failures.labels("client_disconnected").inc()
        raise DeadlineExceeded("the client went away before its result")
