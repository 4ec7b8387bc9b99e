"""`python -m anchor_cache`: evaluate methods on a dataset folder, or classify a few texts.

    python -m anchor_cache eval --preset sst2 --methods vanilla,hidden_anchor --limit 200 --out r.json
    python -m anchor_cache eval --data DIR --template 'Review: {text}\\nSentiment:' --labels Negative,Positive
    python -m anchor_cache classify --preset sst2 --demos-from DIR/train.jsonl "a joyous film"
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from anchor_cache.classifier import Classifier
from anchor_cache.errors import AnchorServeError
from anchor_cache.evaluate import EvalConfig, evaluate, markdown_table
from anchor_cache.models import DEFAULT_MODEL, load_model
from anchor_cache.task import PRESETS, DemonstrationSource, Method, TaskSpec

log = logging.getLogger("anchor_cache")


def default_data_root() -> Path:
    """`ANCHORSERVE_DATA_DIR`, else the shared datasets folder beside the repository."""
    return Path(os.environ.get("ANCHORSERVE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _methods(text: str) -> list[Method]:
    try:
        return [Method(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; choose from {[m.value for m in Method]}") from exc


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="paper template + label words (Table 4)")
    p.add_argument("--template", help="input template with {text}, e.g. 'Review: {text}\\nSentiment:'")
    p.add_argument("--labels", help="comma-separated label words in class order, e.g. Negative,Positive")
    p.add_argument("--shots-per-class", type=int, default=1, help="demonstrations per class (default 1)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="'default' (SmolLM2-135M-Instruct) or a local HF folder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=16)


def _template_and_labels(args: argparse.Namespace) -> tuple[str, list[str]]:
    template, labels = PRESETS[args.preset] if args.preset else (None, None)
    template = args.template.replace("\\n", "\n") if args.template else template
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else labels
    if template is None or labels is None:
        raise SystemExit("error: give --preset, or both --template and --labels")
    return template, labels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m anchor_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="accuracy and loyalty of ICL methods on a dataset folder (paper Table 2)")
    ev.add_argument("--data", type=Path, help="folder with train.jsonl and test.jsonl; default: shared data/<preset>")
    _add_task_args(ev)
    ev.add_argument(
        "--methods", type=_methods, default=[Method.VANILLA, Method.HIDDEN_ANCHOR],
        help=f"comma-separated, from {','.join(m.value for m in Method)}",
    )
    ev.add_argument("--seeds", type=_ints, default=[42, 43, 44, 45, 46])
    ev.add_argument("--limit", type=int, default=1000, help="test examples sampled per seed")
    ev.add_argument("--top-draws", type=int, default=20, help="random draws hidden_random_top chooses from")
    ev.add_argument("--top-dev-size", type=int, default=100, help="train rows (not demos) it chooses on")
    ev.add_argument("--out", type=Path, help="write results JSON here")

    cl = sub.add_parser("classify", help="classify texts with demonstrations drawn from a JSONL file")
    _add_task_args(cl)
    cl.add_argument("--demos-from", type=Path, help="JSONL of {text,label}; default: shared data/<preset>/train")
    cl.add_argument("--seed", type=int, default=42)
    cl.add_argument("--method", type=Method, default=Method.HIDDEN_ANCHOR, choices=list(Method))
    cl.add_argument("texts", nargs="+")
    return parser


def run_eval(args: argparse.Namespace) -> None:
    template, labels = _template_and_labels(args)
    data = args.data or (default_data_root() / args.preset if args.preset else None)
    if data is None:
        raise SystemExit("error: --data is required without --preset")
    lm = load_model(args.model, args.device, args.dtype)
    cfg = EvalConfig(
        data=data, template=template, labels=labels, methods=args.methods, shots_per_class=args.shots_per_class,
        seeds=args.seeds, limit=args.limit, batch_size=args.batch_size, top_draws=args.top_draws,
        top_dev_size=args.top_dev_size,
    )
    results = evaluate(lm, cfg)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    sys.stdout.write(markdown_table(results) + "\n")


def run_classify(args: argparse.Namespace) -> None:
    template, labels = _template_and_labels(args)
    source = args.demos_from or (default_data_root() / args.preset / "train.jsonl" if args.preset else None)
    if source is None:
        raise SystemExit("error: --demos-from is required without --preset")
    demos = DemonstrationSource(path=source, shots_per_class=args.shots_per_class, seed=args.seed)
    task = TaskSpec(name="cli", template=template, labels=labels, demonstrations=demos)
    clf = Classifier(load_model(args.model, args.device, args.dtype), task, seed=args.seed)
    for text, pred in zip(args.texts, clf.classify(args.texts, args.method, args.batch_size), strict=True):
        sys.stdout.write(json.dumps({"text": text, "label": pred.label, "probs": pred.probs}) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        {"eval": run_eval, "classify": run_classify}[args.command](args)
    except AnchorServeError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    return 0
