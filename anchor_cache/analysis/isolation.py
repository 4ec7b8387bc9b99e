"""Label-word isolation (paper §2.2): are the anchors needed in shallow or in deep layers?

In the first or last k layers the demonstrations' label-word rows may attend only to themselves
(masked before softmax, every head), which cuts the flow text → label words there. The control
isolates as many random non-label positions (drawn from 0..q−2, seeded, one draw per example).
Loyalty is agreement with the unmodified run: label loyalty on the predicted label, word loyalty
as the Jaccard similarity of the top-k full-vocabulary tokens at the target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field

from anchor_cache.analysis.common import (
    AnalysisData,
    JobControl,
    Prompted,
    SeededParams,
    chunks,
    final_hidden,
    padded_rows,
    prompt_rows,
    require_prompts,
    seeds_text,
    skipped_warning,
)
from anchor_cache.analysis.plots import loyalty_plot
from anchor_cache.attention import AttentionPlan, Isolation
from anchor_cache.errors import ValidationError
from anchor_cache.forward import label_logits, vocab_logits
from anchor_cache.models import LoadedModel
from anchor_cache.prompt import label_token_ids

WHERE = ("first", "last")
WHAT = ("label", "random")


class IsolationParams(SeededParams):
    batch_size: int = Field(16, ge=1, le=64)
    ks: list[int] = Field(default_factory=lambda: [1, 3, 5, 7], min_length=1, description="isolated layer counts")
    word_top_k: int = Field(5, ge=1, le=100, description="top-k tokens for word loyalty (paper: 5)")

    def check(self, n_layers: int) -> None:
        if max(self.ks) > n_layers or min(self.ks) < 0:
            raise ValidationError(f"ks must lie in 0..{n_layers}, the model's layer count")


def isolated_layers(where: str, k: int, n_layers: int) -> frozenset[int]:
    return frozenset(range(k)) if where == "first" else frozenset(range(n_layers - k, n_layers))


def random_positions(prompt: Prompted, rng: np.random.Generator) -> list[int]:
    """As many non-label positions as there are label words, from 0..q−2."""
    pool = sorted(set(range(prompt.target - 1)) - set(prompt.label_positions))
    return [int(i) for i in rng.choice(pool, min(len(pool), len(prompt.label_positions)), replace=False)]


def degenerate(labels: list[str], seeds: list[int], references: list[np.ndarray], short_controls: int) -> list[str]:
    """In words, what weakens the loyalty figures: seeds whose unmodified run predicted one class
    for every row, and prompts too short for a full random control."""
    out = []
    single = {seed: labels[int(ref[0])] for seed, ref in zip(seeds, references, strict=True)
              if len(np.unique(ref)) < 2}
    for name in sorted(set(single.values())):
        which = [seed for seed, c in single.items() if c == name]
        out.append(f"the unmodified model predicted {name!r} for every row ({seeds_text(which)}), so label loyalty "
                   f"there only says how often isolation leaves the prediction at {name!r}")
    if short_controls:
        out.append(f"{short_controls} prompt(s) had fewer other positions than label words, so their random control "
                   "isolated fewer positions")
    return out


def _predict(
    lm: LoadedModel, batch: list[Prompted], label_ids: tuple[int, ...], top_k: int, plan: AttentionPlan | None
) -> tuple[np.ndarray, list[set[int]]]:
    with torch.inference_mode():
        hidden = final_hidden(lm, batch, plan)
        preds = label_logits(lm, hidden, label_ids).argmax(-1).cpu().numpy()
        top = vocab_logits(lm, hidden).topk(top_k, dim=-1).indices.tolist()
    return preds, [set(t) for t in top]


def _jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b)


def run(lm: LoadedModel, data: AnalysisData, params: IsolationParams, control: JobControl) -> tuple[dict, dict]:
    n_layers = lm.model.config.num_hidden_layers
    label_ids = label_token_ids(data.task.labels, lm.tokenizer)
    settings = [(where, what, k) for where in WHERE for what in WHAT for k in params.ks]
    prepared = []
    for seed in params.seeds:
        demos = data.demonstrations(seed, params.shots_per_class)
        prompts, skipped = prompt_rows(lm, data.task, demos, data.rows(params.limit, seed), params.max_tokens)
        rng = np.random.default_rng(seed)
        prepared.append((prompts, skipped, [random_positions(p, rng) for p in prompts]))
    require_prompts([(p, s) for p, s, _ in prepared])
    control.add_work(sum(-(-len(p) // params.batch_size) for p, _, _ in prepared) * (1 + len(settings)))
    scores: dict[str, dict] = {m: {w: {x: {str(k): [] for k in params.ks} for x in WHAT} for w in WHERE}
                               for m in ("label_loyalty", "word_loyalty")}
    references = []
    for prompts, _, randoms in prepared:
        ref_preds, ref_top = [], []
        for batch in chunks(prompts, params.batch_size):
            preds, top = control.step(lambda b=list(batch): _predict(lm, b, label_ids, params.word_top_k, None))
            ref_preds.append(preds)
            ref_top += top
        ref = np.concatenate(ref_preds)
        references.append(ref)
        for where, what, k in settings:
            layers = isolated_layers(where, k, n_layers)
            preds, top = [], []
            for start in range(0, len(prompts), params.batch_size):
                batch = prompts[start : start + params.batch_size]
                chosen = randoms[start : start + params.batch_size] if what == "random" else \
                    [p.label_positions for p in batch]
                plan = AttentionPlan(isolation=Isolation(layers, padded_rows(batch, chosen, lm.device)))
                p_, t_ = control.step(lambda b=batch, pl=plan: _predict(lm, b, label_ids, params.word_top_k, pl))
                preds.append(p_)
                top += t_
            scores["label_loyalty"][where][what][str(k)].append(100 * float((np.concatenate(preds) == ref).mean()))
            scores["word_loyalty"][where][what][str(k)].append(100 * float(np.mean(list(map(_jaccard, top, ref_top)))))
    mean = {m: {w: {x: {k: float(np.mean(v)) for k, v in by_k.items()} for x, by_k in by_x.items()}
                for w, by_x in by_w.items()} for m, by_w in scores.items()}
    short = sum(len(r) < len(p.label_positions) for prompts, _, randoms in prepared
                for p, r in zip(prompts, randoms, strict=True))
    warnings = skipped_warning([(p, s) for p, s, _ in prepared], params.max_tokens) + degenerate(
        data.task.labels, params.seeds, references, short)
    results: dict[str, Any] = mean | {
        "warnings": warnings, "word_top_k": params.word_top_k, "ks": params.ks,
        "examples": [len(p) for p, _, _ in prepared], "skipped": sum(s for _, s, _ in prepared),
        "per_seed": scores,
    }
    return results, {"isolation": loyalty_plot(mean, title=f"Isolation: {data.task.name}")}
