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
from anchor_cache.task import Demonstration, DemonstrationSource, check_demonstrations, label_index


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def read_jsonl(path: Path, labels: list[str]) -> list[Example]:
    """Rows of {"text","label"}; labels are matched to the task's label words case-insensitively."""
    if not path.is_file():
        raise ValidationError(f"dataset file {path} does not exist")
    examples = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                examples.append(Example(text=str(row["text"]), label=label_index(str(row["label"]), labels)))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValidationError(f"{path}:{line_no}: expected a JSON object with text and label ({exc})") from exc
    return examples


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
