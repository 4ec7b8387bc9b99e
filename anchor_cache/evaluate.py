"""The paper's evaluations: compression (Table 2) and re-weighting (Table 1).

Per seed: demonstrations are drawn from train (first k per class in a seeded shuffle), up to
`limit` test rows are sampled with the same seed, and every method classifies the same rows.
Label loyalty is agreement with vanilla ICL's predicted label; word loyalty is the Jaccard
similarity of the top-5 full-vocabulary tokens at the last position, also against vanilla.

Besides the six `Method`s, the variants below add learned β and/or contextual calibration to a
base method. β is trained per seed on `train_per_class` rows per class drawn from train,
disjoint from that seed's demonstrations (the paper's setting). `linear_head` and `knn` fit a head
(heads.py) per seed on `pool_per_class` rows per class drawn the same way (the same rows as β's
when the two counts are equal) and score the Hidden_anchor features with it.

Each of `priors` (priors.py) also scores every method: `pool` as the method gives its
probabilities, `uniform` and `adapt` moved to another class prior, `adapt`'s estimated from the
test rows themselves as they arrive in batches, as a server sees its traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from anchor_cache.auto import CANDIDATES, Choice, Estimate, choose, rescaled
from anchor_cache.cache import kv_bytes_per_token
from anchor_cache.classifier import Classifier, calibrate
from anchor_cache.data import Example, read_jsonl, sample_rows, seed_demonstrations, training_draw
from anchor_cache.errors import ValidationError
from anchor_cache.forward import label_logits, vocab_logits
from anchor_cache.heads import KnnHead, LinearHead
from anchor_cache.many_shot import many_shot_cache
from anchor_cache.models import LoadedModel
from anchor_cache.priors import Prior, PriorShift, class_frequencies
from anchor_cache.reweighting import TrainConfig, train_reweighting
from anchor_cache.task import Demonstration, Method, TaskSpec
from anchor_cache.traffic import of_rows

WORD_LOYALTY_TOP_K = 5


@dataclass(frozen=True)
class Variant:
    base: Method
    reweighted: bool = False
    calibrated: bool = False
    head: Method | None = None  # LINEAR_HEAD or KNN: a head fitted on the pool scores the features (heads.py)
    many_shot: bool = False  # the pool as demonstrations: one anchor cache per group, merged (many_shot.py)
    auto: bool = False  # the variant cross-validation on the pool chooses (auto.py)


VARIANTS = {m.value: Variant(m) for m in Method} | {
    "vanilla_reweighted": Variant(Method.VANILLA, reweighted=True),
    "hidden_anchor_reweighted": Variant(Method.HIDDEN_ANCHOR, reweighted=True),
    "calibrated": Variant(Method.VANILLA, calibrated=True),
    "hidden_anchor_reweighted_calibrated": Variant(Method.HIDDEN_ANCHOR, reweighted=True, calibrated=True),
    "linear_head": Variant(Method.HIDDEN_ANCHOR, head=Method.LINEAR_HEAD),
    "linear_head_reweighted": Variant(Method.HIDDEN_ANCHOR, reweighted=True, head=Method.LINEAR_HEAD),
    "knn": Variant(Method.HIDDEN_ANCHOR, head=Method.KNN),
    "many_shot": Variant(Method.HIDDEN_ANCHOR, many_shot=True),
    "auto": Variant(Method.HIDDEN_ANCHOR, auto=True),
    "hidden_anchor_calibrated": Variant(Method.HIDDEN_ANCHOR, calibrated=True),
}


@dataclass
class EvalConfig:
    data: Path
    template: str
    labels: list[str]
    methods: list[str]  # keys of VARIANTS
    shots_per_class: int = 1
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44, 45, 46])
    limit: int = 1000
    batch_size: int = 16
    top_draws: int = 20
    top_dev_size: int = 100
    train_per_class: int = 4
    pool_per_class: int = 16  # labelled rows per class the heads are fitted on, disjoint from demos and test
    reweight: TrainConfig = field(default_factory=TrainConfig)
    priors: list[str] = field(default_factory=lambda: [Prior.POOL.value])
    prior_min_samples: int = 200


@dataclass
class MethodRun:
    """One method on one seed: log-probabilities, top-k token sets and cost."""

    logprobs: np.ndarray  # (N, C), as the method (and calibration) give them
    topk: list[set[int]]
    tokens_per_request: float
    kv_cache_bytes: int


def _run_method(
    clf: Classifier, variant: Variant, beta: torch.Tensor | None, texts: Sequence[str], batch_size: int,
    bytes_per_token: int, bar: tqdm, head: LinearHead | KnnHead | None = None,
) -> MethodRun:
    method = variant.base
    plan = clf.reweighting_plan(method, beta) if beta is not None else None
    content_free = clf.content_free_logprobs(method, beta) if variant.calibrated else None
    rows, topk = [], []
    chunk = batch_size * 4
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        with torch.inference_mode():
            hidden = clf.hidden_states(part, method, batch_size, plan)
            logits = label_logits(clf.lm, hidden, clf.prompt.label_ids)
            if head is not None:
                logits = head.scores(clf.features(part, method, head.layers, beta, batch_size))
            if content_free is not None:
                logits = calibrate(logits, content_free)
            rows.append(torch.log_softmax(logits.float(), -1).cpu().numpy())
            top = vocab_logits(clf.lm, hidden).topk(WORD_LOYALTY_TOP_K, dim=-1).indices.tolist()
        topk.extend(set(row) for row in top)
        bar.update(len(part))
    prefix = clf.prefix(method)
    query_lens = [len(clf.prompt.encode(t)) for t in texts]
    kv = prefix.kv_bytes if prefix.cache is not None else len(prefix.ids) * bytes_per_token
    kv += head.nbytes if head is not None else 0
    return MethodRun(
        logprobs=np.concatenate(rows),
        topk=topk,
        tokens_per_request=float(np.mean([prefix.tokens_per_request(n) for n in query_lens])),
        kv_cache_bytes=kv,
    )


def _train_betas(
    clf: Classifier, variants: list[Variant], train: list[Example], used: set[int], cfg: EvalConfig, seed: int
) -> dict[Method, torch.Tensor]:
    """One β per base method that a requested variant re-weights, trained on this seed's draw."""
    bases = list(dict.fromkeys(v.base for v in variants if v.reweighted))
    if not bases:
        return {}
    train = training_draw(train, used, len(cfg.labels), cfg.train_per_class, seed)
    texts, labels = [r.text for r in train], [r.label for r in train]
    return {
        base: train_reweighting(clf, texts, labels, replace(cfg.reweight, method=base, seed=seed), progress=False).beta
        for base in bases
    }


def _pool(train: list[Example], used: set[int], cfg: EvalConfig, seed: int) -> list[Example]:
    """This seed's labelled pool: `pool_per_class` rows per class from train, disjoint from the demos."""
    return training_draw(train, used, len(cfg.labels), cfg.pool_per_class, seed)


def _many_shot(clf: Classifier, pool: list[Example]) -> Classifier:
    """A classifier whose Hidden_anchor prefix is the pool's merged group caches (many_shot.py)."""
    task = clf.task
    demos = [Demonstration(text=r.text, label=task.labels[r.label]) for r in pool]
    many = Classifier(clf.lm, task, demonstrations=clf.prompt.demonstrations)
    many.install_cache(Method.HIDDEN_ANCHOR, many_shot_cache(clf.lm, task, demos))
    return many


def _fit_heads(
    clf: Classifier, variants: list[Variant], pool: list[Example], betas: dict[Method, torch.Tensor],
) -> dict[Variant, LinearHead | KnnHead]:
    """Each requested head fitted on this seed's pool, featurised in the Hidden_anchor context (under
    the seed's β for a re-weighted variant, the features it will score)."""
    labels = np.array([r.label for r in pool])
    return {
        variant: clf.fit_head(variant.head, [r.text for r in pool], labels,
                              betas.get(variant.base) if variant.reweighted else None)
        for variant in dict.fromkeys(v for v in variants if v.head)
    }


def prior_predictions(logprobs: np.ndarray, prior: Prior, base: np.ndarray, batch_size: int,
                      min_samples: int) -> np.ndarray:
    """Predictions under `prior`, the rows arriving `batch_size` at a time: `adapt` corrects each
    batch with the estimate from the rows before and including it, as the server does."""
    shift = PriorShift(prior, base, min_samples=min_samples)
    preds = []
    for start in range(0, len(logprobs), batch_size):
        part = torch.as_tensor(logprobs[start : start + batch_size])
        shift.observe(part)
        preds.append(shift.correct(part).argmax(-1).numpy())
    return np.concatenate(preds)


def _rounded(logprobs: np.ndarray) -> list[list[float]]:
    return np.round(logprobs, 4).tolist()


def on_traffic(logprobs: np.ndarray, est: Estimate) -> tuple[float, float, float]:
    """(accuracy, low, high) a server serving `auto`'s choice estimates on traffic whose (N, C)
    log-probabilities before its temperature are `logprobs` (traffic.py; the class prior `pool`)."""
    top = np.exp(rescaled(logprobs, est.temperature)).max(1)
    return of_rows(top, est.accuracy - est.low, est.high - est.accuracy)


def _chosen(choice: Choice, test: np.ndarray, gold: np.ndarray) -> dict[str, Any]:
    """What auto chose on this seed, its estimate, whether the estimate's interval holds the accuracy
    of the test log-probabilities `test` and whether the interval for that many rows does, the
    estimate from the test rows' served probabilities as a server makes it on its traffic
    (traffic.py) and whether its interval holds the test accuracy, the folds
    and seconds its cross-validation took, and the predictions behind all of it (the chosen
    candidate's out-of-fold ones on the pool, its test ones) for estimates made afterwards."""
    est, held = choice.estimate, choice.predictions
    accuracy, rows = float((test.argmax(1) == gold).mean()), len(gold)
    on_test = on_traffic(test, est)
    return {"chosen": choice.chosen.name, "candidates": choice.scores, "estimate": asdict(est),
            "estimate_covers": est.covers(accuracy), "test_rows_interval": list(est.for_rows(rows)),
            "test_rows_interval_covers": est.covers(accuracy, rows),
            "traffic_estimate": list(on_test), "traffic_covers": on_test[1] <= accuracy <= on_test[2],
            "folds": list(choice.folds),
            "cv_seconds": round(choice.seconds, 1),
            "predictions": {"pool_gold": held.gold.tolist(), "pool_most": _rounded(held.most),
                            "pool_fewest": _rounded(held.fewest), "curve_weight": held.weight,
                            "test_gold": gold.tolist(), "test": _rounded(test)}}


def _jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b)


def evaluate(lm: LoadedModel, cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    train = read_jsonl(cfg.data / "train.jsonl", cfg.labels)
    test = read_jsonl(cfg.data / "test.jsonl", cfg.labels)
    unknown = [m for m in cfg.methods if m not in VARIANTS]
    if unknown:
        raise ValidationError(f"unknown methods {unknown}; choose from {list(VARIANTS)}")
    methods = list(dict.fromkeys([Method.VANILLA.value, *cfg.methods]))  # vanilla is every loyalty's reference
    if "auto" in methods:  # every candidate runs; auto reports the one the pool chooses
        methods = list(dict.fromkeys([*(m for m in methods if m != "auto"), *(c.name for c in CANDIDATES), "auto"]))
    variants = [VARIANTS[m] for m in methods]
    n_test = min(cfg.limit, len(test))
    bar = tqdm(total=n_test * len(methods) * len(cfg.seeds), desc="eval", unit="ex", disable=not progress)
    bytes_per_token = kv_bytes_per_token(lm)
    per_seed: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in cfg.seeds:
        demos, used = seed_demonstrations(train, cfg.labels, cfg.shots_per_class, seed)
        rows = sample_rows(test, cfg.limit, seed)
        dev = sample_rows(train, cfg.top_dev_size, seed, exclude=used) if Method.HIDDEN_RANDOM_TOP in methods else []
        task = TaskSpec(name="eval", template=cfg.template, labels=cfg.labels, demonstrations=demos)
        clf = Classifier(lm, task, seed=seed, dev_texts=[r.text for r in dev], random_top_draws=cfg.top_draws)
        texts = [r.text for r in rows]
        gold = np.array([r.label for r in rows])
        betas = _train_betas(clf, variants, train, used, cfg, seed)
        pool = _pool(train, used, cfg, seed) if any(v.head or v.many_shot for v in variants) else []
        heads = _fit_heads(clf, variants, pool, betas)
        many = _many_shot(clf, pool) if any(v.many_shot for v in variants) else None
        runs, choices = {}, {}
        for name, variant in zip(methods, variants, strict=True):
            if variant.auto:
                choice = choose(clf, [r.text for r in pool], [r.label for r in pool],
                                replace(cfg.reweight, method=Method.HIDDEN_ANCHOR, seed=seed), seed)
                runs[name], choices[name] = runs[choice.chosen.name], choice
                continue
            bar.set_postfix(seed=seed, method=name)
            beta = betas.get(variant.base) if variant.reweighted else None
            runs[name] = _run_method(many if variant.many_shot else clf, variant, beta, texts, cfg.batch_size,
                                     bytes_per_token, bar, heads.get(variant))
        ref = runs[Method.VANILLA.value]
        ref_preds = ref.logprobs.argmax(1)
        base = class_frequencies([r.label for r in pool], len(cfg.labels))
        for method, run in runs.items():
            preds = run.logprobs.argmax(1)
            by_prior = {prior: 100 * float((prior_predictions(run.logprobs, Prior(prior), base, cfg.batch_size,
                                                              cfg.prior_min_samples) == gold).mean())
                        for prior in cfg.priors}
            per_seed[method].append(
                {
                    "seed": seed,
                    "accuracy": 100 * float((preds == gold).mean()),
                    "accuracy_by_prior": by_prior,
                    "label_loyalty": 100 * float((preds == ref_preds).mean()),
                    "word_loyalty": 100 * float(np.mean(list(map(_jaccard, run.topk, ref.topk)))),
                    "tokens_per_request": run.tokens_per_request,
                    "kv_cache_bytes": run.kv_cache_bytes,
                    "n": len(texts),
                } | (_chosen(choices[method], run.logprobs, gold) if method in choices else {})
            )
    bar.close()
    summary = {}
    for method in methods:
        seeds = per_seed[method]
        summary[method] = {
            key: float(np.mean([s[key] for s in seeds]))
            for key in ("accuracy", "label_loyalty", "word_loyalty", "tokens_per_request", "kv_cache_bytes")
        } | {"accuracy_by_prior": {p: float(np.mean([s["accuracy_by_prior"][p] for s in seeds])) for p in cfg.priors},
             "per_seed": seeds}
        summary[method]["kv_cache_bytes"] = round(summary[method]["kv_cache_bytes"])
    config = asdict(cfg) | {"data": str(cfg.data)}
    return {"config": config | {"model": lm.name, "dtype": str(lm.dtype).removeprefix("torch.")}, "methods": summary}


def markdown_table(results: dict[str, Any]) -> str:
    priors = [p for p in results["config"]["priors"] if p != Prior.POOL]
    lines = [
        "| method | accuracy | " + "".join(f"prior {p} | " for p in priors)
        + "label loyalty | word loyalty | tokens/request | KV cache bytes |",
        "|---|---|" + "---|" * len(priors) + "---|---|---|---|",
    ]
    for name, m in results["methods"].items():
        lines.append(
            f"| {name} | {m['accuracy']:.2f} | " + "".join(f"{m['accuracy_by_prior'][p]:.2f} | " for p in priors)
            + f"{m['label_loyalty']:.2f} | {m['word_loyalty']:.2f} | {m['tokens_per_request']:.1f} | "
            f"{int(m['kv_cache_bytes']):,} |"
        )
    for name, m in results["methods"].items():
        for s in m["per_seed"]:
            if "chosen" in s:
                est = s["estimate"]
                low, high = s["test_rows_interval"]
                losses = ", ".join(f"{c} {v['log_loss']:.3f}" for c, v in s["candidates"].items())
                lines.append(f"\n{name}, seed {s['seed']}: chose {s['chosen']} by cross-validated log loss "
                             f"({losses}); "
                             f"estimated accuracy {100 * est['accuracy']:.1f}% [{100 * est['low']:.1f}, "
                             f"{100 * est['high']:.1f}] on {est['rows']} pool rows, ECE {est['ece']:.3f}, "
                             f"temperature {est['temperature']:.2f}; on the {s['n']} test rows {s['accuracy']:.1f}% "
                             f"(interval for {s['n']} rows: [{100 * low:.1f}, {100 * high:.1f}]), estimated from "
                             "their served probabilities " + "{:.1f}% [{:.1f}, {:.1f}]".format(
                                 *(100 * x for x in s["traffic_estimate"])))
    return "\n".join(lines)

