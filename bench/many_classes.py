"""β for a 14-class task with 16 pool rows per class, at 16 examples a step: the time.

    OMP_NUM_THREADS=1 taskset -c 1 python -m bench.many_classes     # prints one JSON line

No 14-class set is in ../shared/data, so AG News texts stand under 14 made-up label words: only the
time means something, not the accuracy.
"""

from __future__ import annotations

import json
import sys
import time

from anchor_cache.arguments import default_data_root
from anchor_cache.classifier import Classifier
from anchor_cache.data import read_jsonl
from anchor_cache.models import load_model
from anchor_cache.reweighting import learn_pool_beta
from anchor_cache.task import PRESETS, Demonstration, TaskSpec

LABELS = ["Company", "School", "Artist", "Athlete", "Politician", "Transport", "Building", "Nature", "Village",
          "Animal", "Plant", "Album", "Film", "Book"]
PER_CLASS = 16


def main() -> None:
    rows = read_jsonl(default_data_root() / "agnews" / "train.jsonl", PRESETS["agnews"][1])
    texts = [r.text for r in rows[: len(LABELS) * (PER_CLASS + 1)]]
    demos = [Demonstration(text=texts[i], label=label) for i, label in enumerate(LABELS)]
    pool = [Demonstration(text=texts[len(LABELS) + i], label=LABELS[i % len(LABELS)])
            for i in range(len(LABELS) * PER_CLASS)]
    spec = TaskSpec(name="many", template="Article: {text}\nAnswer:", labels=LABELS, demonstrations=demos,
                    examples=pool)
    clf = Classifier(load_model("default", "cpu", "auto"), spec)
    start = time.perf_counter()
    _, info = learn_pool_beta(clf)
    sys.stdout.write(json.dumps({"classes": len(LABELS), "pool_rows": info["train_examples"],
                                 "seconds": round(time.perf_counter() - start, 1), "batch_size": info["batch_size"],
                                 "lr": info["lr"]}) + "\n")


if __name__ == "__main__":
    main()
