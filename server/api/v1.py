"""Classification and task listing under /v1 (API key when one is set)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from anchor_cache.task import Method
from server.auth import require_api_key, require_json
from server.deps import Classify, Tasks
from server.protocol import (
    ClassificationData,
    ClassifyRequest,
    ClassifyResponse,
    TaskFailure,
    TaskInfo,
    TaskList,
    Usage,
    error_responses,
)

v1 = APIRouter(prefix="/v1", tags=["classify"], dependencies=[Depends(require_api_key), Depends(require_json)],
               responses=error_responses(401, 503))


@v1.get("/tasks", response_model=TaskList, summary="Served tasks, and those that failed to load")
async def list_tasks(tasks: Tasks) -> TaskList:
    served, failed = tasks.all()
    return TaskList(data=served, count=len(served),
                    failed=[TaskFailure(name=n, error=e) for n, e in sorted(failed.items())])


@v1.get("/tasks/{name}", response_model=TaskInfo, responses=error_responses(404, 422))
async def get_task(name: str, tasks: Tasks, response: Response) -> TaskInfo:
    """The ETag header is the served revision, for If-Match on PUT/DELETE /admin/tasks/{name}."""
    info = tasks.get(name)
    response.headers["ETag"] = f'"{info.revision}"'
    return info


@v1.post("/classify", response_model=ClassifyResponse,
         responses=error_responses(400, 404, 413, 415, 422, 429, 504))
async def classify(body: ClassifyRequest, request: Request, service: Classify) -> ClassifyResponse:
    async def disconnected() -> None:
        """Resolves when the client goes away (vLLM's with_cancellation listens the same way)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    request.state.task = body.task  # a metrics label only if the task is served (RequestCounter)
    result = await service.classify(body.task, body.texts, Method(body.method) if body.method else None, disconnected)
    return ClassifyResponse(
        model=result.model,
        data=[
            ClassificationData(index=i, label=p.label, probs=p.probs, logprobs=p.logprobs,
                               num_classes=len(result.labels), raw_probs=result.raw[i].probs if result.raw else None)
            for i, p in enumerate(result.predictions)
        ],
        usage=Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    )
