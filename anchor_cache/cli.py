"""`python -m anchor_cache`: evaluate methods on a dataset folder, or classify a few texts.

    python -m anchor_cache eval --preset sst2 --methods vanilla,hidden_anchor --limit 200 --out r.json
    python -m anchor_cache eval --data DIR --template 'Review: {text}\\nSentiment:' --labels Negative,Positive
    python -m anchor_cache reweight --preset sst2 --out beta/        # learn β (paper §3.1)
    python -m anchor_cache classify --preset sst2 --demos-from DIR/train.jsonl "a joyous film"
    python -m anchor_cache analyze saliency --preset trec --limit 100 --out runs/trec-saliency
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from anchor_cache.analysis import KINDS, AnalysisData, JobControl, parse_params, run_analysis
from anchor_cache.classifier import Classifier
from anchor_cache.data import read_jsonl, sample_rows, seed_demonstrations, training_draw
from anchor_cache.errors import AnchorServeError
from anchor_cache.evaluate import VARIANTS, EvalConfig, evaluate, markdown_table
from anchor_cache.models import DEFAULT_MODEL, load_model
from anchor_cache.reweighting import TrainConfig, train_reweighting
from anchor_cache.task import PRESETS, DemonstrationSource, Method, TaskSpec

log = logging.getLogger("anchor_cache")


def default_data_root() -> Path:
    """`ANCHORSERVE_DATA_DIR`, else the shared datasets folder beside the repository."""
    return Path(os.environ.get("ANCHORSERVE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _methods(text: str) -> list[str]:
    methods = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [m for m in methods if m not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown}; choose from {list(VARIANTS)}")
    return methods


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="paper template + label words (Table 4)")
    p.add_argument("--template", help="input template with {text}, e.g. 'Review: {text}\\nSentiment:'")
    p.add_argument("--labels", help="comma-separated label words in class order, e.g. Negative,Positive")
    p.add_argument("--shots-per-class", type=int, default=1, help="demonstrations per class (default 1)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="'default' (SmolLM2-135M-Instruct) or a local HF folder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=16)


def _add_reweight_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("re-weighting (paper defaults)")
    g.add_argument("--train-per-class", type=int, default=4, help="β training rows per class, disjoint from demos")
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--train-batch-size", type=int, default=1)


def _train_config(args: argparse.Namespace, method: Method = Method.HIDDEN_ANCHOR, seed: int = 42) -> TrainConfig:
    return TrainConfig(method=method, lr=args.lr, epochs=args.epochs, batch_size=args.train_batch_size, seed=seed)


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
        "--methods", type=_methods, default=["vanilla", "hidden_anchor"],
        help=f"comma-separated, from {','.join(VARIANTS)}",
    )
    ev.add_argument("--seeds", type=_ints, default=[42, 43, 44, 45, 46])
    ev.add_argument("--limit", type=int, default=1000, help="test examples sampled per seed")
    ev.add_argument("--top-draws", type=int, default=20, help="random draws hidden_random_top chooses from")
    ev.add_argument("--top-dev-size", type=int, default=100, help="train rows (not demos) it chooses on")
    ev.add_argument("--out", type=Path, help="write results JSON here")
    _add_reweight_args(ev)

    rw = sub.add_parser("reweight", help="learn anchor re-weighting β for a task (paper §3.1) and save it")
    rw.add_argument("--data", type=Path, help="folder with train.jsonl (and test.jsonl); default: shared data/<preset>")
    _add_task_args(rw)
    rw.add_argument("--method", type=Method, default=Method.HIDDEN_ANCHOR,
                    choices=[Method.HIDDEN_ANCHOR, Method.VANILLA])
    rw.add_argument("--seed", type=int, default=42, help="draws the demonstrations and the training rows")
    rw.add_argument("--limit", type=int, default=200, help="test rows to report accuracy before/after on (0: skip)")
    rw.add_argument("--out", type=Path, required=True, help="folder for beta.safetensors and reweighting.json")
    _add_reweight_args(rw)

    an = sub.add_parser("analyze", help="the paper's analyses: results.json and PNG plots in --out")
    an.add_argument("kind", choices=[k.replace("_", "-") for k in KINDS])
    an.add_argument("--data", type=Path, help="folder with test.jsonl (and train.jsonl to draw demonstrations from); "
                    "default: shared data/<preset>")
    _add_task_args(an)
    an.add_argument("--out", type=Path, required=True, help="folder for results.json and the plots")
    an.add_argument("--seeds", type=_ints, help="seeds to average over (default 42..46; error-diagnosis: --seed)")
    an.add_argument("--seed", type=int, help="error-diagnosis: the seed of its demonstration pool and test rows")
    an.add_argument("--limit", type=int, help="test rows per seed")
    an.add_argument("--max-tokens", type=int, help="skip longer prompts")
    an.add_argument("--sampling", choices=["per_example", "fixed"], help="saliency: demonstrations per example "
                    "(paper) or one set per seed")
    an.add_argument("--ks", type=_ints, help="isolation: isolated layer counts (default 1,3,5,7)")
    an.add_argument("--word-top-k", type=int, help="isolation: top-k tokens for word loyalty (default 5)")
    an.add_argument("--attention-maps", type=int, help="deep-layers: examples whose full attention maps to include")
    an.add_argument("--layer", type=int, help="error-diagnosis: layer (default 2/3 of the depth)")
    an.add_argument("--components", type=int, help="error-diagnosis: PCA components (default 10)")
    an.add_argument("--contexts", type=int, help="error-diagnosis: demonstrations per class (default 64)")
    an.add_argument("--params", type=json.loads, default={}, help="any other parameter as JSON, e.g. '{\"limit\": 50}'")

    cl = sub.add_parser("classify", help="classify texts with demonstrations drawn from a JSONL file")
    _add_task_args(cl)
    cl.add_argument("--demos-from", type=Path, help="JSONL of {text,label}; default: shared data/<preset>/train")
    cl.add_argument("--seed", type=int, default=42)
    cl.add_argument("--method", type=Method, default=Method.HIDDEN_ANCHOR, choices=list(Method))
    cl.add_argument("texts", nargs="+")
    return parser


def _data_dir(args: argparse.Namespace) -> Path:
    data = args.data or (default_data_root() / args.preset if args.preset else None)
    if data is None:
        raise SystemExit("error: --data is required without --preset")
    return data


def run_eval(args: argparse.Namespace) -> None:
    template, labels = _template_and_labels(args)
    data = _data_dir(args)
    lm = load_model(args.model, args.device, args.dtype)
    cfg = EvalConfig(
        data=data, template=template, labels=labels, methods=args.methods, shots_per_class=args.shots_per_class,
        seeds=args.seeds, limit=args.limit, batch_size=args.batch_size, top_draws=args.top_draws,
        top_dev_size=args.top_dev_size, train_per_class=args.train_per_class, reweight=_train_config(args),
    )
    results = evaluate(lm, cfg)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    sys.stdout.write(markdown_table(results) + "\n")


def run_reweight(args: argparse.Namespace) -> None:
    template, labels = _template_and_labels(args)
    data = _data_dir(args)
    train = read_jsonl(data / "train.jsonl", labels)
    demos, used = seed_demonstrations(train, labels, args.shots_per_class, args.seed)
    rows = training_draw(train, used, len(labels), args.train_per_class, args.seed)
    task = TaskSpec(name="reweight", template=template, labels=labels, demonstrations=demos, method=args.method)
    clf = Classifier(load_model(args.model, args.device, args.dtype), task, seed=args.seed)
    result = train_reweighting(clf, [r.text for r in rows], [r.label for r in rows],
                               _train_config(args, args.method, args.seed))
    report = {"seconds": result.seconds, "epoch_losses": result.epoch_losses, "step_losses": result.step_losses,
              "train_rows": len(rows), "method": str(args.method), "demonstrations": [d.model_dump() for d in demos]}
    if args.limit:
        test = sample_rows(read_jsonl(data / "test.jsonl", labels), args.limit, args.seed)
        gold = torch.tensor([r.label for r in test])
        texts = [r.text for r in test]
        for name, beta in (("accuracy_before", None), ("accuracy_after", result.beta)):
            preds = clf.label_logits(texts, args.method, args.batch_size, beta).argmax(-1).cpu()
            report[name] = 100 * float((preds == gold).float().mean())
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({"beta": result.beta.cpu().contiguous()}, str(args.out / "beta.safetensors"))
    (args.out / "reweighting.json").write_text(json.dumps(report, indent=1))
    summary = {k: report[k] for k in ("seconds", "accuracy_before", "accuracy_after") if k in report}
    sys.stdout.write(json.dumps(summary | {"final_loss": result.epoch_losses[-1]}) + "\n")


ANALYSIS_FLAGS = ("seeds", "seed", "limit", "max_tokens", "sampling", "ks", "word_top_k", "attention_maps", "layer",
                  "components", "contexts")


def run_analyze(args: argparse.Namespace) -> None:
    kind = args.kind.replace("-", "_")
    template, labels = _template_and_labels(args)
    data_dir = _data_dir(args)
    params = args.params | {"batch_size": args.batch_size} | {
        flag: getattr(args, flag) for flag in ANALYSIS_FLAGS if getattr(args, flag) is not None
    }
    if kind != "error_diagnosis":
        params.setdefault("shots_per_class", args.shots_per_class)
    parsed = parse_params(kind, params)  # bad flags fail before the model loads
    train_path = data_dir / "train.jsonl"
    demos = DemonstrationSource(path=train_path, shots_per_class=args.shots_per_class)
    data = AnalysisData(
        task=TaskSpec(name=data_dir.name, template=template, labels=labels, demonstrations=demos),
        test=read_jsonl(data_dir / "test.jsonl", labels),
        train=read_jsonl(train_path, labels),
    )
    lm = load_model(args.model, args.device, args.dtype)
    with tqdm(desc=args.kind, unit="step") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        parsed.check(lm.model.config.num_hidden_layers)
        output = run_analysis(lm, kind, data, parsed, JobControl(on_progress=progress))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(output.results, indent=1, allow_nan=False))
    for name, png in output.plots.items():
        (args.out / f"{name}.png").write_bytes(png)
    sys.stdout.write(f"{kind}: {output.results['seconds']:.1f}s, wrote {args.out / 'results.json'} and "
                     f"{', '.join(f'{n}.png' for n in output.plots)}\n")


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
        commands = {"eval": run_eval, "reweight": run_reweight, "classify": run_classify, "analyze": run_analyze}
        commands[args.command](args)
    except AnchorServeError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    return 0
