"""TEI's classification routes, so a text-embeddings-inference client switches by changing the URL
(API key when one is set, as TEI's `--api-key`): `/predict`, and `POST /` and `/invocations`, which
TEI serves for classifiers in Hugging Face's inference shape, so that
`huggingface_hub.InferenceClient(base_url=URL)` and an Inference Endpoints or SageMaker client
classify with no change but the URL."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from server.api.v1 import classify
from server.auth import require_api_key, require_json
from server.deps import Classify
from server.protocol import (
    ClassifyRequest,
    ClassifyResponse,
    InferenceRequest,
    InvocationRequest,
    LabelScore,
    PredictRequest,
    error_responses,
    pipeline_body,
    predict_body,
    timed_response,
    timing_headers,
)

tei = APIRouter(tags=["tei"], dependencies=[Depends(require_api_key), Depends(require_json)],
                responses=error_responses(401, 503))


@tei.post("/predict", response_model=list[LabelScore] | list[list[LabelScore]],
          responses=timed_response("[{label, score}] by descending score; a list of those for a batch")
          | error_responses(400, 404, 413, 415, 422, 429, 504))
async def predict(body: PredictRequest, request: Request, response: Response, service: Classify) -> list:
    """TEI's /predict on the default task (`default_task`, else the first configured one) or `task`:
    every label with its probability (the label words' logits with `raw_scores`), highest first."""
    request.state.task = service.task_name(body.task)  # a metrics label only if the task is served
    result = await service.classify(body.task, body.texts, None, request.receive, truncate=body.truncate,
                                    direction=body.truncation_direction)
    response.headers.update(timing_headers(result.timing))
    return predict_body(result, body.raw_scores, body.batched)


INFERENCE_RESPONSES = (timed_response("per input, [{label, score}] by descending score, as the Inference API nests it")
                       | error_responses(400, 404, 413, 415, 422, 429, 504))


@tei.post("/", response_model=list[list[LabelScore]], responses=INFERENCE_RESPONSES, summary="Classify (Hugging Face)")
async def inference(body: InferenceRequest, request: Request, response: Response, service: Classify) -> list:
    """The text-classification pipeline's answer on the default task (`default_task`, else the first
    configured one) or `task`: `parameters.top_k` labels (all when unset), scored by
    `parameters.function_to_apply` (softmax probabilities when unset)."""
    request.state.task = service.task_name(body.task)  # a metrics label only if the task is served
    result = await service.classify(body.task, body.texts, None, request.receive)
    response.headers.update(timing_headers(result.timing))
    return pipeline_body(result, body.parameters)


@tei.post("/invocations", response_model=list[list[LabelScore]] | ClassifyResponse,
          responses=INFERENCE_RESPONSES, summary="Classify (Inference Endpoints, SageMaker, vLLM)")
async def invocations(body: InvocationRequest, request: Request, response: Response, service: Classify
                      ) -> list | dict[str, Any]:
    """Hugging Face's request (`inputs`) gets the pipeline's answer, as on `POST /`; vLLM's (`input`)
    gets vLLM's classify answer and errors, as on `POST /classify` (vLLM serves both here)."""
    if isinstance(body, ClassifyRequest):
        request.state.dialect = "vllm"
        return await classify(body, request, response, service)
    return await inference(body, request, response, service)
