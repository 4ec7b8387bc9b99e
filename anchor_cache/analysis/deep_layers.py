"""Deep-layer analysis (paper §2.3, App. E): does the target read its answer off the label words?

A_l(q, p_c) is layer l's attention from the target to class c's label word(s), summed over heads
(and over that class's demonstrations). AUCROC_l scores it against the model's own prediction
(not gold): binary tasks use class 1's attention; more classes use the attention normalised over
the predicted classes, one-vs-one. Classes never predicted are left out. R_l = Σ_{i≤l}(AUC_i − 0.5)
/ Σ_i (AUC_i − 0.5) is how much of the final separation has built up by layer l.

A seed whose predictions are all one class has no AUC, and when every seed is like that there is
nothing to plot: `warnings` in the results says so in words, as it does for the other partial cases.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from sklearn.metrics import roc_auc_score

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
from anchor_cache.analysis.plots import auc_plot
from anchor_cache.attention import AttentionPlan
from anchor_cache.errors import ValidationError
from anchor_cache.forward import label_logits
from anchor_cache.models import LoadedModel
from anchor_cache.prompt import label_token_ids


class DeepLayersParams(SeededParams):
    batch_size: int = Field(16, ge=1, le=64)
    attention_maps: int = Field(0, ge=0, le=16, description="first-seed examples whose full head-summed attention "
                                "maps (every layer, T×T) are returned; off by default")
    max_map_values: int = Field(2_000_000, ge=1, description="cap on the numbers those maps may hold")


def auc_roc(predicted: np.ndarray, scores: np.ndarray) -> float:
    """AUCROC of (N, C) label-word attention against the predicted classes; NaN if only one class."""
    present = np.unique(predicted)
    if len(present) < 2:
        return float("nan")
    if scores.shape[1] == 2:
        return float(roc_auc_score(predicted, scores[:, 1]))
    kept = scores[:, present]
    kept = kept / np.clip(kept.sum(1, keepdims=True), 1e-12, None)
    y = np.searchsorted(present, predicted)
    if len(present) == 2:
        return float(roc_auc_score(y, kept[:, 1]))
    return float(roc_auc_score(y, kept, multi_class="ovo", labels=list(range(len(present)))))


def _mean_over_seeds(per_seed: np.ndarray) -> np.ndarray:
    """Mean over the seeds where the AUC exists (a seed that predicted one class has none)."""
    counts = np.isfinite(per_seed).sum(0)
    return np.where(counts > 0, np.nansum(per_seed, 0) / np.maximum(counts, 1), np.nan)


NO_SEPARATION = 1e-9  # |Σ_l (AUC_l − 0.5)| below this: R_l would divide by (about) zero


def r_curve(auc: np.ndarray) -> np.ndarray:
    """R_l; NaN in every layer when the total Σ(AUC − 0.5) is (about) 0 or undefined."""
    gain = np.cumsum(auc - 0.5)
    if not np.isfinite(gain[-1]) or abs(gain[-1]) < NO_SEPARATION:
        return np.full_like(gain, np.nan, dtype=float)
    return gain / gain[-1]


def degenerate(labels: list[str], seeds: list[int], predictions: list[np.ndarray], auc: np.ndarray) -> list[str]:
    """In words, what leaves AUCROC_l or R_l undefined or partial (an empty list when nothing does).

    `predictions` holds each seed's predicted classes, `auc` the mean AUCROC_l over seeds."""
    single = {seed: labels[int(p[0])] for seed, p in zip(seeds, predictions, strict=True) if len(np.unique(p)) < 2}
    if len(single) == len(seeds):
        names = sorted(set(single.values()))
        which = f"class {names[0]!r}" if len(names) == 1 else \
            "one class per seed (" + ", ".join(f"{seed}: {name!r}" for seed, name in single.items()) + ")"
        return [f"every prediction was {which}, so AUCROC_l is undefined in all layers and R_l with it (both null); "
                "the plot is empty"]
    out = []
    if single:
        classes = ", ".join(sorted({repr(c) for c in single.values()}))
        out.append(f"{seeds_text(list(single))} predicted only {classes}, so AUCROC_l there is undefined; the means "
                   f"cover the other {len(seeds) - len(single)} of {len(seeds)} seeds")
    varied = [p for seed, p in zip(seeds, predictions, strict=True) if seed not in single]
    never = {label: sum(c not in p for p in varied) for c, label in enumerate(labels)}
    if any(never.values()):
        missing = ", ".join(f"{label!r} ({n} of {len(varied)})" for label, n in never.items() if n)
        out.append(f"classes never predicted in some seeds: {missing}; AUCROC_l there compares the predicted "
                   "classes only")
    undefined = np.flatnonzero(~np.isfinite(auc))
    total = float(np.cumsum(auc - 0.5)[-1])
    if undefined.size:
        out.append(f"AUCROC_l is undefined (null) in layers {', '.join(map(str, undefined))}, and R_l with it")
    elif abs(total) < NO_SEPARATION:
        out.append("Σ_l (AUCROC_l − 0.5) is 0, so R_l is undefined (null)")
    elif total < 0:
        out.append(f"AUCROC_l is below 0.5 on balance (Σ_l (AUCROC_l − 0.5) = {total:.3f}), so R_l does not "
                   "measure a separation that builds up")
    return out


def _label_attention(
    lm: LoadedModel, batch: list[Prompted], label_ids: tuple[int, ...], n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes (B,) and attention to each class's label words per layer (B, L, C)."""
    plan = AttentionPlan(capture_target_weights=True)
    with torch.inference_mode():
        preds = label_logits(lm, final_hidden(lm, batch, plan), label_ids).argmax(-1).cpu().numpy()
    weights = plan.capture.target_weights
    heads_summed = torch.stack([weights[i].sum(1) for i in sorted(weights)], 1).float().cpu()  # (B, L, S)
    out = np.zeros((len(batch), heads_summed.shape[1], n_classes))
    for b, p in enumerate(batch):
        for pos, cls in zip(p.label_positions, p.classes, strict=True):
            out[b, :, cls] += heads_summed[b, :, pos].numpy()
    return preds, out


def _attention_maps(lm: LoadedModel, prompts: list[Prompted], params: DeepLayersParams) -> list[dict[str, Any]]:
    n_layers = lm.model.config.num_hidden_layers
    maps = []
    budget = params.max_map_values
    for p in prompts[: params.attention_maps]:
        size = n_layers * len(p.ids) ** 2
        if size > budget:
            raise ValidationError(f"attention maps would hold more than max_map_values={params.max_map_values} numbers")
        budget -= size
        plan = AttentionPlan(capture_maps=True)
        with torch.inference_mode():
            final_hidden(lm, [p], plan)
        layers = [plan.capture.maps[i][0].float().cpu().tolist() for i in sorted(plan.capture.maps)]
        maps.append({"tokens": lm.tokenizer.convert_ids_to_tokens(list(p.ids)), "layers": layers})
    return maps


def run(lm: LoadedModel, data: AnalysisData, params: DeepLayersParams, control: JobControl) -> tuple[dict, dict]:
    label_ids = label_token_ids(data.task.labels, lm.tokenizer)
    n_classes = len(label_ids)
    prepared = [
        prompt_rows(lm, data.task, data.demonstrations(seed, params.shots_per_class),
                    data.rows(params.limit, seed), params.max_tokens)
        for seed in params.seeds
    ]
    require_prompts(prepared)
    control.add_work(sum(-(-len(p) // params.batch_size) for p, _ in prepared) + (params.attention_maps > 0))
    per_seed, predictions = [], []
    for prompts, _ in prepared:
        found = [control.step(lambda b=list(b): _label_attention(lm, b, label_ids, n_classes))
                 for b in chunks(prompts, params.batch_size)]
        preds = np.concatenate([f[0] for f in found])
        scores = np.concatenate([f[1] for f in found])  # (N, L, C)
        per_seed.append([auc_roc(preds, scores[:, layer]) for layer in range(scores.shape[1])])
        predictions.append(preds)
    auc = _mean_over_seeds(np.array(per_seed))
    r = r_curve(auc)
    warnings = skipped_warning(prepared, params.max_tokens) + degenerate(data.task.labels, params.seeds,
                                                                          predictions, auc)
    results: dict[str, Any] = {
        "auc_roc": auc.tolist(), "r": r.tolist(), "warnings": warnings,
        "examples": [len(p) for p, _ in prepared], "skipped": sum(s for _, s in prepared),
        "per_seed": {str(seed): {"auc_roc": a} for seed, a in zip(params.seeds, per_seed, strict=True)},
    }
    if params.attention_maps:
        results["attention_maps"] = control.step(lambda: _attention_maps(lm, prepared[0][0], params))
    note = None if np.isfinite(auc).any() else warnings[-1].removesuffix("; the plot is empty")
    return results, {"deep_layers": auc_plot(auc, r, title=f"Deep layers: {data.task.name}", note=note)}
