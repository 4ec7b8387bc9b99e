"""The server's responses as the client reads them: pydantic models of the fields it uses, tolerant
of fields it does not know (a newer server may add some). Kept free of the engine and server
packages, so `pip install ./clients` needs no torch; tests/test_api_compat.py parses real server
responses with them, so they cannot drift from `server/protocol.py`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class ClassificationData(_Response):
    index: int  # the input's position in the request
    label: str
    probs: list[float]  # in label order
    num_classes: int
    label_probs: dict[str, float]
    label_logprobs: dict[str, float]
    raw_label_probs: dict[str, float] | None = None  # before calibration, for a calibrated task


class Usage(_Response):
    prompt_tokens: int
    total_tokens: int


class ClassifyResponse(_Response):
    id: str
    model: str
    data: list[ClassificationData]
    usage: Usage


class LabelScore(_Response):
    label: str
    score: float


class ModelCard(_Response):
    id: str
    owned_by: str


class ModelList(_Response):
    data: list[ModelCard]


class TaskInfo(_Response):
    name: str
    labels: list[str]
    template: str
    method: str
    anchor_tokens: int
    cache_bytes: int
    calibrate: bool
    reweighted: bool
    reweighting: dict[str, Any] | None = None
    revision: int


class TaskFailure(_Response):
    name: str
    error: str


class TaskList(_Response):
    data: list[TaskInfo]
    failed: list[TaskFailure] = []
