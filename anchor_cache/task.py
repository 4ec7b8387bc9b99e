"""Task specs: a template, ordered label words and labelled demonstrations.

A demonstration renders as `template(text) + " " + label`; demonstrations and the query are joined
by `separator`, and the query ends where the template ends (e.g. after "Sentiment:"), exactly the
paper's prompt format. Token-level checks (colliding label tokens) need a tokenizer and live in
`prompt.py`.

Strings from callers are checked at the edge with two annotated types, so hostile text is a
validation error (422) and never reaches the Rust tokenizer or the OS:

- `Text`: any valid Unicode. Lone surrogates (JSON "\\ud800" decodes to one) are refused, as no
  UTF-8 encoding exists for them. Use it for free text: demonstration texts and labels, queries.
- `FormatText`: `Text` without NUL characters. Use it for what the task author writes once and the
  prompt repeats (template, label words, separator), where a NUL is never meaningful.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator, model_validator

from anchor_cache.errors import ValidationError

TEXT_SLOT = "{text}"
PREVIEW_CHARS = 60  # how much of a caller's string an error message echoes


def text_problem(value: str) -> str | None:
    """Why `value` cannot be UTF-8 encoded (a lone surrogate, with its position), or None.

    The message names the character by its escape, never the character itself, so it stays
    encodable wherever it is reported.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate (\\u{ord(value[exc.start]):04x}) at position {exc.start}: send valid Unicode"
    return None


def _encodable(value: Any) -> Any:
    problem = text_problem(value) if isinstance(value, str) else None
    if problem:
        raise ValueError(problem)
    return value


def _no_nul(value: Any) -> Any:
    if isinstance(value, str) and "\x00" in value:
        raise ValueError(
            f"contains a NUL character (\\x00) at position {value.index(chr(0))}: templates, label words and "
            "separators cannot contain it"
        )
    return value


# Before validators, so these messages win over pydantic's own (its length and pattern checks
# refuse lone surrogates too, as "unable to parse raw data as a unicode string"); non-str inputs
# pass on to pydantic's str validation.
Text = Annotated[str, BeforeValidator(_encodable)]
"""Any valid Unicode string (no lone surrogates); NUL is allowed. For free text."""

FormatText = Annotated[str, BeforeValidator(_no_nul), BeforeValidator(_encodable)]
"""`Text` without NUL characters. For templates, label words and separators."""


def preview(value: str, limit: int = PREVIEW_CHARS) -> str:
    """`repr` of a caller's string, shortened: error messages should not echo whole inputs."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}… ({len(value)} characters)"


class Method(StrEnum):
    """How demonstrations reach the query (paper §3.2, Table 2)."""

    VANILLA = "vanilla"  # full prompt: demonstrations + query, every request
    HIDDEN_ANCHOR = "hidden_anchor"  # cached K/V of formatting + label-word tokens
    TEXT_ANCHOR = "text_anchor"  # the same tokens as text, re-encoded without the demo inputs
    HIDDEN_RANDOM = "hidden_random"  # cached K/V with label words swapped for random text tokens
    HIDDEN_RANDOM_TOP = "hidden_random_top"  # best of N hidden_random draws by label loyalty on dev
    ZERO_SHOT = "zero_shot"  # the query alone
    # Beyond the paper: methods that count the task's `examples` pool (heads.py, many_shot.py).
    MANY_SHOT = "many_shot"  # the pool as demonstrations: every group's anchor cache, merged
    KNN = "knn"  # Hidden_anchor features, scored by nearest pool rows
    LINEAR_HEAD = "linear_head"  # Hidden_anchor features, scored by a logistic-regression head fitted on the pool


class Prior(StrEnum):
    """The class prior a task's probabilities are served under (priors.py)."""

    POOL = "pool"  # as the method gives them
    UNIFORM = "uniform"  # the pool's class frequencies divided out
    ADAPT = "adapt"  # the traffic's class frequencies, estimated by EM from recent requests


AUTO = "auto"  # TaskSpec.method: chosen on the pool when the task is built, then served as that Method

POOL_METHODS = frozenset({Method.MANY_SHOT, Method.KNN, Method.LINEAR_HEAD})
HEAD_METHODS = frozenset({Method.KNN, Method.LINEAR_HEAD})


class Demonstration(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    text: Text
    label: Text


class DemonstrationSource(BaseModel):
    """Draw demonstrations from a JSONL file of {"text","label"} rows, as the paper does per seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path = Field(description="a JSONL file; the server resolves it under its data_root")
    shots_per_class: int = Field(1, ge=1, le=64)
    seed: int = 42

    @field_validator("path", mode="before")
    @classmethod
    def _usable_path(cls, value: Any) -> Any:
        # Before Path coercion: Path("") would silently become ".", and a NUL or a lone surrogate
        # would only fail later, inside an os call, as a 500.
        if isinstance(value, str | os.PathLike):
            raw = os.fspath(value)
            if isinstance(raw, str):
                if not raw:
                    raise ValueError("path must not be empty")
                _no_nul(raw)
                _encodable(raw)
        return value


class TaskSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    template: FormatText = Field(description="Input template with one {text} slot, e.g. 'Review: {text}\\nSentiment:'")
    labels: list[FormatText] = Field(min_length=2, description="Label words in class order, without leading space")
    separator: FormatText = Field("\n", min_length=1)
    demonstrations: list[Demonstration] | DemonstrationSource
    method: Method | Literal["auto"] = Field(Method.HIDDEN_ANCHOR, description="how the task classifies; auto (with "
                                             "a pool): the method cross-validation on the pool chooses (auto.py)")
    calibrate: StrictBool = Field(False, description="contextual calibration: divide by content-free label "
                                  "probabilities. When not given: on for a label-word method without a pool "
                                  "(`examples`), which it helps most, off otherwise")
    examples: list[Demonstration] | DemonstrationSource | None = Field(
        None, description="a labelled pool, apart from the demonstrations: re-weighting β is learned from it when "
        "the task is built and no β learned from this pool is stored yet (rows equal to a demonstration are dropped)")
    reweight: StrictBool = Field(True, description="learn β from the pool (a task with `examples`); false: serve "
                                 "the method without β")
    prior: Prior = Field(Prior.POOL, description="the class prior the task's own method is served under: pool (as "
                         "the method gives it), uniform (the pool's class frequencies divided out), adapt (the "
                         "class frequencies of the task's recent traffic, estimated by EM; it acts after 200 "
                         "requests' inputs and follows the last 2,000, and starts again when the task is replaced)")

    @model_validator(mode="before")
    @classmethod
    def _default_calibration(cls, data: Any) -> Any:
        """Without a pool a task has nothing to learn from, and calibration is what works on a first try:
        at one demonstration per class it gained 8 to 37 points on each of the four development sets."""
        if isinstance(data, dict) and data.get("calibrate") is None:
            method = data.get("method", cls.model_fields["method"].default)
            data = data | {"calibrate": data.get("examples") is None and method not in HEAD_METHODS}
        return data

    @field_validator("template")
    @classmethod
    def _one_text_slot(cls, template: str) -> str:
        if template.count(TEXT_SLOT) != 1:
            raise ValueError(f"template must contain {TEXT_SLOT} exactly once, got {preview(template)}")
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
        keys = [label_key(label) for label in cleaned]
        if len(set(keys)) != len(keys):
            shown = cleaned if sum(map(len, cleaned)) <= 4 * PREVIEW_CHARS else [preview(x) for x in cleaned]
            raise ValueError(f"label words must be distinct (case-insensitively), got {shown}")
        return cleaned

    @model_validator(mode="after")
    def _every_label_demonstrated(self) -> TaskSpec:
        if isinstance(self.demonstrations, list):
            check_demonstrations(self.demonstrations, self.labels)
        if isinstance(self.examples, list):
            for row in self.examples:
                label_index(row.label, self.labels)
        if (self.method in POOL_METHODS or self.method == AUTO) and self.examples is None:
            raise ValueError(f"method {self.method} needs the task's labelled pool: give `examples`")
        if self.method in HEAD_METHODS and self.calibrate:
            raise ValueError(f"method {self.method} scores with a head, not label words: `calibrate` does not apply")
        return self

    def label_index(self, label: str) -> int:
        return label_index(label, self.labels)

    def render(self, text: str) -> str:
        """The template with `text` in its slot (no format(), so braces in texts are harmless)."""
        prefix, _, suffix = self.template.partition(TEXT_SLOT)
        return prefix + text + suffix


def label_key(label: str) -> str:
    """What label matching compares: surrounding whitespace and case are ignored. Task validation
    keeps the keys of a task's labels distinct, so each label word matches only itself."""
    return label.strip().lower()


def label_index(label: str, labels: list[str]) -> int:
    """Datasets spell labels their own way ('positive' vs ' Positive'): match case-insensitively."""
    wanted = label_key(label)
    for i, candidate in enumerate(labels):
        if label_key(candidate) == wanted:
            return i
    raise ValidationError(f"unknown label {preview(label)}; the task's labels are {labels}")


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
