"""Classifier: a task bound to a loaded model, serving any method from one call.

Prediction is a softmax over the C label-word logits at the query's last position (paper §7).
Each method's prefix (cache and/or re-encoded tokens) is built on first use and then shared by
every request. Serving runs packed forwards (packed.py): `label_logits_ids` packs one task's
queries, and `packed_row` hands the server a row it can pack with other tasks' rows.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anchor_cache.attention import AttentionPlan, Reweighting
from anchor_cache.cache import AnchorCache, build_anchor_cache
from anchor_cache.data import load_demonstrations
from anchor_cache.errors import ValidationError
from anchor_cache.forward import Prefix, last_hidden
from anchor_cache.heads import FeatureLayers, Features, KnnHead, LinearHead, fit_head, head_layers
from anchor_cache.keep import anchor_keep, random_keep
from anchor_cache.many_shot import many_shot_cache
from anchor_cache.models import LoadedModel
from anchor_cache.packed import PackedRow, packed_features, packed_hidden, packed_label_logits
from anchor_cache.prompt import TaskPrompt
from anchor_cache.task import HEAD_METHODS, POOL_METHODS, Demonstration, Method, TaskSpec

log = logging.getLogger(__name__)

# Zhao et al. (2021)'s content-free inputs for contextual calibration.
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")

CACHED_METHODS = frozenset({Method.HIDDEN_ANCHOR, Method.HIDDEN_RANDOM, Method.HIDDEN_RANDOM_TOP, *POOL_METHODS})


def calibrate(logits: torch.Tensor, content_free: torch.Tensor) -> torch.Tensor:
    """Contextual calibration: log p − log p_cf, i.e. probabilities divided by the content-free
    ones; a softmax of the result renormalises them."""
    return torch.log_softmax(logits, -1) - content_free


@dataclass(frozen=True)
class Prediction:
    """`index` is the predicted class; with calibration, `probs`/`logprobs` are calibrated and
    `raw_probs` holds the model's own probabilities."""

    index: int
    label: str
    probs: dict[str, float]
    logprobs: dict[str, float]
    raw_probs: dict[str, float] | None = None


def _packable(plan: AttentionPlan | None) -> bool:
    """Whether a plan asks for nothing but one β shared by every row (what a packed forward runs)."""
    if plan is None:
        return True
    return (
        not (plan.needs_explicit or plan.capture_target_weights or plan.capture_qk_layers)
        and plan.isolation is None
        and plan.reweighting is not None
        and plan.reweighting.label_targets is None
    )


class Classifier:
    """`seed` drives Hidden_random draws; `dev_texts` are the sample Hidden_random-top is picked on.
    `beta`: learned re-weighting for the task's own method (`reweighting.load_beta` reads what
    `reweight --out` saved); `classify` applies it and, when the task says `calibrate`, contextual
    calibration under it, exactly as the server does."""

    def __init__(
        self,
        lm: LoadedModel,
        task: TaskSpec,
        demonstrations: list[Demonstration] | None = None,
        seed: int = 42,
        dev_texts: Sequence[str] = (),
        random_top_draws: int = 20,
        beta: torch.Tensor | None = None,
    ) -> None:
        if demonstrations is None:
            demos = task.demonstrations
            demonstrations = demos if isinstance(demos, list) else load_demonstrations(demos, task.labels)
        self.lm = lm
        self.task = task
        self.prompt = TaskPrompt.build(task, demonstrations, lm.tokenizer)
        self.seed = seed
        self.dev_texts = list(dev_texts)
        self.random_top_draws = random_top_draws
        self._prefixes: dict[Method, Prefix] = {}
        self._reweightings: dict[Method, tuple[torch.Tensor, Reweighting]] = {}  # last β per method
        self.beta = beta.to(lm.device) if beta is not None else None
        self._content_free: torch.Tensor | None = None  # under self.beta, computed on first use
        self._heads: dict[Method, tuple[torch.Tensor | None, LinearHead | KnnHead]] = {}  # with its β
        self._pool: list[Demonstration] | None = None

    # --- prefixes -------------------------------------------------------------------------------

    def prefix(self, method: Method | str) -> Prefix:
        method = Method(method)
        if method not in self._prefixes:
            start = time.perf_counter()
            self._prefixes[method] = self._build_prefix(method)
            p = self._prefixes[method]
            log.info(
                "task %s: %s prefix ready in %.2fs (%d cached tokens, %d bytes, %d re-encoded tokens)",
                self.task.name, method, time.perf_counter() - start,
                p.cache.num_tokens if p.cache else 0, p.kv_bytes, len(p.ids),
            )
        return self._prefixes[method]

    def install_cache(self, method: Method | str, cache: AnchorCache) -> None:
        """Use a cache loaded from storage instead of building one."""
        method = Method(method)
        if method not in CACHED_METHODS:
            raise ValidationError(f"method {method} does not use an anchor cache")
        self._prefixes[method] = Prefix(cache=cache)

    def _cache(self, keep: list[bool]) -> AnchorCache:
        ctx = self.prompt.context
        return build_anchor_cache(self.lm, ctx.ids, keep, ctx.label_positions, ctx.classes)

    def _build_prefix(self, method: Method) -> Prefix:
        ctx = self.prompt.context
        match method:
            case Method.VANILLA:
                return Prefix(ids=ctx.ids)
            case Method.ZERO_SHOT:
                return Prefix()
            case Method.TEXT_ANCHOR:
                return Prefix(ids=tuple(self.prompt.encode_text_anchor_context()))
            case Method.HIDDEN_ANCHOR:
                return Prefix(cache=self._cache(anchor_keep(ctx)))
            case Method.HIDDEN_RANDOM:
                return Prefix(cache=self._cache(random_keep(ctx, np.random.default_rng(self.seed))))
            case Method.HIDDEN_RANDOM_TOP:
                return self._random_top()
            case Method.MANY_SHOT:
                if not self.pool():
                    raise ValidationError("method many_shot needs the task's labelled pool (`examples`)")
                return Prefix(cache=many_shot_cache(self.lm, self.task, self.pool()))
            case Method.KNN | Method.LINEAR_HEAD:
                return self.prefix(Method.HIDDEN_ANCHOR)

    # --- the labelled pool and its heads (beyond the paper) --------------------------------------

    def pool(self) -> list[Demonstration]:
        """The task's `examples` without rows equal to a demonstration (empty without a pool)."""
        if self._pool is None:
            examples = self.task.examples
            rows = [] if examples is None else examples if isinstance(examples, list) else load_demonstrations(
                examples, self.task.labels)
            demos = {d.text for d in self.prompt.demonstrations}
            self._pool = [Demonstration(text=r.text, label=self.task.labels[self.task.label_index(r.label)])
                          for r in rows if r.text not in demos]
        return self._pool

    def head(self, method: Method | str, beta: torch.Tensor | None = None) -> LinearHead | KnnHead | None:
        """The head `method` scores with, fitted on the pool's Hidden_anchor features under `beta` (the
        features it will score) on first use, and again when `beta` changes; None for a method that
        reads the label words."""
        method = Method(method)
        if method not in HEAD_METHODS:
            return None
        fitted = self._heads.get(method)
        if fitted is None or fitted[0] is not beta:
            pool = self.pool()
            if not pool:
                raise ValidationError(f"method {method} needs the task's labelled pool (`examples`)")
            labels = np.array([self.task.label_index(d.label) for d in pool])
            fitted = (beta, self.fit_head(method, [d.text for d in pool], labels, beta))
            self._heads[method] = fitted
        return fitted[1]

    def fit_head(
        self, method: Method | str, texts: Sequence[str], labels: np.ndarray, beta: torch.Tensor | None = None
    ) -> LinearHead | KnnHead:
        """`method`'s head fitted on labelled texts, featurised in the Hidden_anchor context (under
        `beta` when given: the features a forward under that β gives)."""
        method, depth = Method(method), self.lm.num_layers
        features = self.features(texts, Method.HIDDEN_ANCHOR, head_layers(method, depth), beta)
        return fit_head(method, features, labels, len(self.task.labels), depth)

    def features(
        self, texts: Sequence[str], method: Method | str, layers: FeatureLayers, beta: torch.Tensor | None = None,
        batch_size: int = 16,
    ) -> Features:
        """What a head reading `layers` sees of each text: packed forwards of `batch_size` texts."""
        rw = self.reweighting(method, beta) if beta is not None else None
        rows = [PackedRow(self.prefix(method), tuple(q), tuple(self.prompt.label_ids), rw) for q in self.encode(texts)]
        with torch.inference_mode():
            parts = [packed_features(self.lm, rows[i : i + batch_size], layers)
                     for i in range(0, len(rows), batch_size)]
        return Features(torch.cat([p.hidden for p in parts]), torch.cat([p.label_logits for p in parts]))

    def _random_top(self) -> Prefix:
        """Best of N seeded Hidden_random draws by label loyalty to vanilla on the dev texts."""
        if not self.dev_texts:
            raise ValidationError("hidden_random_top needs dev texts to choose among random draws")
        dev = self.encode(self.dev_texts)
        reference = self.label_logits_ids(dev, Method.VANILLA).argmax(-1)
        rng = np.random.default_rng(self.seed)
        best: tuple[float, Prefix] | None = None
        for _ in range(self.random_top_draws):
            candidate = Prefix(cache=self._cache(random_keep(self.prompt.context, rng)))
            preds = self._packed_logits(candidate, dev).argmax(-1)
            loyalty = float((preds == reference).float().mean())
            if best is None or loyalty > best[0]:
                best = (loyalty, candidate)
        log.info("task %s: hidden_random_top dev label loyalty %.3f", self.task.name, best[0])
        return best[1]

    # --- re-weighting and calibration -----------------------------------------------------------

    def zero_beta(self) -> torch.Tensor:
        """β = 0 for every (layer, query head, class): exactly the unweighted model."""
        cfg = self.lm.model.config
        return torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, len(self.task.labels), device=self.lm.device)

    def label_keys(self, method: Method | str) -> tuple[list[int], list[int]]:
        """Key index and class of each demonstration label word behind `method`'s prefix."""
        prefix, ctx = self.prefix(method), self.prompt.context
        if prefix.cache is not None:
            keys, classes = list(prefix.cache.label_slots), list(prefix.cache.label_classes)
        elif prefix.ids == ctx.ids:  # vanilla: the context tokens lead every row
            keys, classes = list(ctx.label_positions), list(ctx.classes)
        else:
            keys, classes = [], []
        if not keys:
            raise ValidationError("re-weighting needs the demonstrations' label words: use vanilla or hidden_anchor")
        return keys, classes

    def reweighting(self, method: Method | str, beta: torch.Tensor) -> Reweighting:
        """β with the label keys behind `method`'s prefix; the last one per method is kept, so a
        served β is translated once, not per request."""
        method = Method(method)
        kept = self._reweightings.get(method)
        if kept is not None and kept[0] is beta:
            return kept[1]
        expected = tuple(self.zero_beta().shape)
        if tuple(beta.shape) != expected:
            raise ValidationError(f"β has shape {tuple(beta.shape)}; this model and task need {expected}")
        keys, classes = self.label_keys(method)
        device = self.lm.device
        rw = Reweighting(
            beta=beta.to(device),
            label_keys=torch.tensor(keys, device=device),
            label_classes=torch.tensor(classes, device=device),
        )
        self._reweightings[method] = (beta, rw)
        return rw

    def reweighting_plan(self, method: Method | str, beta: torch.Tensor) -> AttentionPlan:
        return AttentionPlan(reweighting=self.reweighting(method, beta))

    def content_free_logprobs(self, method: Method | str, beta: torch.Tensor | None = None) -> torch.Tensor:
        """(C,) log of the mean label distribution for content-free inputs (Zhao et al. 2021).

        Dividing a prediction's probabilities by these removes the prompt's own label bias.
        """
        logits = self.label_logits_ids(self.encode(CONTENT_FREE_INPUTS), method, beta=beta)
        return torch.log(torch.softmax(logits, -1).mean(0))

    # --- inference ------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.prompt.encode_batch(texts)

    def packed_row(self, ids: Sequence[int], method: Method | str, beta: torch.Tensor | None = None) -> PackedRow:
        """One tokenised query of this task as a row for `packed_label_logits`, which may pack it with
        rows of other tasks; its logits are over this task's labels (calibration stays with the caller)."""
        return self.packed_rows([ids], method, beta)[0]

    def packed_rows(self, queries: Sequence[Sequence[int]], method: Method | str, beta: torch.Tensor | None = None
                    ) -> list[PackedRow]:
        """`packed_row` of each query, sharing one lookup of what the rows have in common."""
        rw = self.reweighting(method, beta) if beta is not None else None
        prefix, labels, head = self.prefix(method), tuple(self.prompt.label_ids), self.head(method, beta)
        return [PackedRow(prefix=prefix, ids=tuple(ids), label_ids=labels, reweighting=rw, head=head)
                for ids in queries]

    @torch.inference_mode()
    def hidden_states(
        self, texts: Sequence[str], method: Method | str, batch_size: int = 16, plan: AttentionPlan | None = None
    ) -> torch.Tensor:
        return self._hidden(self.prefix(method), self.encode(texts), batch_size, plan)

    def _hidden(
        self, prefix: Prefix, queries: Sequence[Sequence[int]], batch_size: int = 16, plan: AttentionPlan | None = None
    ) -> torch.Tensor:
        """(N, hidden): packed forwards of `batch_size` queries when the plan is at most a shared β;
        otherwise (captures, isolation, explicit weights) length-sorted padded batches."""
        if _packable(plan):
            rw = plan.reweighting if plan is not None else None
            rows = [PackedRow(prefix, tuple(q), tuple(self.prompt.label_ids), rw) for q in queries]
            chunks = range(0, len(rows), batch_size)
            return torch.cat([packed_hidden(self.lm, rows[i : i + batch_size]) for i in chunks])
        order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
        out: list[torch.Tensor | None] = [None] * len(queries)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            hidden = last_hidden(self.lm, prefix, [queries[i] for i in chunk], plan)
            for i, h in zip(chunk, hidden, strict=True):
                out[i] = h
        return torch.stack(out)

    def label_logits(
        self, texts: Sequence[str], method: Method | str, batch_size: int = 16, beta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, C) label-word logits, re-weighted by `beta` when given."""
        return self.label_logits_ids(self.encode(texts), method, batch_size, beta)

    def label_logits_ids(
        self, queries: Sequence[Sequence[int]], method: Method | str, batch_size: int = 16,
        beta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, C) label-word logits for already tokenised queries (the server tokenises before queueing):
        one packed forward per `batch_size` queries, in input order."""
        rw = self.reweighting(method, beta) if beta is not None else None
        return self._packed_logits(self.prefix(method), queries, batch_size, rw, self.head(method, beta))

    def _packed_logits(
        self, prefix: Prefix, queries: Sequence[Sequence[int]], batch_size: int = 16,
        reweighting: Reweighting | None = None, head: LinearHead | KnnHead | None = None,
    ) -> torch.Tensor:
        if not queries:
            return torch.empty(0, len(self.prompt.label_ids), device=self.lm.device)
        label_ids = tuple(self.prompt.label_ids)
        rows = [PackedRow(prefix, tuple(q), label_ids, reweighting, head) for q in queries]
        with torch.inference_mode():
            logits = []
            for start in range(0, len(rows), batch_size):
                logits += packed_label_logits(self.lm, rows[start : start + batch_size])
            return torch.stack(logits)

    def classify(
        self, texts: Sequence[str], method: Method | str | None = None, batch_size: int = 16
    ) -> list[Prediction]:
        """Predictions as the server gives them: the task's own method runs with `beta` and, when
        the task calibrates, calibrated (raw probabilities beside them); other methods run plain."""
        method = Method(method or self.task.method)
        own = method == self.task.method
        logits = self.label_logits(texts, method, batch_size, beta=self.beta if own else None)
        if not (own and self.task.calibrate):
            return self.predictions(logits)
        if self._content_free is None:
            self._content_free = self.content_free_logprobs(method, self.beta)
        raw = self.predictions(logits)
        calibrated = self.predictions(calibrate(logits, self._content_free))
        return [dataclasses.replace(p, raw_probs=r.probs) for p, r in zip(calibrated, raw, strict=True)]

    def predictions(self, logits: torch.Tensor) -> list[Prediction]:
        """Label-word scores (N, C) to per-input label, probabilities and log-probabilities."""
        logprobs = torch.log_softmax(logits, -1)
        labels = self.task.labels
        predictions = []
        for row in logprobs.tolist():
            best = int(np.argmax(row))
            predictions.append(
                Prediction(
                    index=best,
                    label=labels[best],
                    probs={label: float(np.exp(lp)) for label, lp in zip(labels, row, strict=True)},
                    logprobs=dict(zip(labels, row, strict=True)),
                )
            )
        return predictions
