"""The CUDA path, checked on a lent GPU: dtypes, batching, β's fast path, training and latency.

    python -m bench.cuda_check --out bench/results/cuda.json

Against fp32 on the CPU (the tested reference), for the default model on SST-2 and AG News:
prediction agreement and the largest probability difference for fp32/bf16/fp16 on CUDA, batched
(32) vs one-by-one, β's fast path vs the written-out attention, β training time, and
Hidden_anchor vs vanilla latency at batch 1 and 32.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from anchor_cache.attention import AttentionPlan
from anchor_cache.classifier import Classifier
from anchor_cache.data import read_jsonl, sample_rows, seed_demonstrations, training_draw
from anchor_cache.forward import label_logits, last_hidden
from anchor_cache.models import load_model
from anchor_cache.reweighting import train_reweighting
from anchor_cache.task import PRESETS, Method, TaskSpec
from bench.common import dataset_parser

DTYPES = ("float32", "bfloat16", "float16")


def _classifier(lm, root: Path, name: str, rows: int, seed: int = 42) -> tuple[Classifier, list[str], list]:
    template, labels = PRESETS[name]
    train = read_jsonl(root / name / "train.jsonl", labels)
    demos, used = seed_demonstrations(train, labels, 1, seed)
    clf = Classifier(lm, TaskSpec(name=name, template=template, labels=labels, demonstrations=demos))
    return clf, [r.text for r in sample_rows(read_jsonl(root / name / "test.jsonl", labels), rows, seed)], \
        training_draw(train, used, len(labels), 4, seed)


def _probs(clf: Classifier, texts: list[str], method: Method, batch: int, beta=None) -> torch.Tensor:
    return torch.softmax(clf.label_logits(texts, method, batch, beta), -1).float().cpu()


def _ms(fn, device: str, repeats: int = 20) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _latencies(clf: Classifier, texts: list[str], beta: torch.Tensor, device: str) -> dict:
    out = {}
    with torch.inference_mode():
        for batch in (1, 32):
            runs = {"vanilla": (Method.VANILLA, None), "hidden_anchor": (Method.HIDDEN_ANCHOR, None),
                    "hidden_anchor_beta": (Method.HIDDEN_ANCHOR, beta)}
            out[f"latency_ms_batch{batch}"] = {
                name: _ms(lambda m=m, b=b, n=batch: clf.label_logits(texts[:n], m, n, b), device)
                for name, (m, b) in runs.items()
            }
    return out


def check_dataset(root: Path, name: str, model: str, device: str, rows: int) -> dict:
    out: dict = {}
    cpu = load_model(model, "cpu", "float32")
    clf, texts, train_rows = _classifier(cpu, root, name, rows)
    reference = {m: _probs(clf, texts, m, 32) for m in (Method.VANILLA, Method.HIDDEN_ANCHOR)}
    del cpu, clf
    for dtype in DTYPES:
        lm = load_model(model, device, dtype)
        clf, texts, train_rows = _classifier(lm, root, name, rows)
        row: dict = {}
        for method, ref in reference.items():
            batched = _probs(clf, texts, method, 32)
            single = _probs(clf, texts[:32], method, 1)
            row[str(method)] = {
                "agreement_with_cpu_fp32": float((batched.argmax(-1) == ref.argmax(-1)).float().mean()),
                "max_prob_diff_vs_cpu_fp32": float((batched - ref).abs().max()),
                "max_prob_diff_batched_vs_single": float((batched[:32] - single).abs().max()),
            }
        start = time.perf_counter()
        beta = train_reweighting(clf, [r.text for r in train_rows], [r.label for r in train_rows], progress=False).beta
        _sync(device)
        row["beta_train_seconds"] = time.perf_counter() - start
        plan = clf.reweighting_plan(Method.HIDDEN_ANCHOR, beta)
        prefix, queries = clf.prefix(Method.HIDDEN_ANCHOR), clf.encode(texts[:32])
        with torch.inference_mode():
            fast = label_logits(lm, last_hidden(lm, prefix, queries, plan), clf.prompt.label_ids)
            explicit_plan = AttentionPlan(reweighting=plan.reweighting, explicit=True)
            slow = label_logits(lm, last_hidden(lm, prefix, queries, explicit_plan), clf.prompt.label_ids)
        row["beta_fast_vs_explicit_max_logit_diff"] = float((fast - slow).abs().max())
        row |= _latencies(clf, texts, beta, device)
        out[dtype] = row
        del lm, clf
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cuda.json"))
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to dry-run this script")
    parser.add_argument("--rows", type=int, default=200, help="test rows per dataset")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {"device": name, "torch": torch.__version__, "datasets": {}}
    for dataset in args.datasets:
        result["datasets"][dataset] = check_dataset(args.data_root, dataset, args.model, args.device, args.rows)
        args.out.write_text(json.dumps(result, indent=1))
    sys.stdout.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
