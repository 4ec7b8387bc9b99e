"""Anchor re-weighting (paper §3.1): learn β[l, h, c] on a few labelled examples.

The model stays frozen; β is the only parameter. Training runs in the served configuration
(Hidden_anchor cache) by default, so the β that is learned is the β that is served. Loss and
optimiser follow the paper: cross-entropy over the label-word logits against the gold label, Adam
with lr 0.01, 10 epochs, batch 1.

β only rescales the target (last) row, so no other position's states depend on it: each training
example's tokens before its last one are cached once, and every step runs a single token forward
and backward. That is exact and makes training seconds instead of minutes on a CPU.

A step of several examples runs their last tokens as one batch, each behind its own cached query
(right-padded), with the same mean loss: while reading the weights dominates, 16 examples cost
about twice one. β learned from a task's pool takes 16 a step (`pool_config`); the paper's batch 1
stays the default of `TrainConfig`, the admin job's and the CLI's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import DynamicCache, PretrainedConfig

from anchor_cache.attention import AttentionPlan
from anchor_cache.cache import AnchorCache, dynamic_cache, extend_cache
from anchor_cache.classifier import Classifier
from anchor_cache.errors import Cancelled, ValidationError
from anchor_cache.forward import Prefix, label_logits, to_device
from anchor_cache.task import Method


@dataclass
class TrainConfig:
    method: Method = Method.HIDDEN_ANCHOR
    lr: float = 0.01
    epochs: int = 10
    batch_size: int = 1
    seed: int = 42
    patience: int | None = None  # epochs without dev-loss improvement before stopping; needs dev data


# β from a task's pool (and for `method: auto`): 16 examples a step, the same loss, 5-8× faster than
# the paper's batch 1 on this CPU at 16 rows per class with about its accuracy (docs/RESULTS.md).
POOL_BATCH_SIZE = 16
POOL_LR = 0.08


def pool_config(method: Method) -> TrainConfig:
    return TrainConfig(method=method, batch_size=POOL_BATCH_SIZE, lr=POOL_LR)


@dataclass
class TrainResult:
    beta: torch.Tensor
    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    dev_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Example:
    """A training query split where β starts to matter: all but its last token, cached once."""

    before_last: Prefix
    last: int
    gold: int


def _stop_if(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("re-weighting was cancelled")


def _examples(clf: Classifier, prefix: Prefix, texts: Sequence[str], labels: Sequence[int],
              should_stop: Callable[[], bool] | None = None) -> list[_Example]:
    """Each example's cache extended by its query but the last token: a forward per row, so a
    large pool takes long enough that a cancel must be heard between rows."""
    out = []
    for query, gold in zip(clf.encode(texts), labels, strict=True):
        _stop_if(should_stop)
        cache = extend_cache(clf.lm, prefix.cache, list(prefix.ids) + query[:-1])
        out.append(_Example(Prefix(cache=cache), query[-1], int(gold)))
    return out


def _padded_cache(caches: Sequence[AnchorCache | None], config: PretrainedConfig
                  ) -> tuple[DynamicCache | None, torch.Tensor, torch.Tensor | None]:
    """The examples' caches side by side in one batch, right-padded to the longest: the cache, the
    (B, S + 1) attention mask of a one-token step behind it, and its key bias (None: none)."""
    sizes = [c.num_tokens if c is not None else 0 for c in caches]
    longest, batch = max(sizes), len(caches)
    some = next((c for c in caches if c is not None), None)
    device = some.keys[0].device if some is not None else None
    mask = torch.ones((batch, longest + 1), dtype=torch.long, device=device)
    for row, size in enumerate(sizes):
        mask[row, size:longest] = 0
    if some is None:
        return None, mask, None

    def stacked(tensors: Sequence[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
        empty = like[:, :, :0]
        return torch.cat([F.pad(t if t is not None else empty, (0, 0, 0, longest - size))
                          for t, size in zip(tensors, sizes, strict=True)])

    layers = range(len(some.keys))
    keys = [stacked([c.keys[i] if c is not None else None for c in caches], some.keys[i]) for i in layers]
    values = [stacked([c.values[i] if c is not None else None for c in caches], some.values[i]) for i in layers]
    bias = None
    if any(c is not None and c.key_bias is not None for c in caches):
        bias = torch.stack([F.pad(c.key_bias if c is not None and c.key_bias is not None
                                  else torch.zeros(size, device=device), (0, longest - size + 1))
                            for c, size in zip(caches, sizes, strict=True)])
    return dynamic_cache(keys, values, config), mask, bias


def _loss(clf: Classifier, plan: AttentionPlan, batch: Sequence[_Example]) -> torch.Tensor:
    """Mean cross-entropy over the label-word logits: one forward of every example's last token,
    each behind its own cached query (right-padded to the longest), so a batch of B costs about what
    one example costs while the weights' reads dominate."""
    lm = clf.lm
    caches = [ex.before_last.cache for ex in batch]
    cache, mask, bias = _padded_cache(caches, lm.model.config)
    positions = [ex.before_last.first_position for ex in batch]
    step = dataclasses.replace(plan, targets=torch.zeros(len(batch), dtype=torch.long, device=lm.device),
                               key_bias=bias)
    out = lm.model.base_model(
        input_ids=to_device([[ex.last] for ex in batch], lm.device),
        attention_mask=mask.to(lm.device),
        position_ids=to_device([[p] for p in positions], lm.device),
        cache=cache,
        use_cache=cache is not None,
        anchor_plan=step,
    )
    logits = label_logits(lm, out.last_hidden_state[:, 0], clf.prompt.label_ids)
    return F.cross_entropy(logits, to_device([ex.gold for ex in batch], logits.device))


def train_reweighting(
    clf: Classifier,
    texts: Sequence[str],
    labels: Sequence[int],
    cfg: TrainConfig | None = None,
    dev: tuple[Sequence[str], Sequence[int]] | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Fit β on (texts, class indices); returns the best β (by dev loss when dev data is given).

    `should_stop` is polled before every step and every example's precompute; when it answers True the run raises
    Cancelled, so a cancelled run never yields a half-trained β. `on_step(done, total)` is
    called after every step (job progress); `progress` shows a tqdm bar.
    """
    cfg = cfg or TrainConfig()
    if not texts:
        raise ValidationError("re-weighting needs at least one training example")
    start = time.perf_counter()
    prefix = clf.prefix(cfg.method)
    beta = clf.zero_beta().requires_grad_(True)
    plan = clf.reweighting_plan(cfg.method, beta)
    examples = _examples(clf, prefix, texts, labels, should_stop)
    dev_examples = _examples(clf, prefix, *dev, should_stop) if dev else None
    optimizer = torch.optim.Adam([beta], lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    result = TrainResult(beta=beta.detach().clone())
    best, stale = float("inf"), 0
    steps, done = cfg.epochs * -(-len(examples) // cfg.batch_size), 0
    with tqdm(total=steps, desc="re-weighting", unit="step", disable=not progress) as bar:
        for _ in range(cfg.epochs):
            order = rng.permutation(len(examples))
            epoch = []
            for i in range(0, len(order), cfg.batch_size):
                _stop_if(should_stop)
                idx = order[i : i + cfg.batch_size]
                loss = _loss(clf, plan, [examples[j] for j in idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                epoch.append(loss.item())
                bar.update(1)
                done += 1
                if on_step is not None:
                    on_step(done, steps)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            result.step_losses += epoch
            result.epoch_losses.append(float(np.mean(epoch)))
            if dev_examples is None:
                result.beta = beta.detach().clone()
                continue
            with torch.no_grad():
                dev_loss = _loss(clf, plan, dev_examples).item()
            result.dev_losses.append(dev_loss)
            if dev_loss < best:
                best, stale, result.beta = dev_loss, 0, beta.detach().clone()
            else:
                stale += 1
                if cfg.patience is not None and stale >= cfg.patience:
                    break
    result.seconds = time.perf_counter() - start
    return result


# --- β from a task's labelled pool, and β files ----------------------------------------------------


def pool_rows(clf: Classifier) -> tuple[list[str], list[int]]:
    """The task's `examples` as (texts, classes), without rows equal to a demonstration."""
    pool = clf.pool()
    return [r.text for r in pool], [clf.task.label_index(r.label) for r in pool]


def pool_hash(clf: Classifier) -> str | None:
    """A hash of the rows β is learned from (None without a pool): a stored β records it, so a
    changed pool is learned again."""
    texts, labels = pool_rows(clf)
    if not texts:
        return None
    return hashlib.sha256(json.dumps([texts, labels], ensure_ascii=False).encode()).hexdigest()[:16]


def learn_pool_beta(
    clf: Classifier, should_stop: Callable[[], bool] | None = None, on_step: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """β for the task's own method learned from its pool (the paper's recipe), and its training record."""
    texts, labels = pool_rows(clf)
    if not texts:
        raise ValidationError("the task's examples pool is empty (rows equal to a demonstration are dropped)")
    cfg = pool_config(clf.task.method)
    result = train_reweighting(clf, texts, labels, cfg, progress=False, should_stop=should_stop, on_step=on_step)
    info = {"source": "examples", "pool": pool_hash(clf), "train_examples": len(texts),
            "seconds": round(result.seconds, 3), "epoch_losses": [round(x, 5) for x in result.epoch_losses],
            "lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "trained_at": time.time()}
    return result.beta, info


def load_beta(path: str | Path) -> torch.Tensor:
    """β saved by `reweight --out` (`path` = that folder or its beta.safetensors)."""
    path = Path(path)
    file = path / "beta.safetensors" if path.is_dir() else path
    try:
        tensors = load_file(str(file))
    except (OSError, SafetensorError) as exc:
        raise ValidationError(f"cannot read β from {file.name} ({type(exc).__name__}: {exc})") from exc
    if "beta" not in tensors:
        raise ValidationError(f"{file.name} holds no 'beta' tensor")
    return tensors["beta"]
