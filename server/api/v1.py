"""Classification (vLLM's shape), the model list and task listing under /v1 (API key when one is set)."""

from __future__ import annotations

from typing import Any

from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Depends, Request, Response

from server.auth import require_api_key, require_json
from server.deps import Classify, Tasks
from server.protocol import (
    ClassifyRequest,
    ClassifyResponse,
    ModelCard,
    ModelList,
    TaskFailure,
    TaskInfo,
    TaskList,
    classify_body,
    error_responses,
    timed_response,
    timing_headers,
)

v1 = APIRouter(prefix="/v1", tags=["classify"], dependencies=[Depends(require_api_key), Depends(require_json)],
               responses=error_responses(401, 503))
# vLLM serves classification at /classify, without the /v1 prefix
vllm = APIRouter(tags=["classify"], dependencies=[Depends(require_api_key), Depends(require_json)],
                 responses=error_responses(401, 503))


@v1.get("/models", response_model=ModelList, summary="The served model, in OpenAI's list shape")
async def list_models(service: Classify) -> ModelList:
    return ModelList(data=[ModelCard(id=service.model_name(), created=service.created)])


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


CLASSIFY_RESPONSES = timed_response("the predictions, in input order") | error_responses(400, 404, 413, 415, 422, 429,
                                                                                      504)


@vllm.post("/classify", response_model=ClassifyResponse, responses=CLASSIFY_RESPONSES,
           summary="Classify (vLLM's path)")
@v1.post("/classify", response_model=ClassifyResponse, responses=CLASSIFY_RESPONSES)
async def classify(body: ClassifyRequest, request: Request, response: Response, service: Classify
                   ) -> dict[str, Any]:
    """vLLM's classify: `probs` is a list in label order, `index` the input's position, vLLM's request
    fields are taken (each field's description says what it does here). The x-*-time headers are
    TEI's timing headers; `id` is classify- and the request's X-Request-ID."""
    request.state.task = service.task_name(body.task)  # a metrics label only if the task is served
    result = await service.answer(body, request.receive)
    response.headers.update(timing_headers(result.timing))
    return classify_body(result, correlation_id.get() or "", body.use_activation is not False)
