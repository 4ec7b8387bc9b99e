"""Time `pack()` (anchor_cache/packed.py), which lays a batch of requests out as one sequence, at
batch 1, 95 and 256 on a tiny random Llama model (3 layers, tests/conftest.py's), CPU, float32.

    python -m bench.pack                                     # this tree: bench/results/pack.json, prints markdown
    git -C /work/main worktree add /tmp/pack-before HEAD     # once: the committed code beside this tree
    python -m bench.pack --tree /tmp/pack-before             # this tree and that one in one run, side by side
    python -m bench.pack --forward --tree /tmp/pack-before   # pack and the forward: bench/results/packed-forward.json

Each row is one query of 28-32 random token ids behind one task's Hidden_anchor cache; in the
"beta" variant every row also carries the task's β (one shared tensor, as a served task's rows
do). Every tree runs in its own subprocess (cwd and PYTHONPATH set to the tree, so `anchor_cache`
is that tree's) on the same saved model and the same rows: one warm-up call, then the median of
--repeats calls per batch. Only `pack` is timed, not the forward it prepares; with --forward,
`packed_label_logits`, which packs and runs the forward (β's cost beside the plain rows). Run it on an idle
machine: with two intra-op threads, other load inflates these few-millisecond timings many times.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS

BATCHES = (1, 95, 256)
REPO = Path(__file__).resolve().parents[1]


def time_pack(model_dir: str, repeats: int, forward: bool) -> dict[str, dict[str, dict[str, float]]]:
    """{variant: {batch: {"median_ms", "tokens"}}} for the `anchor_cache` on sys.path; `forward`:
    time `packed_label_logits` instead of `pack`."""
    from anchor_cache import Classifier, Demonstration, Method, TaskSpec, load_model
    from anchor_cache.packed import pack, packed_label_logits

    lm = load_model(model_dir, device="cpu", dtype="float32")
    task = TaskSpec(name="sentiment", template="Review: {text}\nSentiment:", labels=["Negative", "Positive"],
                    demonstrations=[Demonstration(text="a wonderful, moving film", label="Positive"),
                                    Demonstration(text="dull and lifeless, a waste", label="Negative")])
    clf = Classifier(lm, task)
    gen = torch.Generator().manual_seed(0)
    beta = torch.randn(clf.zero_beta().shape, generator=gen)
    vocab = lm.model.config.vocab_size
    queries = [torch.randint(vocab, (int(torch.randint(28, 33, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(max(BATCHES))]
    out: dict[str, dict[str, dict[str, float]]] = {}
    with torch.inference_mode():
        for variant, b in (("plain", None), ("beta", beta)):
            rows = [clf.packed_row(q, Method.HIDDEN_ANCHOR, b) for q in queries]
            timed = functools.partial(packed_label_logits if forward else pack, lm)
            out[variant] = {}
            for batch in BATCHES:
                chunk = rows[:batch]
                timed(chunk)  # warm-up
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    timed(chunk)
                    times.append(time.perf_counter() - start)
                out[variant][str(batch)] = {"median_ms": 1000 * statistics.median(times),
                                            "tokens": sum(map(len, queries[:batch]))}
    return out


def run_in(tree: Path, model_dir: Path, repeats: int, forward: bool) -> dict:
    """This script's worker in `tree`, importing that tree's `anchor_cache`."""
    env = os.environ | {"PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(model_dir), "--repeats", str(repeats),
           *(["--forward"] if forward else [])]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def markdown(result: dict) -> str:
    trees = list(result["trees"])
    head = ("| batch | tokens | " + " | ".join(f"{v} ms, {t}" for v in ("plain", "beta") for t in trees)
            + " | " + " | ".join(f"beta / plain, {t}" for t in trees) + " |")
    lines = [head, "|" + "---|" * (2 + 3 * len(trees))]
    first = result["trees"][trees[0]]
    for batch in map(str, BATCHES):
        ms = {(t, v): result["trees"][t][v][batch]["median_ms"] for t in trees for v in ("plain", "beta")}
        cells = [f"{ms[t, v]:.2f}" for v in ("plain", "beta") for t in trees]
        cells += [f"{ms[t, 'beta'] / ms[t, 'plain']:.2f}×" for t in trees]
        lines.append(f"| {batch} | {first['plain'][batch]['tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, action="append", default=[], help="another checkout to time as well")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--forward", action="store_true", help="time packed_label_logits (pack and forward)")
    parser.add_argument("--out", type=Path, help="default: bench/results/pack.json, or packed-forward.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: time the model saved in this folder
    args = parser.parse_args()
    if args.worker:
        sys.stdout.write(json.dumps(time_pack(args.worker, args.repeats, args.forward)))
        return
    out = args.out or RESULTS / ("packed-forward.json" if args.forward else "pack.json")
    from tests.conftest import save_tiny_model  # the parent alone builds the model, with this tree's tests

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_model("llama", Path(tmp) / "tiny-llama")
        trees = {"this tree": run_in(REPO, model_dir, args.repeats, args.forward)}
        trees |= {str(tree): run_in(tree.resolve(), model_dir, args.repeats, args.forward) for tree in args.tree}
    command = " ".join(["python -m bench.pack", *sys.argv[1:]])
    result = {"config": {"command": command, "repeats": args.repeats, "batches": list(BATCHES),
                         "timed": "packed_label_logits" if args.forward else "pack",
                         "model": "tiny random Llama, 3 layers, hidden 32, 4 heads / 2 KV heads, float32, CPU",
                         "torch_threads": torch.get_num_threads()},
              "trees": trees}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(markdown(result) + "\n")


if __name__ == "__main__":
    main()
