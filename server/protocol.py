"""Request and response models at the HTTP edge (vLLM's classify shape)."""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel, ConfigDict, Field

from anchor_cache.task import Method


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="name of a served task")
    input: str | list[str] = Field(description="one text or a list of texts")
    method: Method | None = Field(None, description="defaults to the task's configured method (hidden_anchor)")

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ClassificationData(BaseModel):
    index: int
    label: str
    probs: dict[str, float]
    logprobs: dict[str, float]
    num_classes: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ClassifyResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cls-{uuid.uuid4().hex}")
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassificationData]
    usage: Usage


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


class TaskList(BaseModel):
    data: list[TaskInfo]
    count: int


class ErrorResponse(BaseModel):
    error: str
    type: str
