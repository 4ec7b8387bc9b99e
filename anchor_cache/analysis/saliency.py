"""Saliency flows (paper §2.1): how much information moves text → label words → target, per layer.

I_l = |Σ_h A_{h,l} ⊙ ∂L/∂A_{h,l}|, L the cross-entropy of the label-word logits against gold. The
attention function multiplies every layer's weights by a leaf of ones; after one backward pass
each leaf's gradient is A ⊙ ∂L/∂A. From I_l (diagonal zeroed):

    S_wp = Σ_k Σ_{j<p_k} I(p_k, j) / Σ_k p_k            text → label words
    S_pq = Σ_k I(q, p_k) / |{p_k}|                       label words → target
    S_ww = the rest of the lower triangle / its size     everything else

Per seed they are averaged over examples and normalised to sum to 1 in each layer, then averaged
over seeds. By default every example gets its own demonstrations (the paper's sampling).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from anchor_cache.analysis.common import (
    AnalysisData,
    JobControl,
    Prompted,
    SeededParams,
    chunks,
    final_hidden,
    prompt_rows,
    require_prompts,
    seeds_text,
    skipped_warning,
)
from anchor_cache.analysis.plots import line_plot
from anchor_cache.attention import AttentionPlan
from anchor_cache.data import Example
from anchor_cache.errors import ValidationError
from anchor_cache.forward import label_logits
from anchor_cache.models import LoadedModel
from anchor_cache.prompt import label_token_ids
from anchor_cache.task import Demonstration


class SaliencyParams(SeededParams):
    batch_size: int = Field(4, ge=1, le=64)
    sampling: Literal["per_example", "fixed"] | None = Field(
        None, description="per_example (paper; needs a train split) or one fixed set per seed; default: per_example "
        "when a train split is given",
    )


def flows(saliency: torch.Tensor, label_positions: tuple[int, ...]) -> tuple[float, float, float]:
    """(S_wp, S_pq, S_ww) of one (T, T) saliency matrix whose last row is the target q."""
    s = saliency.clone()
    s.fill_diagonal_(0)
    q = s.shape[0] - 1
    pos = torch.tensor(label_positions, device=s.device)
    wp, pq = s[pos].sum(), s[q, pos].sum()
    n_wp, n_pq = sum(label_positions), len(label_positions)
    n_ww = q * (q + 1) / 2 - n_wp - n_pq
    return float(wp / n_wp), float(pq / n_pq), float((s.sum() - wp - pq) / n_ww)


def saliency_matrices(lm: LoadedModel, batch: list[Prompted], label_ids: tuple[int, ...]) -> list[torch.Tensor]:
    """Per prompt, the (L, T, T) saliency |Σ_h A ⊙ ∂L/∂A| from one batched forward and backward."""
    plan = AttentionPlan(saliency=True)
    with torch.enable_grad():
        logits = label_logits(lm, final_hidden(lm, batch, plan), label_ids)
        gold = torch.tensor([p.gold for p in batch], device=logits.device)
        F.cross_entropy(logits, gold, reduction="sum").backward()  # examples do not interact: per-row gradients
    layers = sorted(plan.capture.multipliers)
    per_layer = torch.stack([plan.capture.multipliers[i].grad.sum(1).abs() for i in layers], 1)  # (B, L, T, S)
    return [per_layer[b, :, : len(p.ids), : len(p.ids)] for b, p in enumerate(batch)]


def degenerate(seeds: list[int], per_seed: list[np.ndarray]) -> list[str]:
    """In words, the layers where the flows are undefined, per seed: their saliency summed to zero
    (no gradient reached the attention) or was not finite."""
    bad = {seed: np.flatnonzero(~np.isfinite(flows_).all(0)) for seed, flows_ in zip(seeds, per_seed, strict=True)}
    out = []
    for layers in sorted({tuple(v) for v in bad.values() if v.size}):
        which = [seed for seed, v in bad.items() if tuple(v) == layers]
        out.append(f"the flows are undefined (null) in layers {', '.join(map(str, layers))} for {seeds_text(which)}: "
                   "the saliency there summed to zero or was not finite, so those layers' means are null too")
    return out


def _per_example_demos(
    train: list[Example], labels: list[str], rows: int, shots: int, seed: int
) -> list[list[Demonstration]]:
    """The paper's draw: for each example, `shots` random rows per class, in one class order per seed."""
    rng = np.random.default_rng(seed)
    by_class = [[i for i, r in enumerate(train) if r.label == c] for c in range(len(labels))]
    order = rng.permutation(len(labels) * shots)
    sets = []
    for _ in range(rows):
        picked = [i for ids in by_class for i in rng.choice(ids, shots, replace=len(ids) < shots)]
        sets.append([Demonstration(text=train[picked[j]].text, label=labels[train[picked[j]].label]) for j in order])
    return sets


def _sampling(params: SaliencyParams, data: AnalysisData) -> str:
    return params.sampling or ("per_example" if data.train is not None else "fixed")


def _prompts(lm: LoadedModel, data: AnalysisData, params: SaliencyParams, seed: int) -> tuple[list[Prompted], int]:
    rows = data.rows(params.limit, seed)
    if _sampling(params, data) == "fixed":
        return prompt_rows(lm, data.task, data.demonstrations(seed, params.shots_per_class), rows, params.max_tokens)
    if data.train is None:
        raise ValidationError("per-example sampling needs a train split; use sampling 'fixed'")
    demo_sets = _per_example_demos(data.train, data.task.labels, len(rows), params.shots_per_class, seed)
    prompts, skipped = [], 0
    for demos, row in zip(demo_sets, rows, strict=True):
        kept, dropped = prompt_rows(lm, data.task, demos, [row], params.max_tokens)
        prompts += kept
        skipped += dropped
    return prompts, skipped


def _batch_flows(lm: LoadedModel, batch: list[Prompted], label_ids: tuple[int, ...]) -> np.ndarray:
    """(B, 3, L) flows of each prompt in the batch."""
    return np.array([
        [flows(layer, p.label_positions) for layer in sal]
        for p, sal in zip(batch, saliency_matrices(lm, batch, label_ids), strict=True)
    ]).transpose(0, 2, 1)


def run(lm: LoadedModel, data: AnalysisData, params: SaliencyParams, control: JobControl) -> tuple[dict, dict]:
    label_ids = label_token_ids(data.task.labels, lm.tokenizer)
    prepared = [_prompts(lm, data, params, seed) for seed in params.seeds]
    require_prompts(prepared)
    control.add_work(sum(-(-len(p) // params.batch_size) for p, _ in prepared))
    per_seed = []
    for prompts, _ in prepared:
        found = [control.step(lambda b=list(b): _batch_flows(lm, b, label_ids))
                 for b in chunks(prompts, params.batch_size)]
        mean = np.concatenate(found).mean(0)  # (3, L) over examples
        with np.errstate(invalid="ignore", divide="ignore"):  # a layer with no saliency: reported in warnings
            per_seed.append(mean / mean.sum(0, keepdims=True))  # each layer's three flows sum to 1
    s_wp, s_pq, s_ww = np.mean(per_seed, 0).tolist()
    warnings = skipped_warning(prepared, params.max_tokens) + degenerate(params.seeds, per_seed)
    results: dict[str, Any] = {
        "s_wp": s_wp, "s_pq": s_pq, "s_ww": s_ww, "warnings": warnings,
        "sampling": _sampling(params, data),
        "examples": [len(p) for p, _ in prepared], "skipped": sum(d for _, d in prepared),
        "per_seed": {str(seed): dict(zip(("s_wp", "s_pq", "s_ww"), flows_.tolist(), strict=True))
                     for seed, flows_ in zip(params.seeds, per_seed, strict=True)},
    }
    plot = line_plot({"S_wp (text → label words)": s_wp, "S_pq (label words → target)": s_pq, "S_ww (other)": s_ww},
                     xlabel="layer", ylabel="relative saliency", title=f"Saliency flows: {data.task.name}")
    return results, {"saliency": plot}
