"""What the benchmark scripts share: dataset names, the results folder, common arguments."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from anchor_cache.arguments import default_data_root
from anchor_cache.task import PRESETS

DATASETS = ["sst2", "trec", "agnews", "emoc"]
RESULTS = Path(__file__).parent / "results"


def dataset_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--datasets", type=lambda s: s.split(","), default=DATASETS)
    parser.add_argument("--data-root", type=Path, default=default_data_root(), help="folder of dataset folders")
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="auto")
    return parser


def evaluate_each(lm, args: argparse.Namespace, out: str, **config: Any) -> Iterator[tuple[str, dict]]:
    """The eval (`config`: EvalConfig's fields) on each of `args.datasets` with its preset, over
    `args.seeds` and `args.limit` test rows; every dataset's result is saved to RESULTS/`out` as it
    comes, and yielded."""
    from anchor_cache.evaluate import EvalConfig, evaluate  # torch: only the benchmarks that evaluate load it

    results: dict[str, dict] = {}
    for name in args.datasets:
        template, labels = PRESETS[name]
        cfg = EvalConfig(data=args.data_root / name, template=template, labels=labels, seeds=args.seeds,
                         limit=args.limit, **config)
        results[name] = evaluate(lm, cfg, progress=False)
        (RESULTS / out).write_text(json.dumps(results, indent=1))
        yield name, results[name]


def merged_results(files: list[str]) -> dict:
    """`evaluate_each`'s results files (in RESULTS) of runs over other seeds as one: per dataset and
    method, the seeds of all."""
    out: dict = {}
    for file in files:
        for dataset, result in json.loads((RESULTS / file).read_text()).items():
            methods = out.setdefault(dataset, {"methods": {}})["methods"]
            for name, method in result["methods"].items():
                methods.setdefault(name, {"per_seed": []})["per_seed"] += method["per_seed"]
    return out


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> float:
    """Poll `url`/ready until it answers 200; seconds it took. Raises with the end of the server's
    log when the process exits first or `timeout` passes."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; the end of {log}:\n{log_tail(log)}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s; the end of {log}:\n{log_tail(log)}")


def log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no log)"


def write_result(out: Path, result: dict, table: str) -> None:
    """A bench's JSON to `out`, and its markdown table to stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    sys.stdout.write(table + "\n")
