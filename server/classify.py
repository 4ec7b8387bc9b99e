"""The classify service: everything between a parsed request and its predictions.

It checks the request's limits, tokenises off the event loop (after a byte-length check, so a huge
input costs nothing), submits to the scheduler with a deadline, races the result against the
client's disconnect and the deadline, applies calibration and counts usage. The route only parses
and shapes the response (vLLM's ServingClassification split).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from anchor_cache.classifier import Prediction
from anchor_cache.errors import ValidationError
from anchor_cache.task import Method
from server.engine import Engine
from server.errors import DeadlineExceeded
from server.metrics import Metrics
from server.settings import Settings


@dataclass(frozen=True)
class Classification:
    model: str
    labels: list[str]
    predictions: list[Prediction]
    raw: list[Prediction] | None  # before calibration, for calibrated tasks
    prompt_tokens: int


class ClassifyService:
    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics

    def _check_inputs(self, texts: list[str]) -> None:
        s = self.settings
        if not texts:
            raise ValidationError("input is empty: give a text or a non-empty list of texts")
        if len(texts) > s.max_inputs_per_request:
            raise ValidationError(
                f"{len(texts)} inputs in one request; the limit is {s.max_inputs_per_request} (max_inputs_per_request)"
            )
        if s.truncate:
            return
        too_long = self.engine.max_text_bytes(s.max_input_tokens)
        for i, text in enumerate(texts):
            if len(text.encode()) > too_long:
                raise ValidationError(
                    f"input {i} has {len(text.encode())} bytes, certainly more than the limit of {s.max_input_tokens} "
                    "tokens (max_input_tokens). Shorten it, or start the server with ANCHORSERVE_TRUNCATE=true"
                )

    async def classify(
        self, task: str, texts: list[str], method: Method | None, disconnected: Callable[[], Awaitable[None]]
    ) -> Classification:
        """Predictions for `texts` on `task`; DeadlineExceeded past request_timeout_s (counted from
        arrival, tokenising included) or when the client goes away first; either way its queued
        work is dropped before the forward."""
        s = self.settings
        served = self.engine.task(task)
        self._check_inputs(texts)
        deadline = time.monotonic() + s.request_timeout_s
        method = method or served.spec.method
        start = time.perf_counter()
        queries = await asyncio.to_thread(self.engine.encode, served, texts, s.max_input_tokens, s.truncate)
        self.metrics.tokenize_seconds.observe(time.perf_counter() - start)
        for q in queries:
            self.metrics.request_tokens.observe(len(q))
        prefix = self.engine.prefix_tokens(served, method)
        future = await self.engine.submit(served, method, queries, prefix, deadline)
        logits = await self._race(future, disconnected)
        predictions, raw = self.engine.predictions(served, method, logits)
        return Classification(
            model=self.engine.describe()["model"], labels=served.spec.labels, predictions=predictions, raw=raw,
            prompt_tokens=sum(len(q) + prefix for q in queries),
        )

    async def _race(self, future: asyncio.Future, disconnected: Callable[[], Awaitable[None]]) -> torch.Tensor:
        """The logits, or DeadlineExceeded: the scheduler fails the future at its deadline (and
        counts it); a client that leaves first has its queued work cancelled here."""
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
