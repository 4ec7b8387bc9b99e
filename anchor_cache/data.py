"""JSONL datasets and the paper's seeded sampling procedures.

The reference code uses HF `datasets.shuffle(seed)`, i.e. `numpy.random.default_rng(seed)
.permutation(n)`; the same generator is used here so test subsets match the paper's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anchor_cache.errors import ValidationError
from anchor_cache.task import (
    Demonstration,
    DemonstrationSource,
    check_demonstrations,
    label_index,
    text_problem,
)


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def read_jsonl(path: Path, labels: list[str]) -> list[Example]:
    """Rows of {"text","label"}; labels are matched to the task's label words case-insensitively.

    The file must be UTF-8 (a leading BOM is allowed) with one JSON object per line; blank lines are
    skipped. `text` must be a string; `label` a string, or an integer matched as its decimal
    spelling (for label words like "1".."5"). Anything else is a `ValidationError` that names the
    file by its name only (never the server's absolute path) and the line, without echoing the row.
    """
    path = Path(path)
    where = path.name or "dataset file"
    if not path.is_file():  # False, not an error, for paths with NUL bytes too
        raise ValidationError(f"dataset file {where} does not exist")
    examples = []
    try:
        with path.open("rb") as fh:
            for line_no, raw in enumerate(fh, 1):
                example = _parse_row(raw, line_no, labels, f"{where}:{line_no}")
                if example is not None:
                    examples.append(example)
    except OSError as exc:
        raise ValidationError(f"dataset file {where} cannot be read ({exc.strerror or type(exc).__name__})") from None
    return examples


def _parse_row(raw: bytes, line_no: int, labels: list[str], at: str) -> Example | None:
    try:
        line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(
            f"{at}: not valid UTF-8 (byte {exc.start} of the line): save the dataset as UTF-8"
        ) from None
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long integers, deep nesting
        detail = str(exc) if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise ValidationError(f"{at}: not valid JSON ({detail})") from None
    if not isinstance(row, dict):
        raise ValidationError(f'{at}: expected a JSON object with "text" and "label", got a JSON {_json_kind(row)}')
    missing = [key for key in ("text", "label") if key not in row]
    if missing:
        raise ValidationError(f'{at}: expected a JSON object with "text" and "label"; missing {missing}')
    text, label = row["text"], row["label"]
    if not isinstance(text, str):
        raise ValidationError(f'{at}: "text" must be a string, got a JSON {_json_kind(text)}')
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    elif not isinstance(label, str):
        raise ValidationError(f'{at}: "label" must be a string (a label word), got a JSON {_json_kind(label)}')
    for field, value in (("text", text), ("label", label)):
        problem = text_problem(value)
        if problem:
            raise ValidationError(f'{at}: "{field}" {problem}')
    try:
        index = label_index(label, labels)
    except ValidationError as exc:
        raise ValidationError(f"{at}: {exc}") from None
    return Example(text=text, label=index)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def sample_demonstrations(
    rows: list[Example], n_classes: int, shots_per_class: int, seed: int
) -> tuple[list[Example], set[int]]:
    """First `shots_per_class` rows of each class in a seeded shuffle (the paper's per-seed demo set).

    The order is that of the shuffle, not grouped by class, as in the reference code. Returns the
    rows and their indices so training and dev sets can be drawn disjoint from them.
    """
    taken: dict[int, int] = {}
    chosen: list[int] = []
    for i in np.random.default_rng(seed).permutation(len(rows)):
        label = rows[i].label
        if taken.get(label, 0) < shots_per_class:
            taken[label] = taken.get(label, 0) + 1
            chosen.append(int(i))
        if len(chosen) == n_classes * shots_per_class:
            break
    return [rows[i] for i in chosen], set(chosen)


def sample_rows(rows: list[Example], limit: int, seed: int, exclude: set[int] = frozenset()) -> list[Example]:
    """`test.shuffle(seed).select(range(min(limit, n)))`, skipping excluded indices."""
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(rows)) if int(i) not in exclude]
    return [rows[i] for i in order[:limit]]


def load_demonstrations(source: DemonstrationSource, labels: list[str]) -> list[Demonstration]:
    demos, _ = seed_demonstrations(read_jsonl(source.path, labels), labels, source.shots_per_class, source.seed)
    check_demonstrations(demos, labels)
    return demos


def seed_demonstrations(
    train: list[Example], labels: list[str], shots_per_class: int, seed: int
) -> tuple[list[Demonstration], set[int]]:
    """This seed's demonstration set as task demonstrations, plus the train indices it used."""
    picked, used = sample_demonstrations(train, len(labels), shots_per_class, seed)
    return [Demonstration(text=r.text, label=labels[r.label]) for r in picked], used


def training_draw(train: list[Example], used: set[int], n_classes: int, per_class: int, seed: int) -> list[Example]:
    """The paper's re-weighting training set: `per_class` rows per class, disjoint from the demos."""
    rest = [r for i, r in enumerate(train) if i not in used]
    return sample_demonstrations(rest, n_classes, per_class, seed)[0]
