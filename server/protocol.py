"""Request and response models at the HTTP edge: vLLM's classify shape, TEI's predict shape.

Every string a client sends is `Text` (valid Unicode: a lone surrogate is a 422 here, not a
tokenizer crash later), and paths are `PathText` (no NUL); limits that need the model are the
services' to check.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

from anchor_cache.task import Demonstration, FormatText, Method, Text
from server.errors import EmptyInput

if TYPE_CHECKING:
    from server.classify import Classification, Timing

# hidden_random_top picks among random draws on a dev set: an evaluation method, not served. The last
# three count the task's labelled pool (`examples`).
ServedMethod = Literal["vanilla", "hidden_anchor", "text_anchor", "hidden_random", "zero_shot", "many_shot", "knn",
                       "linear_head"]
# TEI spells it "Left" / "Right"; either case is taken.
TruncationDirection = Annotated[Literal["right", "left"],
                                BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)]
PathText = FormatText  # paths are text without NUL characters

TRUNCATE_DESCRIPTION = ("cut an input longer than max_input_tokens (with its template) instead of answering 422; "
                        "unset: the server's `truncate` setting (TEI's --auto-truncate)")
DIRECTION_DESCRIPTION = ("which end of the text a cut removes: right (its end) or left (its start); the template "
                         "is never cut")


class ClassifyRequest(BaseModel):
    """vLLM's classify request (`model`, `input`) plus anchorserve's task selector and options."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = Field(None, description="the served model's name (GET /v1/models), as OpenAI and vLLM "
                               "clients send it; another name is a 404 model_not_found")
    task: Text | None = Field(None, description="name of a served task; unset: the server's default_task")
    input: Text | list[Text] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="one text, a list of texts, or token ids (one input's, or a list of them), which are "
        "decoded with the model's tokenizer and rendered into the task's template like text")
    method: ServedMethod | None = Field(None, description="defaults to the task's configured method "
                                       "(hidden_anchor); hidden_random_top is evaluation-only")
    truncate: StrictBool | None = Field(None, description=TRUNCATE_DESCRIPTION)
    truncation_direction: TruncationDirection = Field("right", description=DIRECTION_DESCRIPTION)
    # vLLM's request fields, so its clients' requests pass unchanged
    truncate_prompt_tokens: StrictInt | None = Field(None, ge=-1, description="vLLM's: cut each input to this many "
                                                     "tokens of its own (the task's template adds its tokens, "
                                                     "counted in usage); -1: to max_input_tokens with the "
                                                     "template; more than max_input_tokens is a 400")
    truncation_side: TruncationDirection | None = Field(None, description="vLLM's name for truncation_direction")
    use_activation: StrictBool | None = Field(None, description="vLLM's: false puts the label words' logits in "
                                              "`probs` instead of probabilities (calibrated on a calibrated "
                                              "task, so that their softmax is the probabilities)")
    add_special_tokens: StrictBool = Field(True, description="vLLM's; no effect: the task's template is the "
                                           "whole prompt, and no special tokens are added to it")
    user: Text | None = Field(None, description="vLLM's and OpenAI's end-user id; not used")
    priority: StrictInt = Field(0, description="vLLM's; not used: requests are batched in arrival order")
    cache_salt: Text | None = Field(None, description="vLLM's; not used: anchor caches belong to tasks")

    @model_validator(mode="after")
    def _not_empty(self) -> ClassifyRequest:
        if isinstance(self.input, list) and (not self.input or any(row == [] for row in self.input)):
            raise PydanticCustomError(EmptyInput.kind, "input is empty: give a text, a non-empty list of texts, or "
                                      "non-empty token ids")
        return self

    @property
    def texts(self) -> list[str] | None:
        """The inputs as text; None when they are token ids."""
        if isinstance(self.input, str):
            return [self.input]
        return None if isinstance(self.input[0], int | list) else list(self.input)

    @property
    def token_ids(self) -> list[list[int]] | None:
        if isinstance(self.input, str) or not isinstance(self.input[0], int | list):
            return None
        return [self.input] if isinstance(self.input[0], int) else self.input

    @property
    def truncating(self) -> bool | None:
        return True if self.truncate_prompt_tokens is not None else self.truncate

    @property
    def input_tokens(self) -> int | None:
        """The cut of each input's own tokens; None: only max_input_tokens bounds it (template included)."""
        return self.truncate_prompt_tokens if self.truncate_prompt_tokens not in (None, -1) else None

    @property
    def direction(self) -> Literal["right", "left"]:
        return self.truncation_side or self.truncation_direction


class ClassificationData(BaseModel):
    """One input's result: vLLM's fields (`index`, `label`, `probs`, `num_classes`), then the same
    numbers keyed by label word."""

    index: int = Field(description="the input's position in the request")
    label: str = Field(description="the predicted label word")
    probs: list[float] = Field(description="class probabilities in label order (GET /v1/tasks/{name} lists the "
                               "labels); calibrated for a calibrated task")
    num_classes: int
    label_probs: dict[str, float] = Field(description="`probs` keyed by label word")
    label_logprobs: dict[str, float] = Field(description="natural-log probabilities keyed by label word")
    raw_label_probs: dict[str, float] | None = Field(
        None, description="before contextual calibration, for a calibrated task; null otherwise")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="anchor-cache tokens the inputs attended to without running them, "
                               "summed over the inputs (not in prompt_tokens)")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens the forwards ran for this request: each input with its "
                               "template, plus any demonstration tokens re-encoded before it")
    total_tokens: int
    completion_tokens: int = Field(0, description="always 0: classification generates nothing")
    prompt_tokens_details: PromptTokensDetails


class ClassifyResponse(BaseModel):
    id: str = Field(description="vLLM's classify-<id>, the id being the request's, as in the X-Request-ID header "
                    "and the server log")
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassificationData]
    usage: Usage


class ModelCard(BaseModel):
    id: str = Field(description="the name `model` takes in POST /v1/classify")
    object: Literal["model"] = "model"
    created: int = Field(description="when this server started (Unix seconds)")
    owned_by: str = "anchorserve"


class ModelList(BaseModel):
    """OpenAI's model list: the one model this server serves."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class PredictRequest(BaseModel):
    """TEI's /predict request. `inputs` follows TEI: a string or `[string]` is one input, `[[string], ...]`
    a batch; TEI's sequence pairs (`[a, b]`) have no meaning for an ICL task and are refused."""

    model_config = ConfigDict(extra="forbid")

    inputs: Text | list[Text] | list[list[Text]] = Field(
        description="a string, [string], or a batch [[string], [string], ...]",
        examples=["a wonderful film", [["a wonderful film"], ["a dull mess"]]])
    raw_scores: StrictBool = Field(False, description="the label words' logits instead of probabilities "
                             "(calibrated on a calibrated task, so that their softmax is the probabilities)")
    truncate: StrictBool | None = Field(None, description=TRUNCATE_DESCRIPTION)
    truncation_direction: TruncationDirection = Field("right", description=DIRECTION_DESCRIPTION)
    task: Text | None = Field(None, description="a served task; unset: the server's default_task")

    @model_validator(mode="after")
    def _no_pairs(self) -> PredictRequest:
        inputs = self.inputs
        if isinstance(inputs, list):
            if not inputs:
                raise PydanticCustomError(EmptyInput.kind, "inputs is empty: give a string or a batch [[string], ...]")
            rows = [inputs] if isinstance(inputs[0], str) else inputs
            for row in rows:
                if len(row) == 2:
                    raise ValueError("TEI's sequence pairs [a, b] have no meaning for an ICL task; send a batch "
                                     "as [[a], [b]]")
                if len(row) != 1:
                    raise ValueError(f"a list of {len(row)} strings is neither one input [a] nor a batch; send a "
                                     "batch as [[a], [b], ...]")
        return self

    @property
    def batched(self) -> bool:
        return isinstance(self.inputs, list) and not isinstance(self.inputs[0], str)

    @property
    def texts(self) -> list[str]:
        if isinstance(self.inputs, str):
            return [self.inputs]
        return [row[0] for row in self.inputs] if self.batched else [self.inputs[0]]


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="probability, or logit with raw_scores")


# TEI's per-request timing headers (router/src/lib.rs, ResponseMetadata), whole milliseconds as TEI sends them.
TIMING_HEADERS: dict[str, str] = {
    "x-total-time": "milliseconds in the classify service, from the parsed request to the predictions",
    "x-tokenization-time": "milliseconds rendering the template and tokenising the inputs",
    "x-queue-time": "milliseconds waiting in the engine's queue until the request's first forward (TEI's meaning)",
    "x-inference-time": "milliseconds from the first forward until the predictions: the forward(s) and calibration",
    "x-compute-tokens": "tokens the forwards ran for this request (usage.prompt_tokens)",
    "x-compute-time": "milliseconds of the classify service's work, as x-total-time (TEI's name for it)",
    "x-compute-characters": "characters of the request's inputs",
    "x-compute-type": "the model's device type (cpu, cuda, ...)",
}


def timing_headers(timing: Timing) -> dict[str, str]:
    return {
        "x-total-time": str(int(timing.total_s * 1000)),
        "x-tokenization-time": str(int(timing.tokenization_s * 1000)),
        "x-queue-time": str(int(timing.queue_s * 1000)),
        "x-inference-time": str(int(timing.inference_s * 1000)),
        "x-compute-tokens": str(timing.compute_tokens),
        "x-compute-time": str(int(timing.total_s * 1000)),
        "x-compute-characters": str(timing.compute_characters),
        "x-compute-type": timing.compute_type,
    }


def classify_body(result: Classification, request_id: str, activation: bool = True) -> dict[str, Any]:
    """vLLM's classify response (ClassifyResponse's fields) as JSON-ready data: `probs` is a list in
    label order (the logits without `activation`), `index` the input's position."""
    labels = result.labels
    data = [
        {"index": i, "label": p.label,
         "probs": [p.probs[label] for label in labels] if activation else result.logits[i],
         "num_classes": len(labels), "label_probs": p.probs, "label_logprobs": p.logprobs,
         "raw_label_probs": result.raw[i].probs if result.raw else None}
        for i, p in enumerate(result.predictions)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens, "completion_tokens": 0,
             "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}
    return {"id": f"classify-{request_id}", "object": "list", "created": int(time.time()), "model": result.model,
            "data": data, "usage": usage}


def _ranked(labels: list[str], scores: list[float], top_k: int | None = None) -> list[dict[str, Any]]:
    """{label, score} highest first, the first `top_k` (all when None)."""
    ranked = sorted(zip(labels, scores, strict=True), key=lambda pair: pair[1], reverse=True)
    return [{"label": label, "score": score} for label, score in ranked[:top_k]]


def predict_body(result: Classification, raw_scores: bool, batched: bool) -> list:
    """TEI's /predict response as JSON-ready data: every label with its probability (its logit with
    `raw_scores`), highest first; a list of those for a batch."""
    rows = [_ranked(result.labels, logits if raw_scores else [prediction.probs[label] for label in result.labels])
            for prediction, logits in zip(result.predictions, result.logits, strict=True)]
    return rows if batched else rows[0]


class PipelineParameters(BaseModel):
    """transformers' text-classification pipeline parameters, as Hugging Face's Inference API takes them."""

    model_config = ConfigDict(extra="forbid")

    top_k: StrictInt | None = Field(None, ge=1, description="the k most likely labels; unset: every label")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="softmax (unset): probabilities over the labels, calibrated for a calibrated task; "
        "sigmoid: each label word's logit through a sigmoid; none: the logits")


class InferenceRequest(BaseModel):
    """Hugging Face's inference request (`huggingface_hub.InferenceClient.text_classification`,
    Inference Endpoints, SageMaker's /invocations): one text or a list of them."""

    model_config = ConfigDict(extra="forbid")

    inputs: Text | list[Text] = Field(description="a string, or a list of strings", examples=["a wonderful film"])
    parameters: PipelineParameters = Field(default_factory=PipelineParameters)
    task: Text | None = Field(None, description="a served task; unset: the server's default_task")

    @property
    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else self.inputs


def _invocation_kind(body: Any) -> str:
    return "vllm" if isinstance(body, dict) and "input" in body else "inference"


# /invocations as Hugging Face's clients post it ({"inputs"}) and as vLLM's do ({"input"}).
InvocationRequest = Annotated[Annotated[InferenceRequest, Tag("inference")] | Annotated[ClassifyRequest, Tag("vllm")],
                              Discriminator(_invocation_kind)]


def pipeline_body(result: Classification, parameters: PipelineParameters) -> list[list[dict[str, Any]]]:
    """The pipeline's answer, one ranked list per input, as the Inference API nests it."""
    rows = []
    for prediction, logits in zip(result.predictions, result.logits, strict=True):
        match parameters.function_to_apply:
            case "none":
                scores = logits
            case "sigmoid":
                scores = [0.5 * (1 + math.tanh(x / 2)) for x in logits]  # the sigmoid, without overflow
            case _:
                scores = [prediction.probs[label] for label in result.labels]
        rows.append(_ranked(result.labels, scores, parameters.top_k))
    return rows


def timed_response(description: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entry for a 200 that carries the timing headers."""
    headers = {name: {"description": text, "schema": {"type": "string"}} for name, text in TIMING_HEADERS.items()}
    return {200: {"description": description, "headers": headers}}


LearningStep = Literal["choose_method", "learn_pool_beta"]


class Learning(BaseModel):
    """What a job is still learning from a served task's pool, on the replica that runs it."""

    step: LearningStep = Field(
        description="choose_method: `method: auto` cross-validates on the pool (the task serves as hidden_anchor "
                    "meanwhile); learn_pool_beta: β is learned from the pool (the task serves without it meanwhile)")
    job: str = Field(description="the job doing it: GET /admin/jobs/{id}")
    progress: dict[str, float] | None = Field(description="folds_done of folds, or done of total steps")


class TrafficAccuracyInfo(BaseModel):
    """The mean of the served top probabilities of a task's latest inputs, with a 95% interval
    (anchor_cache/traffic.py)."""

    accuracy: float | None = Field(description="null until min_samples inputs were served")
    low: float | None
    high: float | None
    samples: int = Field(description="inputs in the window")
    min_samples: int
    window: int


class TaskInfo(BaseModel):
    name: str
    labels: list[str]
    template: str
    separator: str
    method: Method
    demonstrations: int
    anchor_tokens: int = Field(description="tokens kept in the anchor cache")
    context_tokens: int = Field(description="tokens of the full demonstration context")
    cache_bytes: int
    cache_hash: str | None
    build_seconds: float
    loaded_from_disk: bool
    calibrate: bool
    reweighted: bool = Field(description="learned anchor re-weighting β is applied")
    reweighting: dict[str, Any] | None = Field(None, description="how β was trained: loss curve, time, examples")
    auto: dict[str, Any] | None = Field(None, description="for a `method: auto` task ({\"status\": \"choosing\"} "
                                        "until its job is done; `method` is then what it chose): the chosen "
                                        "candidate, every candidate's cross-validated log loss, accuracy and cost "
                                        "rank, and the accuracy estimate (Wilson 95% interval, ECE, temperature)")
    prior: dict[str, Any] | None = Field(None, description="the class prior: mode, the pool's class frequencies "
                                         "(base); for adapt the rows seen, whether it corrects (active), its estimate, "
                                         "the shift's p_value and distance, and acts_when (the thresholds)")
    traffic: TrafficAccuracyInfo | None = Field(None, description="for a `method: auto` task once chosen: its "
                                                "accuracy on its latest inputs, estimated without labels")
    revision: int = Field(description="the state-store revision this replica serves (the ETag; If-Match takes it)")
    learning: Learning | None = Field(None, description="what a job is still learning from the task's pool while "
                                      "it serves (shown by the replica that runs the job); null when nothing")


class TaskFailure(BaseModel):
    name: str
    error: str = Field(description="why the task could not load; an admin may replace or delete it")


class TaskCreated(TaskInfo):
    job: str = Field(description="the build job's id")
    written_revision: int = Field(description="the revision this write stored; `revision` is the one served, "
                                  "later when a concurrent write was stored after it")


class JobAccepted(BaseModel):
    job: str
    status: str
    status_url: str = Field(description="poll it: GET /admin/jobs/{id}")


class TaskList(BaseModel):
    data: list[TaskInfo]
    count: int
    failed: list[TaskFailure] = Field(default_factory=list, description="configured or persisted tasks that "
                                      "could not load; every other task serves")


class Readiness(BaseModel):
    status: Literal["ready"]
    tasks: list[str]
    failed: dict[str, str] = Field(description="task name → why it could not load")
    learning: dict[str, Learning] = Field(description="task name → what a job here is still learning from its pool "
                                          "while it serves")


class OpenAIError(BaseModel):
    """OpenAI's error object, as vLLM answers."""

    message: str
    type: str = Field(description="BadRequestError, NotFoundError, ...")
    param: str | None
    code: int = Field(description="the HTTP status")


class ErrorResponse(BaseModel):
    error: str | OpenAIError = Field(description="the message; on vLLM's routes (/v1/classify, /classify, and "
                                     "/invocations for vLLM's body) OpenAI's error object holding it")
    type: str = Field(description="this server's kind: validation, empty_input, input_limit, not_found, ...")
    error_type: str | None = Field(None, description="TEI's error type, on TEI's routes (/predict, /, /invocations)")


class TrainingData(BaseModel):
    """Draw training rows from a dataset under the server's data_root, disjoint from the demonstrations."""

    model_config = ConfigDict(extra="forbid")

    path: PathText = Field(description="a dataset folder (its train.jsonl) or a .jsonl file, relative to data_root")
    per_class: int = Field(4, ge=1, le=256)
    seed: int = 42


class ReweightRequest(BaseModel):
    """Learn anchor re-weighting β for a task (paper defaults: Adam, lr 0.01, 10 epochs, batch 1)."""

    model_config = ConfigDict(extra="forbid")

    examples: list[Demonstration] | None = Field(None, description="inline {text, label} training examples")
    data: TrainingData | None = None
    lr: float = Field(0.01, gt=0, le=10)
    epochs: int = Field(10, ge=1, le=200)
    batch_size: int = Field(1, ge=1, le=64)
    dev_fraction: float = Field(0.0, ge=0, lt=0.9, description="held out for early stopping / best-β choice")
    patience: int | None = Field(None, ge=1, description="epochs without dev improvement before stopping")
    seed: int = 42

    @model_validator(mode="after")
    def _one_source(self) -> ReweightRequest:
        if (self.examples is None) == (self.data is None):
            raise ValueError("give exactly one of examples or data")
        return self


class AnalysisInput(BaseModel):
    """Rows to analyse: inline, or a dataset under the server's data_root."""

    model_config = ConfigDict(extra="forbid")

    examples: list[Demonstration] | None = Field(None, description="inline {text, label} rows")
    path: PathText | None = Field(None, description="a dataset folder (test.jsonl, optionally train.jsonl) or a .jsonl "
                             "file, relative to data_root")

    @model_validator(mode="after")
    def _one_source(self) -> AnalysisInput:
        if (self.examples is None) == (self.path is None):
            raise ValueError("give exactly one of examples or path")
        return self


class AnalysisRequest(BaseModel):
    """Run one of the paper's analyses on a served task (a job: 202, then poll)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["saliency", "isolation", "deep_layers", "error_diagnosis"]
    task: Text = Field(description="a served task: its template, label words and (by default) demonstrations")
    data: AnalysisInput
    demonstrations: Literal["task", "drawn"] = Field(
        "task", description="task: the served demonstrations; drawn: drawn per seed from the dataset's train.jsonl "
        "(the paper's setting)")
    params: dict[str, Any] = Field(default_factory=dict, description="the analysis's parameters (see the README)")


class AnalysisStatus(BaseModel):
    id: str
    kind: str
    task: str
    status: str
    created: float
    finished: float | None
    progress: dict[str, float] | None
    params: dict[str, Any] | None
    error: dict[str, str] | None
    results: dict[str, Any] | None
    plots: dict[str, str] = Field(description="plot name → URL of its PNG")


ERROR_DESCRIPTIONS = {
    400: "malformed JSON, or an empty input; on vLLM's routes any invalid request",
    401: "missing or wrong bearer key",
    404: "unknown task, job, model (model_not_found) or route (the whole /admin API when no admin key is set)",
    405: "method not allowed (see the Allow header)",
    409: "conflicting write: the name exists (on any replica), a training runs, or max_tasks is reached",
    412: "If-Match does not match the task's current revision (stale, weak or malformed): GET it again",
    413: "payload larger than max_payload_bytes; on TEI's routes also more inputs or tokens than the limits",
    415: "the body is not JSON",
    422: "invalid input, or a limit exceeded; the message names the limit (vLLM's routes answer 400, TEI's 413 "
         "for a limit)",
    429: "queue full or too many jobs; retry later",
    503: "still loading, shutting down, or the task failed to load",
    504: "no result within request_timeout_s",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer, all in the one envelope."""
    return {code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]} for code in codes}
