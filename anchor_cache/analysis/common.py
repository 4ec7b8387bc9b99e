"""What every analysis shares: its inputs and parameters, prompts with their anchors, job control.

Analyses run the full prompt (demonstrations + query, no cache): they look inside the vanilla ICL
forward the paper studies. Each model step goes through `JobControl.step`, which reports progress
and stops a cancelled job between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from anchor_cache.attention import AttentionPlan
from anchor_cache.data import Example, load_demonstrations, sample_rows, seed_demonstrations
from anchor_cache.errors import Cancelled, ValidationError
from anchor_cache.forward import Prefix, last_hidden
from anchor_cache.models import LoadedModel
from anchor_cache.prompt import TaskPrompt
from anchor_cache.task import Demonstration, TaskSpec

T = TypeVar("T")


class AnalysisParams(BaseModel):
    """Settings every analysis takes; unknown keys are refused so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(1000, ge=1, description="test rows analysed per seed")
    batch_size: int = Field(8, ge=1, le=64)
    max_tokens: int = Field(1024, ge=8, description="longer prompts are skipped, as in the reference code")

    def check(self, n_layers: int) -> None:
        """Checks that need the model's depth; run before any work starts."""


class SeededParams(AnalysisParams):
    seeds: list[int] = Field(default_factory=lambda: [42, 43, 44, 45, 46], min_length=1, max_length=20)
    shots_per_class: int = Field(1, ge=1, le=16, description="demonstrations per class when drawn from train")


@dataclass(frozen=True)
class AnalysisData:
    """A task's template and label words, the rows to analyse, and where demonstrations come from.

    With a `train` pool, demonstrations are drawn from it per seed (the paper's setting);
    without one, every seed uses the task's own demonstrations.
    """

    task: TaskSpec
    test: list[Example]
    train: list[Example] | None = None

    def task_demonstrations(self) -> list[Demonstration]:
        demos = self.task.demonstrations
        if not demos:
            raise ValidationError("the task has no demonstrations and no train split was given to draw them from")
        return demos if isinstance(demos, list) else load_demonstrations(demos, self.task.labels)

    def demonstrations(self, seed: int, shots_per_class: int) -> list[Demonstration]:
        if self.train is None:
            return self.task_demonstrations()
        return seed_demonstrations(self.train, self.task.labels, shots_per_class, seed)[0]

    def rows(self, limit: int, seed: int) -> list[Example]:
        return sample_rows(self.test, limit, seed)


@dataclass(frozen=True)
class Prompted:
    """One full prompt: token ids, where its demonstrations' label words sit, and the gold class."""

    ids: tuple[int, ...]
    label_positions: tuple[int, ...]
    classes: tuple[int, ...]
    gold: int

    @property
    def target(self) -> int:
        """q: the prompt's last position, where the prediction is read."""
        return len(self.ids) - 1


def prompt_rows(
    lm: LoadedModel, task: TaskSpec, demos: list[Demonstration], rows: Sequence[Example], max_tokens: int
) -> tuple[list[Prompted], int]:
    """Prompts for `rows` behind one demonstration set, and how many were too long to keep."""
    prompt = TaskPrompt.build(task, demos, lm.tokenizer)
    ctx = prompt.context
    kept = [
        Prompted(ctx.ids + tuple(prompt.encode(r.text)), ctx.label_positions, ctx.classes, r.label) for r in rows
    ]
    short = [p for p in kept if len(p.ids) <= max_tokens]
    return short, len(kept) - len(short)


def require_prompts(prepared: Sequence[tuple[list[Prompted], int]]) -> None:
    """Every seed needs at least one prompt within max_tokens, or its averages do not exist."""
    for prompts, skipped in prepared:
        if not prompts:
            raise ValidationError(f"no prompt to analyse: {skipped} were longer than max_tokens (or no rows given)")


def seeds_text(seeds: Sequence[int]) -> str:
    """"seed 42" or "seeds 42, 43", for warnings."""
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def skipped_warning(prepared: Sequence[tuple[Sequence[Prompted], int]], max_tokens: int) -> list[str]:
    """The warning for prompts left out for length, if any were."""
    skipped = sum(s for _, s in prepared)
    total = skipped + sum(len(p) for p, _ in prepared)
    if not skipped:
        return []
    return [f"{skipped} of {total} prompts were longer than max_tokens={max_tokens} and were left out"]


def final_hidden(lm: LoadedModel, batch: Sequence[Prompted], plan: AttentionPlan | None = None) -> torch.Tensor:
    """(B, hidden) at each prompt's last token; right-padded, so positions are those of the prompt."""
    return last_hidden(lm, Prefix(), [p.ids for p in batch], plan)


def padded_rows(batch: Sequence[Prompted], positions: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """(B, longest) boolean mask with `positions[b]` set in row b."""
    rows = torch.zeros(len(batch), max(len(p.ids) for p in batch), dtype=torch.bool, device=device)
    for b, pos in enumerate(positions):
        rows[b, list(pos)] = True
    return rows


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class JobControl:
    """How an analysis reports progress (`on_progress(done, total)` after every step) and learns it
    should stop."""

    should_stop: Callable[[], bool] = lambda: False
    on_progress: Callable[[int, int], None] | None = None
    total: int = 0
    done: int = field(default=0, init=False)

    def add_work(self, steps: int) -> None:
        self.total += steps

    def step(self, fn: Callable[[], T]) -> T:
        if self.should_stop():
            raise Cancelled("the analysis was cancelled")
        result = fn()
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(self.done, max(self.total, self.done))
        return result
