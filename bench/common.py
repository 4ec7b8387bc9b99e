"""What the benchmark scripts share: dataset names, the results folder, common arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

from anchor_cache.cli import default_data_root

DATASETS = ["sst2", "trec", "agnews", "emoc"]
RESULTS = Path(__file__).parent / "results"


def dataset_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--datasets", type=lambda s: s.split(","), default=DATASETS)
    parser.add_argument("--data-root", type=Path, default=default_data_root(), help="folder of dataset folders")
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="auto")
    return parser
