"""Task specs: a template, ordered label words and labelled demonstrations.

A demonstration renders as `template(text) + " " + label`; demonstrations and the query are joined
by `separator`, and the query ends where the template ends (e.g. after "Sentiment:"), exactly the
paper's prompt format. Token-level checks (colliding label tokens) need a tokenizer and live in
`prompt.py`.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from anchor_cache.errors import ValidationError

TEXT_SLOT = "{text}"


class Method(StrEnum):
    """How demonstrations reach the query (paper §3.2, Table 2)."""

    VANILLA = "vanilla"  # full prompt: demonstrations + query, every request
    HIDDEN_ANCHOR = "hidden_anchor"  # cached K/V of formatting + label-word tokens
    TEXT_ANCHOR = "text_anchor"  # the same tokens as text, re-encoded without the demo inputs
    HIDDEN_RANDOM = "hidden_random"  # cached K/V with label words swapped for random text tokens
    HIDDEN_RANDOM_TOP = "hidden_random_top"  # best of N hidden_random draws by label loyalty on dev
    ZERO_SHOT = "zero_shot"  # the query alone


class Demonstration(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str
    label: str


class DemonstrationSource(BaseModel):
    """Draw demonstrations from a JSONL file of {"text","label"} rows, as the paper does per seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    shots_per_class: int = Field(1, ge=1, le=64)
    seed: int = 42


class TaskSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    template: str = Field(description="Input template with one {text} slot, e.g. 'Review: {text}\\nSentiment:'")
    labels: list[str] = Field(min_length=2, description="Label words in class order, without leading space")
    separator: str = Field("\n", min_length=1)
    demonstrations: list[Demonstration] | DemonstrationSource
    method: Method = Method.HIDDEN_ANCHOR
    calibrate: bool = Field(False, description="contextual calibration: divide by content-free label probabilities")

    @field_validator("template")
    @classmethod
    def _one_text_slot(cls, template: str) -> str:
        if template.count(TEXT_SLOT) != 1:
            raise ValueError(f"template must contain {TEXT_SLOT} exactly once, got {template!r}")
        if template != template.rstrip():
            raise ValueError(
                "template must not end with whitespace: the label word follows with its own leading space "
                "(e.g. end with 'Sentiment:')"
            )
        return template

    @field_validator("labels")
    @classmethod
    def _clean_labels(cls, labels: list[str]) -> list[str]:
        cleaned = [label.strip() for label in labels]
        if any(not label for label in cleaned):
            raise ValueError("label words must be non-empty")
        lowered = [label.lower() for label in cleaned]
        if len(set(lowered)) != len(lowered):
            raise ValueError(f"label words must be distinct (case-insensitively), got {cleaned}")
        return cleaned

    @model_validator(mode="after")
    def _every_label_demonstrated(self) -> TaskSpec:
        if isinstance(self.demonstrations, list):
            check_demonstrations(self.demonstrations, self.labels)
        return self

    def label_index(self, label: str) -> int:
        return label_index(label, self.labels)

    def render(self, text: str) -> str:
        """The template with `text` in its slot (str.replace, so braces in texts are harmless)."""
        return self.template.replace(TEXT_SLOT, text)


def label_index(label: str, labels: list[str]) -> int:
    """Datasets spell labels their own way ('positive' vs ' Positive'): match case-insensitively."""
    wanted = label.strip().lower()
    for i, candidate in enumerate(labels):
        if candidate.lower() == wanted:
            return i
    raise ValidationError(f"unknown label {label!r}; the task's labels are {labels}")


def check_demonstrations(demonstrations: list[Demonstration], labels: list[str]) -> None:
    if not demonstrations:
        raise ValidationError("a task needs at least one demonstration per label, got none")
    seen = {label_index(d.label, labels) for d in demonstrations}
    missing = [labels[i] for i in range(len(labels)) if i not in seen]
    if missing:
        raise ValidationError(f"every label needs at least one demonstration; missing: {missing}")


# The paper's Table 4 (templates and label words; the query ends after the colon).
PRESETS: dict[str, tuple[str, list[str]]] = {
    "sst2": ("Review: {text}\nSentiment:", ["Negative", "Positive"]),
    "agnews": ("Article: {text}\nAnswer:", ["World", "Sports", "Business", "Technology"]),
    "trec": (
        "Question: {text}\nAnswer Type:",
        ["Abbreviation", "Entity", "Description", "Person", "Location", "Number"],
    ),
    "emoc": ("Dialogue: {text}\nEmotion:", ["Others", "Happy", "Sad", "Angry"]),
}
