"""Public routes: liveness, readiness, metrics and the effective settings (no key needed)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.deps import State
from server.errors import error_response
from server.protocol import Readiness, error_responses

public = APIRouter(tags=["health"])


@public.get("/health", summary="Liveness: 200 as soon as the process serves HTTP")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@public.get("/ready", response_model=Readiness, responses=error_responses(503),
            summary="Readiness: 503 until the model is loaded and every task loaded or failed")
async def ready(state: State) -> JSONResponse:
    engine = state.engine
    if not engine.ready:
        return error_response("unavailable", engine.startup_error or f"not ready: {engine.progress}")
    body = Readiness(status="ready", tasks=[t.spec.name for t in engine.tasks()], failed=engine.failures(),
                     learning=state.tasks.all_learning())
    return JSONResponse(body.model_dump())


@public.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}})
async def metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@public.get("/info", summary="The loaded model, device and dtype, and the effective limits (keys redacted), "
            "with TEI's /info fields beside them")
async def info(state: State) -> dict[str, Any]:
    own = state.shown_settings | state.engine.describe() | {"ready": state.engine.ready}
    served = {t.spec.name: t for t in state.engine.tasks()} if state.engine.ready else {}
    default = served.get(state.classify.task_name(None))
    return own | tei_info(own, default.spec.labels if default is not None else [])


def tei_info(own: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """TEI's /info fields, read off this server's own, so a TEI client finds what it reads; the
    classifier's labels are the default task's."""
    try:
        installed = version("anchorserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        installed = None
    return {"model_id": own["model"], "model_dtype": own["dtype"],
            "model_type": {"classifier": {"id2label": {str(i): label for i, label in enumerate(labels)}}},
            "max_input_length": own["max_input_tokens"], "max_batch_tokens": own["max_batch_tokens"],
            "max_client_batch_size": own["max_inputs_per_request"],
            "max_concurrent_requests": own["max_queued_requests"], "auto_truncate": own["truncate"],
            "max_batch_requests": own["max_batch_size"],
            "tokenization_workers": max(1, own["api_servers"]),  # each frontend tokenises; one process does its own
            "version": installed,
            # a local model folder and a source tree: no Hub revision, build commit or image label to report
            "model_sha": None, "sha": None, "docker_label": None}
