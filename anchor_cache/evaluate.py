"""The paper's compression evaluation (Table 2): accuracy and loyalty of each method.

Per seed: demonstrations are drawn from train (first k per class in a seeded shuffle), up to
`limit` test rows are sampled with the same seed, and every method classifies the same rows.
Label loyalty is agreement with vanilla ICL's predicted label; word loyalty is the Jaccard
similarity of the top-5 full-vocabulary tokens at the last position, also against vanilla.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from anchor_cache.cache import kv_bytes_per_token
from anchor_cache.classifier import Classifier
from anchor_cache.data import read_jsonl, sample_demonstrations, sample_rows
from anchor_cache.forward import label_logits, vocab_logits
from anchor_cache.models import LoadedModel
from anchor_cache.task import Demonstration, Method, TaskSpec

WORD_LOYALTY_TOP_K = 5


@dataclass
class EvalConfig:
    data: Path
    template: str
    labels: list[str]
    methods: list[Method]
    shots_per_class: int = 1
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44, 45, 46])
    limit: int = 1000
    batch_size: int = 16
    top_draws: int = 20
    top_dev_size: int = 100


@dataclass
class MethodRun:
    """One method on one seed: predictions, top-k token sets and cost."""

    preds: np.ndarray
    topk: list[set[int]]
    tokens_per_request: float
    kv_cache_bytes: int


def _run_method(
    clf: Classifier, method: Method, texts: Sequence[str], batch_size: int, bytes_per_token: int, bar: tqdm
) -> MethodRun:
    preds, topk = [], []
    chunk = batch_size * 4
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        with torch.inference_mode():
            hidden = clf.hidden_states(part, method, batch_size)
            preds.append(label_logits(clf.lm, hidden, clf.prompt.label_ids).argmax(-1).cpu().numpy())
            top = vocab_logits(clf.lm, hidden).topk(WORD_LOYALTY_TOP_K, dim=-1).indices.tolist()
        topk.extend(set(row) for row in top)
        bar.update(len(part))
    prefix = clf.prefix(method)
    query_lens = [len(clf.prompt.encode(t)) for t in texts]
    kv = prefix.kv_bytes if prefix.cache is not None else len(prefix.ids) * bytes_per_token
    return MethodRun(
        preds=np.concatenate(preds),
        topk=topk,
        tokens_per_request=float(np.mean([prefix.tokens_per_request(n) for n in query_lens])),
        kv_cache_bytes=kv,
    )


def _jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b)


def evaluate(lm: LoadedModel, cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    train = read_jsonl(cfg.data / "train.jsonl", cfg.labels)
    test = read_jsonl(cfg.data / "test.jsonl", cfg.labels)
    methods = list(dict.fromkeys([Method.VANILLA, *cfg.methods]))  # vanilla is every loyalty's reference
    n_test = min(cfg.limit, len(test))
    bar = tqdm(total=n_test * len(methods) * len(cfg.seeds), desc="eval", unit="ex", disable=not progress)
    bytes_per_token = kv_bytes_per_token(lm)
    per_seed: dict[Method, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in cfg.seeds:
        picked, used = sample_demonstrations(train, len(cfg.labels), cfg.shots_per_class, seed)
        demos = [Demonstration(text=r.text, label=cfg.labels[r.label]) for r in picked]
        rows = sample_rows(test, cfg.limit, seed)
        dev = sample_rows(train, cfg.top_dev_size, seed, exclude=used) if Method.HIDDEN_RANDOM_TOP in methods else []
        task = TaskSpec(name="eval", template=cfg.template, labels=cfg.labels, demonstrations=demos)
        clf = Classifier(lm, task, seed=seed, dev_texts=[r.text for r in dev], random_top_draws=cfg.top_draws)
        texts = [r.text for r in rows]
        gold = np.array([r.label for r in rows])
        runs = {}
        for method in methods:
            bar.set_postfix(seed=seed, method=str(method))
            runs[method] = _run_method(clf, method, texts, cfg.batch_size, bytes_per_token, bar)
        ref = runs[Method.VANILLA]
        for method, run in runs.items():
            per_seed[method].append(
                {
                    "seed": seed,
                    "accuracy": 100 * float((run.preds == gold).mean()),
                    "label_loyalty": 100 * float((run.preds == ref.preds).mean()),
                    "word_loyalty": 100 * float(np.mean(list(map(_jaccard, run.topk, ref.topk)))),
                    "tokens_per_request": run.tokens_per_request,
                    "kv_cache_bytes": run.kv_cache_bytes,
                    "n": len(texts),
                }
            )
    bar.close()
    summary = {}
    for method in methods:
        seeds = per_seed[method]
        summary[str(method)] = {
            key: float(np.mean([s[key] for s in seeds]))
            for key in ("accuracy", "label_loyalty", "word_loyalty", "tokens_per_request", "kv_cache_bytes")
        } | {"per_seed": seeds}
        summary[str(method)]["kv_cache_bytes"] = round(summary[str(method)]["kv_cache_bytes"])
    config = asdict(cfg) | {"data": str(cfg.data), "methods": [str(m) for m in cfg.methods]}
    return {"config": config | {"model": lm.name, "dtype": str(lm.dtype).removeprefix("torch.")}, "methods": summary}


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        "| method | accuracy | label loyalty | word loyalty | tokens/request | KV cache bytes |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in results["methods"].items():
        lines.append(
            f"| {name} | {m['accuracy']:.2f} | {m['label_loyalty']:.2f} | {m['word_loyalty']:.2f} | "
            f"{m['tokens_per_request']:.1f} | {int(m['kv_cache_bytes']):,} |"
        )
    return "\n".join(lines)
