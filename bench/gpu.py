"""The performance issue's GPU figures, for one short run on a lent GPU.

    python -m bench.gpu --model DIR --test sst2/test.jsonl --train sst2/train.jsonl --out gpu.json

Engine, in process (bfloat16, SST-2 template, 1 demonstration per class drawn with seed 42,
Hidden_anchor): packed throughput in requests/s at batch 1, 64 and 256, beside the padded forward
of the previous commit's serving path (`last_hidden`); β's overhead at batch 1 and 64 (a random β
against none, interleaved). Server: `python -m server` on the GPU under closed-loop load from
this process at concurrency 1 and 256 (bench/load.py). CUDA time is taken after
`torch.cuda.synchronize()`; every figure is a median over repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from anchor_cache.classifier import Classifier
from anchor_cache.data import read_jsonl, sample_rows, seed_demonstrations
from anchor_cache.forward import label_logits, last_hidden
from anchor_cache.models import load_model
from anchor_cache.task import PRESETS, TaskSpec
from bench.load import load_phase, start_server, stop_server


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `fn` after two warm-ups, synchronising the GPU around each call."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def engine(args: argparse.Namespace, spec: TaskSpec, texts: list[str]) -> dict:
    lm = load_model(str(args.model), args.device, "bfloat16")
    clf = Classifier(lm, spec)
    queries = clf.encode(texts)
    prefix = clf.prefix("hidden_anchor")
    name = torch.cuda.get_device_name() if lm.device.type == "cuda" else "cpu"
    out: dict = {"device": name, "throughput": {}, "beta_overhead": {}}
    with torch.inference_mode():
        for batch in args.batches:
            rows = queries[:batch]

            def packed(rows: list = rows, batch: int = batch) -> object:
                return clf.label_logits_ids(rows, "hidden_anchor", batch_size=batch)

            def padded(rows: list = rows) -> object:
                return label_logits(lm, last_hidden(lm, prefix, rows), clf.prompt.label_ids)

            t_packed, t_padded = timed(packed, args.repeats), timed(padded, args.repeats)
            out["throughput"][batch] = {"packed_ms": 1000 * t_packed, "padded_ms": 1000 * t_padded,
                                        "packed_rps": batch / t_packed, "padded_rps": batch / t_padded}
        beta = torch.randn_like(clf.zero_beta()) * 0.5
        for batch in (b for b in args.batches if b <= 64):
            rows = queries[:batch]
            plain, weighted = [], []
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                plain.append(timed(lambda rows=rows, b=batch: clf.label_logits_ids(rows, "hidden_anchor", b), 1))
                weighted.append(timed(
                    lambda rows=rows, b=batch: clf.label_logits_ids(rows, "hidden_anchor", b, beta=beta), 1))
            p, w = statistics.median(plain), statistics.median(weighted)
            out["beta_overhead"][batch] = {"plain_ms": 1000 * p, "beta_ms": 1000 * w, "ratio": w / p}
    return out


def server(args: argparse.Namespace, spec: TaskSpec, texts: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="anchorserve-gpu-"))
    config = work / "config.json"
    config.write_text(json.dumps({"tasks": [spec.model_dump(mode="json")]}))
    env = {"ANCHORSERVE_MODEL": str(args.model), "ANCHORSERVE_DEVICE": args.device, "ANCHORSERVE_DTYPE": "bfloat16",
           "ANCHORSERVE_CONFIG": str(config), "ANCHORSERVE_STATE_DIR": str(work / "state"),
           "ANCHORSERVE_MAX_BATCH_SIZE": "256", "ANCHORSERVE_MAX_BATCH_TOKENS": "65536",
           "ANCHORSERVE_MAX_QUEUED_REQUESTS": "4096"}
    proc, url, ready_s = start_server(env, work / "server.log")
    try:
        phases = [asyncio.run(load_phase(url, texts, c, args.duration, (spec.name,))) for c in args.concurrency]
    finally:
        stop_server(proc)
    return {"ready_s": ready_s, "load": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a converted SmolLM2 model folder")
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 256])
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 256])
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to dry-run this script")
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    args = parser.parse_args()
    template, labels = PRESETS["sst2"]
    demos, _ = seed_demonstrations(read_jsonl(args.train, labels), labels, 1, 42)
    spec = TaskSpec(name="sst2", template=template, labels=labels, demonstrations=demos)
    texts = [r.text for r in sample_rows(read_jsonl(args.test, labels), 512, 42)]
    result = {"command": " ".join(sys.argv), "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for part, measure in (("engine", engine), ("server", server)):  # each part is kept as soon as it is done
        result[part] = measure(args, spec, texts)
        args.out.write_text(json.dumps(result, indent=1))
    sys.stdout.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
