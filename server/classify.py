"""The classify service: everything between a parsed request and its predictions.

It resolves the task (the request's, or `default_task`) and checks the model the request names,
checks the request's limits, tokenises where it runs (after a byte-length check, so a huge input
costs nothing; with truncation, cutting the end or the start of each text), submits to the engine
with a deadline, races the result against the client's disconnect and the deadline, counts usage
and times each step. The engine is an `EngineClient`: the engine in this process, or an engine-core
process behind a socket (server/remote.py), so the same service runs in every HTTP frontend. The
routes (`/v1/classify` in vLLM's shape, `/predict` in TEI's) only parse and shape the response
(vLLM's ServingClassification split).

Small requests are tokenised on the event loop (a fast-tokenizer call is tens of microseconds, far
less than a thread hop under load); requests with more text than `INLINE_TOKENIZE_BYTES` go to a
thread, so one large request cannot stall the loop.

Timing, as TEI's headers report it (`Timing`): queue time is the wait in the engine's queue until the
request's first forward starts; inference is the rest, until the predictions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from anchor_cache.classifier import CACHED_METHODS, Prediction
from anchor_cache.errors import ValidationError
from anchor_cache.task import POOL_METHODS, Method
from server.engine_client import EngineClient, Scores, TaskChanged, TaskView
from server.errors import ClientDisconnected, EmptyInput, InputLimit, ModelNotServed
from server.metrics import Metrics
from server.protocol import ClassifyRequest
from server.settings import Settings

# The ASGI `receive` of the request: the service listens on it for the client's disconnect.
Receive = Callable[[], Awaitable[dict[str, Any]]]

# Text per request tokenised on the event loop; more goes to a thread (see the module docstring).
INLINE_TOKENIZE_BYTES = 16_384
TOKENISER_THREADS = 2  # for inputs above that: the Rust tokenizer releases the GIL while it works


class DisconnectWatch:
    """Cancels `future` when the client disconnects first, watched by a callback chain on the ASGI
    `receive` (vLLM's with_cancellation listens the same way), not a task racing the result.

    It leaves no reference cycle behind, so a request's objects are freed when it ends, not by
    the cyclic collector's full collections (under load, a 20-60 ms stall every 1-2 s per
    frontend): it is an object, not a closure naming itself, and its last `receive` is left to
    finish rather than cancelled (a CancelledError's traceback holds the frames that hold it). By
    the ASGI spec that `receive` returns http.disconnect once the response is sent; uvicorn wakes
    it then, or when the connection closes."""

    def __init__(self, future: asyncio.Future, receive: Receive) -> None:
        self.future = future
        self.receive = receive
        self.left = False  # the client disconnected before the result
        self.waiting: asyncio.Future | None = None  # the receive in flight, kept: the loop holds tasks weakly

    def __call__(self, waiting: asyncio.Future | None = None) -> None:
        if self.future.done():
            return
        if waiting is not None and not waiting.cancelled() and waiting.exception() is None \
                and waiting.result()["type"] == "http.disconnect":
            self.left = True
            self.future.cancel()  # the engine skips it if it has not started
            return
        self.waiting = asyncio.ensure_future(self.receive())
        self.waiting.add_done_callback(self)


@dataclass(frozen=True)
class Timing:
    """Seconds one request spent in each step (TEI's split, see the module docstring)."""

    total_s: float  # from entering the service to the predictions
    tokenization_s: float  # rendering the template and tokenising
    queue_s: float  # waiting in the engine's queue for the first forward
    inference_s: float  # from the first forward to the predictions: forward(s), calibration, the way back
    compute_tokens: int  # tokens the forwards ran (= usage.prompt_tokens)
    compute_characters: int  # characters of the inputs
    compute_type: str  # the model's device type


@dataclass(frozen=True)
class Classification:
    model: str
    task: str
    labels: list[str]
    predictions: list[Prediction]
    raw: list[Prediction] | None  # before calibration, for calibrated tasks
    # The scores `predictions` are the softmax of, for clients that ask for them: the label words'
    # logits, or on a calibrated task the calibrated log-probabilities (raw logits would not agree
    # with the probabilities beside them).
    logits: list[list[float]]
    prompt_tokens: int
    cached_tokens: int  # anchor-cache tokens the inputs attended to, summed
    timing: Timing


class ClassifyService:
    def __init__(self, engine: EngineClient, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.created = int(time.time())  # GET /v1/models' `created`
        # Large inputs are tokenised on threads of classification's own: admin work (task checks,
        # file reads, store calls) runs on the loop's default threads, and six concurrent oversized
        # creates once filled those and made a classify request wait 95 s.
        self._tokenisers = ThreadPoolExecutor(max_workers=TOKENISER_THREADS, thread_name_prefix="anchorserve-tokenise")

    def close(self) -> None:
        self._tokenisers.shutdown(wait=False, cancel_futures=True)

    # --- what is served ---------------------------------------------------------------------------

    def task_name(self, task: str | None) -> str:
        """The request's task, or the default: `default_task`, else the first configured task ("" when none)."""
        if task is not None:
            return task
        s = self.settings
        return s.default_task or (s.tasks[0].name if s.tasks else "")

    def model_name(self) -> str:
        """The served model's name (503 while loading)."""
        return self.engine.model_name()

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
            raise EmptyInput("input is empty: give a text or a non-empty list of texts")
        if "" in texts:
            raise EmptyInput(f"input {texts.index('')} is an empty text: there is nothing to classify")
        if len(texts) > s.max_inputs_per_request:
            raise InputLimit(
                f"{len(texts)} inputs in one request; the limit is {s.max_inputs_per_request} (max_inputs_per_request)"
            )
        if truncate:
            return
        too_long = self.engine.max_text_bytes(s.max_input_tokens)
        for i, text in enumerate(texts):
            if len(text.encode()) > too_long:
                raise InputLimit(
                    f"input {i} has {len(text.encode())} bytes, certainly more than the limit of {s.max_input_tokens} "
                    "tokens (max_input_tokens). Shorten it, send \"truncate\": true, or start the server with "
                    "ANCHORSERVE_TRUNCATE=true"
                )

    @staticmethod
    def _check_method(view: TaskView, method: Method) -> None:
        """A method that counts the labelled pool needs the task to have one (checked before the
        request joins a batch it would fail)."""
        if method in POOL_METHODS and not view.has_pool:
            raise ValidationError(f"method {method} needs the task's labelled pool; task {view.name!r} has "
                                  "no `examples`")

    def encode(self, view: TaskView, texts: list[str], truncate: bool, direction: Literal["right", "left"],
               input_tokens: int | None = None) -> list[list[int]]:
        """Token ids of each text in the task's template, within max_input_tokens (or each text cut to
        `input_tokens` tokens of its own, the template's added, never longer): one call of the fast
        tokenizer for them all, or text by text when truncating (cutting the end or the start)."""
        prompt = view.prompt
        max_tokens = self.settings.max_input_tokens
        if input_tokens is not None:
            max_tokens = min(max_tokens, input_tokens + len(prompt.encode("")))
        if truncate:
            # Any text longer than this many characters is cut anyway: keep only the part that can stay.
            keep = self.engine.max_text_bytes(max_tokens)
            cut = (lambda t: t[:keep]) if direction == "right" else (lambda t: t[-keep:])
            return [prompt.encode_within(cut(text), max_tokens, direction=direction) for text in texts]
        queries = prompt.encode_batch(texts)
        for index, ids in enumerate(queries):
            if len(ids) > max_tokens:
                raise InputLimit(
                    f"input {index} has {len(ids)} tokens with the template; the limit is {max_tokens} "
                    "(max_input_tokens). Shorten it, send \"truncate\": true, or start the server with "
                    "ANCHORSERVE_TRUNCATE=true"
                )
        return queries

    async def classify(
        self, task: str | None, texts: list[str], method: Method | None, receive: Receive, *,
        model: str | None = None, truncate: bool | None = None, direction: Literal["right", "left"] = "right",
        input_tokens: int | None = None,
    ) -> Classification:
        """Predictions for `texts` on `task` (None: the default task). `truncate` None follows the
        server's setting. DeadlineExceeded past request_timeout_s (counted from arrival, tokenising
        included), ClientDisconnected when the client goes away first (its disconnect arrives on
        `receive`); either way its queued work is dropped before the forward."""
        start = time.perf_counter()
        s = self.settings
        name = self.task_name(task)
        self._check_model(model)
        if not name:
            raise ValidationError("no task given and none configured: send \"task\", or set default_task")
        truncate = s.truncate if truncate is None else truncate
        self._check_inputs(texts, truncate)
        deadline = time.monotonic() + s.request_timeout_s
        for attempt in range(2):
            view = await self.engine.view(name)
            chosen = method or view.spec.method
            self._check_method(view, chosen)
            tokenizing = time.perf_counter()
            if sum(len(t) for t in texts) <= INLINE_TOKENIZE_BYTES:
                queries = self.encode(view, texts, truncate, direction, input_tokens)
            else:
                queries = await asyncio.get_running_loop().run_in_executor(
                    self._tokenisers, self.encode, view, texts, truncate, direction, input_tokens)
            queued = time.perf_counter()
            future = self.engine.submit(view, chosen, queries, deadline)
            try:
                scores = await self._race(future, receive)
                break
            except TaskChanged:  # replaced after it was tokenised: once more against the new version
                if attempt:
                    raise
        self.metrics.tokenize_seconds.observe(queued - tokenizing)
        for q in queries:
            self.metrics.request_tokens.observe(len(q))
        predictions, raw = scores.predictions(view.spec.labels)
        done = time.perf_counter()
        prompt_tokens = sum(len(q) for q in queries) + len(queries) * view.reencoded_tokens(chosen)
        return Classification(
            model=self.model_name(), task=name, labels=view.spec.labels, predictions=predictions, raw=raw,
            logits=scores.shown_logits, prompt_tokens=prompt_tokens,
            cached_tokens=len(queries) * (view.anchor_tokens if chosen in CACHED_METHODS else 0),
            timing=Timing(total_s=done - start, tokenization_s=queued - tokenizing, queue_s=scores.queue_s,
                          inference_s=max(0.0, done - queued - scores.queue_s), compute_tokens=prompt_tokens,
                          compute_characters=sum(len(t) for t in texts),
                          compute_type=self.engine.compute_type()),
        )

    async def answer(self, body: ClassifyRequest, receive: Receive) -> Classification:
        """A vLLM-shaped request (/v1/classify, /classify), token ids decoded to text first."""
        limit = self.settings.max_input_tokens
        if body.input_tokens is not None and body.input_tokens > limit:
            raise ValidationError(f"truncate_prompt_tokens is {body.input_tokens}, more than the limit of {limit} "
                                  "tokens (max_input_tokens); send at most that, or -1 for the limit")
        texts = body.texts if body.token_ids is None else await self.decode(body.task, body.token_ids)
        return await self.classify(body.task, texts, Method(body.method) if body.method else None, receive,
                                   model=body.model, truncate=body.truncating, direction=body.direction,
                                   input_tokens=body.input_tokens)

    async def decode(self, task: str | None, token_ids: list[list[int]]) -> list[str]:
        """Token ids back to the text they spell, with the model's tokenizer (ids it lacks: 422)."""
        view = await self.engine.view(self.task_name(task))
        tokenizer = view.prompt.tokenizer
        if any(i < 0 or i >= len(tokenizer) for ids in token_ids for i in ids):
            raise ValidationError(f"token ids must lie in [0, {len(tokenizer)}): the model's vocabulary")
        return tokenizer.batch_decode(token_ids)

    async def _race(self, future: asyncio.Future[Scores], receive: Receive) -> Scores:
        """The scores, DeadlineExceeded (the engine fails the future at its deadline), or
        ClientDisconnected when the client leaves first: its queued work is cancelled then
        (`DisconnectWatch`)."""
        watch = DisconnectWatch(future, receive)
        watch()
        try:
            return await future  # cancelling this request cancels the engine's work too
        except asyncio.CancelledError:
            if not watch.left:
                raise
            self.metrics.failures.labels("client_disconnected").inc()
            raise ClientDisconnected("the client went away before its result") from None
