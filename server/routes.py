"""HTTP routes: thin adapters from requests to the task registry and the scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from anchor_cache.errors import ValidationError
from anchor_cache.registry import ServedTask
from server.auth import require_api_key, require_json
from server.errors import DeadlineExceeded, error_response
from server.protocol import ClassificationData, ClassifyRequest, ClassifyResponse, TaskInfo, TaskList, Usage
from server.state import ServerState

public = APIRouter(tags=["health"])
v1 = APIRouter(prefix="/v1", tags=["classify"], dependencies=[Depends(require_api_key), Depends(require_json)])


def state_of(request: Request) -> ServerState:
    return request.app.state.anchor


@public.get("/health", summary="Liveness: 200 as soon as the process serves HTTP")
async def health() -> dict:
    return {"status": "ok"}


@public.get("/ready", summary="Readiness: 503 until the model and every configured task are ready")
async def ready(request: Request) -> JSONResponse:
    state = state_of(request)
    if not state.ready:
        return error_response(503, state.startup_error or "loading model and tasks", "unavailable")
    return JSONResponse({"status": "ready", "tasks": [t.spec.name for t in state.registry.all()]})


@public.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(state_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@public.get("/info", summary="Model and effective limits (keys redacted)")
async def info(request: Request) -> dict:
    state = state_of(request)
    return {"model": state.model_name, "ready": state.ready} | state.settings.redacted()


def task_info(served: ServedTask) -> TaskInfo:
    spec, prompt = served.spec, served.classifier.prompt
    return TaskInfo(
        name=spec.name, labels=spec.labels, template=spec.template, separator=spec.separator, method=spec.method,
        demonstrations=len(prompt.demonstrations), anchor_tokens=served.anchor_tokens,
        context_tokens=len(prompt.context.ids), cache_bytes=served.cache_bytes,
        cache_hash=served.key if served.cached else None, build_seconds=round(served.build_seconds, 4),
        loaded_from_disk=served.loaded_from_disk, calibrate=spec.calibrate, reweighted=served.beta is not None,
        reweighting=served.reweighting,
    )


@v1.get("/tasks", response_model=TaskList)
async def list_tasks(request: Request) -> TaskList:
    tasks = [task_info(t) for t in state_of(request).require_ready().all()]
    return TaskList(data=tasks, count=len(tasks))


@v1.get("/tasks/{name}", response_model=TaskInfo)
async def get_task(name: str, request: Request) -> TaskInfo:
    return task_info(state_of(request).require_ready().get(name))


async def _disconnected(request: Request) -> None:
    """Resolves when the client goes away (vLLM's with_cancellation listens the same way)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@v1.post("/classify", response_model=ClassifyResponse, responses={
    401: {"model": None}, 404: {"model": None}, 413: {"model": None}, 422: {"model": None},
    429: {"model": None}, 503: {"model": None}, 504: {"model": None},
})
async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    state = state_of(request)
    settings = state.settings
    request.state.task = body.task
    served = state.require_ready().get(body.task)
    texts = body.texts
    if not texts:
        raise ValidationError("input is empty: give a text or a non-empty list of texts")
    if len(texts) > settings.max_inputs_per_request:
        raise ValidationError(
            f"{len(texts)} inputs in one request; the limit is {settings.max_inputs_per_request} "
            "(max_inputs_per_request)"
        )
    labels = served.spec.labels
    start = time.perf_counter()
    queries = [_tokenize(served, t, i, settings.max_input_tokens, settings.truncate) for i, t in enumerate(texts)]
    state.metrics.tokenize_seconds.observe(time.perf_counter() - start)
    for q in queries:
        state.metrics.request_tokens.observe(len(q))
    method = body.method or served.spec.method
    future = await state.scheduler.submit(served, method, queries)
    waiter = asyncio.ensure_future(asyncio.shield(future))
    gone = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({waiter, gone}, timeout=settings.request_timeout_s,
                                 return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if waiter not in done:
        future.cancel()  # skipped by the worker if it has not started
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        if gone in done:
            state.metrics.failures.labels("client_disconnected").inc()
        else:
            state.metrics.failures.labels("timeout").inc()
        raise DeadlineExceeded(f"no result within {settings.request_timeout_s}s (request_timeout_s)")
    logits = waiter.result()
    clf = served.classifier
    predictions = clf.predictions(served.scores(logits, method))
    raw = clf.predictions(logits) if served.content_free is not None and method == served.spec.method else None
    prefix_tokens = len(clf.prefix(method).ids)  # built by the worker by now: a lookup
    used = sum(len(q) + prefix_tokens for q in queries)
    return ClassifyResponse(
        model=state.model_name,
        data=[
            ClassificationData(
                index=i, label=p.label, probs=p.probs, logprobs=p.logprobs, num_classes=len(labels),
                raw_probs=raw[i].probs if raw else None,
            )
            for i, p in enumerate(predictions)
        ],
        usage=Usage(prompt_tokens=used, total_tokens=used),
    )


def _tokenize(served: ServedTask, text: str, index: int, max_tokens: int, truncate: bool) -> list[int]:
    prompt = served.classifier.prompt
    if truncate:
        return prompt.encode_within(text, max_tokens)
    ids = prompt.encode(text)
    if len(ids) > max_tokens:
        raise ValidationError(
            f"input {index} has {len(ids)} tokens with the template; the limit is {max_tokens} (max_input_tokens). "
            "Shorten it, or start the server with ANCHORSERVE_TRUNCATE=true"
        )
    return ids
