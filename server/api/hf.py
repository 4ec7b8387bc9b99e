"""Hugging Face's inference routes, so `huggingface_hub.InferenceClient(base_url=URL)` and an
Inference Endpoints or SageMaker client classify with no change but the URL: `POST /` (what
`text_classification` posts to a base URL, as TEI serves it for classifiers) and `POST /invocations`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from server.auth import require_api_key, require_json
from server.deps import Classify
from server.protocol import (
    InferenceRequest,
    LabelScore,
    error_responses,
    pipeline_body,
    timed_response,
    timing_headers,
)

hf = APIRouter(tags=["huggingface"], dependencies=[Depends(require_api_key), Depends(require_json)],
               responses=error_responses(401, 503))

RESPONSES = (timed_response("per input, [{label, score}] by descending score, as the Inference API nests it")
             | error_responses(400, 404, 413, 415, 422, 429, 504))


@hf.post("/", response_model=list[list[LabelScore]], responses=RESPONSES, summary="Classify (Hugging Face)")
@hf.post("/invocations", response_model=list[list[LabelScore]], responses=RESPONSES,
         summary="Classify (Inference Endpoints, SageMaker)")
async def invocations(body: InferenceRequest, request: Request, response: Response, service: Classify) -> list:
    """The text-classification pipeline's answer on the default task (`default_task`, else the first
    configured one) or `task`: `parameters.top_k` labels (all when unset), scored by
    `parameters.function_to_apply` (softmax probabilities when unset)."""
    request.state.task = service.task_name(body.task)  # a metrics label only if the task is served
    result = await service.classify(body.task, body.texts, None, request.receive)
    response.headers.update(timing_headers(result.timing))
    return pipeline_body(result, body.parameters)
