"""Error diagnosis (paper §3.3, App. J/K): predict which classes the model confuses from its anchors.

At one layer the target's query vector (all heads concatenated) is what reads the label words,
so classes whose label-word keys look alike from the queries' point of view get confused. PCA is
fit on the test queries; the label-word keys are projected onto its components, scaled by the
singular values, and Confusion_pred(i, j) = ‖k̂_i − k̂_j‖ / max (low = confused). The real
confusion is, per class pair (a, b), the AUC of p_a / p_b on examples of gold class a or b.

Contexts follow the paper: `contexts` demonstrations per class are drawn; context i holds the
i-th of each class, in class order; test example j uses context j mod n for its query vector,
and context 0 gives the probabilities and the keys. Beyond the paper, the Spearman correlation
between the two matrices over class pairs says how well the prediction works (it needs ≥ 3 classes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from scipy.stats import spearmanr
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

from anchor_cache.analysis.common import (
    AnalysisData,
    AnalysisParams,
    JobControl,
    Prompted,
    chunks,
    final_hidden,
    prompt_rows,
)
from anchor_cache.analysis.plots import heatmaps
from anchor_cache.attention import AttentionPlan
from anchor_cache.data import sample_demonstrations
from anchor_cache.errors import ValidationError
from anchor_cache.forward import label_logits
from anchor_cache.models import LoadedModel
from anchor_cache.prompt import TaskPrompt, label_token_ids
from anchor_cache.task import Demonstration


class ErrorDiagnosisParams(AnalysisParams):
    limit: int = Field(500, ge=2, description="test rows (the paper: all 500 of TREC)")
    batch_size: int = Field(16, ge=1, le=64)
    seed: int = 42
    layer: int | None = Field(None, ge=0, description="layer to read q and k at; default 2/3 of the depth "
                              "(the paper: 32 of GPT2-XL's 48)")
    components: int = Field(10, ge=1, le=512, description="PCA components M (paper: 10)")
    contexts: int = Field(64, ge=1, le=256, description="demonstrations per class drawn for the query contexts")

    def check(self, n_layers: int) -> None:
        if self.layer is not None and self.layer >= n_layers:
            raise ValidationError(f"layer {self.layer} does not exist; the model has {n_layers} (0-based)")


def _contexts(data: AnalysisData, params: ErrorDiagnosisParams) -> list[list[Demonstration]]:
    labels = data.task.labels
    if data.train is None:
        return [data.task_demonstrations()]
    counts = np.bincount([r.label for r in data.train], minlength=len(labels))
    per_class = min(params.contexts, int(counts.min()))
    if per_class == 0:
        raise ValidationError("the train split lacks an example of some class")
    picked, _ = sample_demonstrations(data.train, len(labels), per_class, params.seed)
    by_class = [[r for r in picked if r.label == c] for c in range(len(labels))]
    return [[Demonstration(text=by_class[c][i].text, label=labels[c]) for c in range(len(labels))]
            for i in range(per_class)]


def predicted_confusion(queries: np.ndarray, keys: np.ndarray, components: int) -> np.ndarray:
    """(C, C) normalised distances of the label-word keys in the queries' principal subspace."""
    pca = PCA(n_components=min(components, *queries.shape)).fit(queries)
    projected = (keys @ pca.components_.T) * pca.singular_values_
    dist = np.linalg.norm(projected[:, None] - projected[None], axis=-1)
    dist = dist / dist.max() if dist.max() > 0 else np.full_like(dist, np.nan)  # all keys alike: undefined
    np.fill_diagonal(dist, 1.0)
    return dist


def real_confusion(probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """(C, C) AUC of p_a / p_b separating gold a from gold b (low = confused); NaN without both."""
    n = probs.shape[1]
    out = np.ones((n, n))
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            rows = (gold == a) | (gold == b)
            y = gold[rows] == a
            out[a, b] = roc_auc_score(y, probs[rows, a] / probs[rows, b]) if 0 < y.sum() < len(y) else np.nan
    return out


def pair_spearman(pred: np.ndarray, real: np.ndarray) -> float | None:
    i, j = np.triu_indices(len(pred), 1)
    x, y = pred[i, j], (real[i, j] + real[j, i]) / 2
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:  # a constant side has no ranking
        return None
    return float(spearmanr(x[ok], y[ok]).statistic)


def degenerate(labels: list[str], gold: np.ndarray, pred: np.ndarray, spearman: float | None,
               contexts: int, wanted: int, has_train: bool) -> list[str]:
    """In words, what leaves the confusions or their correlation undefined or smaller than asked."""
    out = []
    if has_train and contexts < wanted:
        out.append(f"the train split's rarest class has {contexts} rows, so {contexts} contexts were used, "
                   f"not {wanted}")
    absent = [label for c, label in enumerate(labels) if not (gold == c).any()]
    if absent:
        out.append(f"no analysed row has gold class {', '.join(map(repr, absent))}, so the real confusion of "
                   "its pairs is undefined (null)")
    if not np.isfinite(pred[~np.eye(len(labels), dtype=bool)]).any():
        out.append("every label word has the same key in the PCA subspace, so the predicted confusion is undefined "
                   "(null)")
    if spearman is None:
        reason = ("it needs at least 3 class pairs and 2 classes give one" if len(labels) < 3 else
                  "fewer than 3 class pairs have both confusions, or one of them is the same for every pair")
        out.append(f"the Spearman correlation is undefined (null): {reason}")
    return out


def _queries_and_probs(
    lm: LoadedModel, batch: list[Prompted], label_ids: tuple[int, ...], layer: int
) -> tuple[np.ndarray, np.ndarray]:
    plan = AttentionPlan(capture_qk_layers=frozenset({layer}))
    with torch.inference_mode():
        probs = torch.softmax(label_logits(lm, final_hidden(lm, batch, plan), label_ids), -1).cpu().numpy()
    return plan.capture.queries[layer].flatten(1).float().cpu().numpy(), probs


def _label_keys(lm: LoadedModel, prompt: TaskPrompt, layer: int, n_classes: int) -> np.ndarray:
    """(C, Hq·D) key of each class's label word (mean over its demonstrations) in one context."""
    ctx = prompt.context
    plan = AttentionPlan(capture_qk_layers=frozenset({layer}))
    with torch.inference_mode():
        final_hidden(lm, [Prompted(ctx.ids, ctx.label_positions, ctx.classes, 0)], plan)
    keys = plan.capture.keys[layer][0].transpose(0, 1).flatten(1).float().cpu().numpy()  # (S, Hq·D)
    return np.stack([keys[[p for p, c in zip(ctx.label_positions, ctx.classes, strict=True) if c == cls]].mean(0)
                     for cls in range(n_classes)])


def run(lm: LoadedModel, data: AnalysisData, params: ErrorDiagnosisParams, control: JobControl) -> tuple[dict, dict]:
    n_layers = lm.model.config.num_hidden_layers
    layer = params.layer if params.layer is not None else round(2 * n_layers / 3)
    labels = data.task.labels
    label_ids = label_token_ids(labels, lm.tokenizer)
    contexts = _contexts(data, params)
    rows = data.rows(params.limit, params.seed)
    # Each row twice: behind its own context (its query vector) and behind context 0 (its probabilities).
    own = [prompt_rows(lm, data.task, contexts[j % len(contexts)], [r], params.max_tokens)[0]
           for j, r in enumerate(rows)]
    first = prompt_rows(lm, data.task, contexts[0], rows, 10**9)[0]
    keep = [j for j, p in enumerate(own) if p and len(first[j].ids) <= params.max_tokens]
    own_prompts, first_prompts = [own[j][0] for j in keep], [first[j] for j in keep]
    if len(keep) < 2:
        raise ValidationError("error diagnosis needs at least 2 prompts within max_tokens")
    control.add_work(2 * -(-len(keep) // params.batch_size) + 1)
    queries = np.concatenate([control.step(lambda b=list(b): _queries_and_probs(lm, b, label_ids, layer)[0])
                              for b in chunks(own_prompts, params.batch_size)])
    probs = np.concatenate([control.step(lambda b=list(b): _queries_and_probs(lm, b, label_ids, layer)[1])
                            for b in chunks(first_prompts, params.batch_size)])
    prompt = TaskPrompt.build(data.task, contexts[0], lm.tokenizer)
    keys = control.step(lambda: _label_keys(lm, prompt, layer, len(labels)))
    gold = np.array([p.gold for p in first_prompts])
    pred = predicted_confusion(queries, keys, params.components)
    real = real_confusion(probs, gold)
    spearman = pair_spearman(pred, real)
    warnings = degenerate(labels, gold, pred, spearman, len(contexts), params.contexts, data.train is not None)
    if len(rows) > len(keep):
        warnings.insert(0, f"{len(rows) - len(keep)} of {len(rows)} rows had a prompt longer than "
                        f"max_tokens={params.max_tokens} and were left out")
    results: dict[str, Any] = {
        "warnings": warnings,
        "layer": layer, "components": min(params.components, *queries.shape), "contexts": len(contexts),
        "classes": labels, "predicted_confusion": pred.tolist(), "real_confusion": real.tolist(),
        "spearman": spearman, "examples": len(keep), "skipped": len(rows) - len(keep),
        "accuracy": 100 * float((probs.argmax(1) == gold).mean()),
    }
    title = f"{data.task.name}, layer {layer}: Spearman " + (f"{spearman:.2f}" if spearman is not None else "n/a")
    plot = heatmaps({"predicted (key distance)": pred, "real (pairwise AUC)": real}, labels, title)
    return results, {"confusion": plot}
