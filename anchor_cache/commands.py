"""The engine commands behind `anchorserve eval|classify|reweight|analyze` (anchor_cache/cli.py parses
them, and imports this module, with torch and the models, only when one runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from anchor_cache.analysis import AnalysisData, JobControl, parse_params, run_analysis
from anchor_cache.analysis.plots import new_figure, to_png
from anchor_cache.arguments import data_dir, task_from_args
from anchor_cache.classifier import Classifier
from anchor_cache.data import load_demonstrations, read_jsonl, sample_rows, seed_demonstrations, training_draw
from anchor_cache.errors import ValidationError
from anchor_cache.evaluate import EvalConfig, evaluate, markdown_table
from anchor_cache.models import (
    DEFAULT_MODEL,
    LoadedModel,
    default_gguf_path,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
)
from anchor_cache.reweighting import TrainConfig, TrainResult, load_beta, train_reweighting
from anchor_cache.task import DemonstrationSource, Method


def check_model(model: str, device: str, dtype: str) -> None:
    """Cheap checks of the model setting, device and dtype (the load itself comes later)."""
    if model == DEFAULT_MODEL:
        default_gguf_path()
    else:
        resolve_model_dir(model)
    resolve_dtype(dtype, resolve_device(device))


def _load(args: argparse.Namespace) -> LoadedModel:
    return load_model(args.model, args.device, args.dtype)


def _train_config(args: argparse.Namespace, method: Method = Method.HIDDEN_ANCHOR, seed: int = 42) -> TrainConfig:
    return TrainConfig(method=method, lr=args.lr, epochs=args.epochs, batch_size=args.train_batch_size, seed=seed)


def _sig(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


# --- pictures ------------------------------------------------------------------------------------------

EVAL_METRICS = {"accuracy": "accuracy", "label_loyalty": "label loyalty", "word_loyalty": "word loyalty"}


def eval_plot(results: dict[str, Any]) -> bytes:
    """Accuracy and loyalty per method: bars of the mean over seeds, error bars ±1 std across seeds."""
    methods = results["methods"]
    names = list(methods)
    n_seeds = max(len(m["per_seed"]) for m in methods.values())
    fig, axes = new_figure(max(6.4, 1.1 * len(names) + 2.5), 4.4)
    ax = axes[0, 0]
    x = np.arange(len(names))
    width = 0.8 / len(EVAL_METRICS)
    for i, (key, label) in enumerate(EVAL_METRICS.items()):
        means = [methods[m][key] for m in names]
        spread = [np.std([s[key] for s in methods[m]["per_seed"]], ddof=1) if len(methods[m]["per_seed"]) > 1
                  else 0.0 for m in names]
        ax.bar(x + (i - (len(EVAL_METRICS) - 1) / 2) * width, means, width, label=label,
               yerr=spread if n_seeds > 1 else None, capsize=3)
    ax.set_xticks(x, names, rotation=25, ha="right")
    spread_note = f"mean over {n_seeds} seeds ± std" if n_seeds > 1 else "1 seed"
    config = results.get("config", {})
    ax.set(ylabel="%", ylim=(0, 105), title=f"{config.get('model', '')} on {Path(str(config.get('data', ''))).name}"
           f" ({spread_note})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return to_png(fig)


def loss_plot(result: TrainResult, title: str) -> bytes:
    """β training: the loss of every step (faint) and each epoch's mean (and dev loss, when there is one)."""
    fig, axes = new_figure(6.4, 4)
    ax = axes[0, 0]
    steps = result.step_losses
    ax.plot(range(1, len(steps) + 1), steps, color="tab:blue", alpha=0.3, linewidth=1, label="step")
    if result.epoch_losses:
        per_epoch = len(steps) / len(result.epoch_losses)
        ends = [per_epoch * (e + 1) for e in range(len(result.epoch_losses))]
        ax.plot(ends, result.epoch_losses, marker="o", color="tab:blue", label="epoch mean")
        if result.dev_losses:
            ax.plot(ends[: len(result.dev_losses)], result.dev_losses, marker="s", color="tab:orange", label="dev")
    ax.set(xlabel="training step", ylabel="cross-entropy", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return to_png(fig)


# --- commands ------------------------------------------------------------------------------------------


def run_eval(args: argparse.Namespace) -> None:
    data = data_dir(args.data, args.preset, ("train.jsonl", "test.jsonl"))
    task = task_from_args(args, DemonstrationSource(path=data / "train.jsonl", shots_per_class=args.shots_per_class))
    for name in ("train.jsonl", "test.jsonl"):
        read_jsonl(data / name, task.labels)  # bad rows fail before the model loads
    check_model(args.model, args.device, args.dtype)
    cfg = EvalConfig(
        data=data, template=task.template, labels=task.labels, methods=args.methods,
        shots_per_class=args.shots_per_class, seeds=args.seeds, limit=args.limit, batch_size=args.batch_size,
        top_draws=args.top_draws, top_dev_size=args.top_dev_size, train_per_class=args.train_per_class,
        pool_per_class=args.pool_per_class, reweight=_train_config(args), priors=args.priors,
    )
    results = evaluate(_load(args), cfg)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        args.out.with_suffix(".png").write_bytes(eval_plot(results))
    sys.stdout.write(markdown_table(results) + "\n")


def run_reweight(args: argparse.Namespace) -> None:
    needs = ("train.jsonl", "test.jsonl") if args.limit else ("train.jsonl",)
    data = data_dir(args.data, args.preset, needs)
    labels = task_from_args(args, DemonstrationSource(path=data / "train.jsonl")).labels  # checked before reading rows
    train = read_jsonl(data / "train.jsonl", labels)
    test = sample_rows(read_jsonl(data / "test.jsonl", labels), args.limit, args.seed) if args.limit else []
    demos, used = seed_demonstrations(train, labels, args.shots_per_class, args.seed)
    rows = training_draw(train, used, len(labels), args.train_per_class, args.seed)
    task = task_from_args(args, demos, args.method)
    check_model(args.model, args.device, args.dtype)

    clf = Classifier(_load(args), task, seed=args.seed)
    result = train_reweighting(clf, [r.text for r in rows], [r.label for r in rows],
                               _train_config(args, args.method, args.seed))
    report = {"seconds": result.seconds, "epoch_losses": result.epoch_losses, "step_losses": result.step_losses,
              "train_rows": len(rows), "method": str(args.method), "demonstrations": [d.model_dump() for d in demos]}
    if test:
        gold = torch.tensor([r.label for r in test])
        texts = [r.text for r in test]
        for name, beta in (("accuracy_before", None), ("accuracy_after", result.beta)):
            preds = clf.label_logits(texts, args.method, args.batch_size, beta).argmax(-1).cpu()
            report[name] = 100 * float((preds == gold).float().mean())
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({"beta": result.beta.cpu().contiguous()}, str(args.out / "beta.safetensors"))
    (args.out / "reweighting.json").write_text(json.dumps(report, indent=1))
    (args.out / "loss.png").write_bytes(loss_plot(result, f"β training: {clf.lm.name}, {args.method}, "
                                                          f"{len(rows)} rows"))
    summary = {k: report[k] for k in ("seconds", "accuracy_before", "accuracy_after") if k in report}
    summary |= {"final_loss": result.epoch_losses[-1]} if result.epoch_losses else {}
    sys.stdout.write(json.dumps({k: _sig(v) for k, v in summary.items()}) + "\n")


ANALYSIS_FLAGS = ("seeds", "seed", "limit", "max_tokens", "sampling", "ks", "word_top_k", "attention_maps", "layer",
                  "components", "contexts")


def run_analyze(args: argparse.Namespace) -> None:
    kind = args.kind.replace("-", "_")
    data_folder = data_dir(args.data, args.preset, ("test.jsonl", "train.jsonl"))
    params = args.params | {"batch_size": args.batch_size} | {
        flag: getattr(args, flag) for flag in ANALYSIS_FLAGS if getattr(args, flag) is not None
    }
    if kind != "error_diagnosis":
        params.setdefault("shots_per_class", args.shots_per_class)
    parsed = parse_params(kind, params)  # bad flags fail before the model loads
    train_path = data_folder / "train.jsonl"
    task = task_from_args(args, DemonstrationSource(path=train_path, shots_per_class=args.shots_per_class))
    data = AnalysisData(
        task=task.model_copy(update={"name": data_folder.name}),
        test=read_jsonl(data_folder / "test.jsonl", task.labels),
        train=read_jsonl(train_path, task.labels),
    )
    check_model(args.model, args.device, args.dtype)
    lm = _load(args)
    parsed.check(lm.model.config.num_hidden_layers)  # layer numbers need the model's depth
    with tqdm(desc=args.kind, unit="step") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        output = run_analysis(lm, kind, data, parsed, JobControl(on_progress=progress))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(output.results, indent=1, allow_nan=False))
    for name, png in output.plots.items():
        (args.out / f"{name}.png").write_bytes(png)
    for warning in output.results.get("warnings", []):
        sys.stderr.write(f"warning: {warning}\n")
    sys.stdout.write(f"{kind}: {output.results['seconds']:.1f}s, wrote {args.out / 'results.json'} and "
                     f"{', '.join(f'{n}.png' for n in output.plots)}\n")


def _demonstration_file(args: argparse.Namespace) -> Path:
    """classify's --data: a JSONL file, or a dataset folder's train.jsonl."""
    if args.data is not None and args.data.is_file():
        return args.data
    if args.data is not None and not args.data.exists():
        raise ValidationError(f"--data {args.data}: no such file or folder")
    return data_dir(args.data, args.preset, ("train.jsonl",)) / "train.jsonl"


def run_classify(args: argparse.Namespace) -> None:
    source = DemonstrationSource(path=_demonstration_file(args), shots_per_class=args.shots_per_class,
                                 seed=args.seed)
    task = task_from_args(args, source, args.method)
    demos = load_demonstrations(source, task.labels)
    beta = None
    if args.beta is not None:
        if not args.beta.exists():
            raise ValidationError(f"--beta {args.beta}: no such file or folder (give what `reweight --out` wrote)")
        beta = load_beta(args.beta)
    check_model(args.model, args.device, args.dtype)
    clf = Classifier(_load(args), task, demonstrations=demos, seed=args.seed, beta=beta)
    for text, pred in zip(args.texts, clf.classify(args.texts, args.method, args.batch_size), strict=True):
        sys.stdout.write(json.dumps({"text": text, "label": pred.label, "probs": pred.probs}) + "\n")
