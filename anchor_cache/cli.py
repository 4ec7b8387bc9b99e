"""The engine on the command line: `anchorserve eval|classify|reweight|analyze` (also `python -m anchor_cache`).

    anchorserve classify --preset sst2 --shots-per-class 2 "a joyous film"        # demos from <data>/train.jsonl
    anchorserve classify --preset sst2 --beta beta/ "a joyous film"               # with a β saved by reweight
    anchorserve eval --preset sst2 --methods vanilla,hidden_anchor --limit 200 --out r.json   # also r.png
    anchorserve eval --data DIR --template 'Review: {text}\\nSentiment:' --labels Negative,Positive
    anchorserve reweight --preset sst2 --out beta/        # learn β (paper §3.1); beta/loss.png
    anchorserve analyze saliency --preset trec --limit 100 --out runs/trec-saliency

Every command reads a dataset folder (`--data DIR`: train.jsonl and test.jsonl of {"text","label"});
with `--preset NAME` it defaults to `$ANCHORSERVE_DATA_DIR/NAME`. Arguments, the task and the data
are checked before the model loads, and a mistake is one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError as PydanticValidationError

from anchor_cache.arguments import DATA_DIR_ENV, one_line
from anchor_cache.errors import AnchorServeError
from anchor_cache.names import ANALYSES, DEFAULT_MODEL, PRIORS, VARIANT_NAMES
from anchor_cache.task import PRESETS, Method

log = logging.getLogger("anchor_cache")

PROG = "python -m anchor_cache"
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


# --- errors: one line each --------------------------------------------------------------------------


class CommandLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`prog: error: message (see prog --help)`), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- argument types ---------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _names_from(allowed: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    """A parser of comma-separated names, each one of `allowed`."""
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown or [text]}; choose from {','.join(allowed)}")
        return names

    return parse


_methods = _names_from(VARIANT_NAMES, "methods")
_priors = _names_from(PRIORS, "priors")


def _device(text: str) -> str:
    """auto | cpu | cuda | cuda:N, and CUDA only where there is one (the engine's `resolve_device`)."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")
    if text == "cpu":
        return text
    from anchor_cache.models import resolve_device  # torch: only for a device that needs it checked

    try:
        resolve_device(text)
    except AnchorServeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


# --- arguments ----------------------------------------------------------------------------------------


def _command(name: str) -> Callable[[argparse.Namespace], None]:
    """A command that imports the engine (torch, the models) only when it runs: `--help` and a
    mistyped argument answer at once."""

    def run(args: argparse.Namespace) -> None:
        from anchor_cache import commands

        getattr(commands, name)(args)

    return run


def _add_data_arg(p: argparse.ArgumentParser, needs: str) -> None:
    p.add_argument("--data", type=Path, metavar="DIR",
                   help=f"dataset folder with {needs} (JSONL rows of {{\"text\", \"label\"}}); with --preset the "
                        f"default is ${DATA_DIR_ENV}/<preset>, else ../shared/data/<preset> beside a source checkout")


def _add_task_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task and model")
    g.add_argument("--preset", choices=sorted(PRESETS), help="the paper's template and label words (Table 4)")
    g.add_argument("--template", help="input template with one {text}, e.g. 'Review: {text}\\nSentiment:' "
                   "(\\n is a newline); overrides the preset's")
    g.add_argument("--labels", help="comma-separated label words in class order, e.g. Negative,Positive; "
                   "overrides the preset's")
    g.add_argument("--shots-per-class", type=int, default=1, help="demonstrations per class (default 1)")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="'default' (SmolLM2-135M-Instruct) or a local Hugging Face model folder (never downloaded)")
    g.add_argument("--device", type=_device, default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="default auto: bfloat16 on CUDA and on CPUs with fast bf16, else float32")
    g.add_argument("--batch-size", type=int, default=16, help="texts per forward (default 16)")


def _add_reweight_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("re-weighting (paper defaults)")
    g.add_argument("--train-per-class", type=int, default=4, help="β training rows per class, disjoint from demos")
    g.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    g.add_argument("--epochs", type=int, default=10, help="default 10")
    g.add_argument("--train-batch-size", type=int, default=1, help="default 1")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """eval, classify, reweight and analyze, each with `run` set to its function (for `run_command`)."""
    cl = sub.add_parser(
        "classify", help="classify texts with demonstrations drawn from a dataset",
        description="Classify texts in context: demonstrations are drawn (seeded) from the dataset's "
                    "train.jsonl. Prints one JSON line per text: {text, label, probs}.",
        epilog="example: anchorserve classify --preset sst2 --shots-per-class 2 \"a joyous film\" \"a dull mess\"",
    )
    cl.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify")
    cl.add_argument("--data", type=Path, metavar="DIR|FILE",
                    help="dataset folder with train.jsonl, or a JSONL file of {\"text\", \"label\"} rows, to draw "
                         f"demonstrations from; with --preset the default is ${DATA_DIR_ENV}/<preset>")
    _add_task_args(cl)
    cl.add_argument("--seed", type=int, default=42, help="draws the demonstrations (default 42)")
    cl.add_argument("--method", type=Method, default=Method.HIDDEN_ANCHOR, choices=list(Method),
                    help="how the demonstrations reach the query (default hidden_anchor)")
    cl.add_argument("--beta", type=Path, metavar="PATH",
                    help="apply a β learned by `reweight --out PATH` (the folder or its beta.safetensors)")
    cl.set_defaults(run=_command("run_classify"))

    ev = sub.add_parser(
        "eval", help="accuracy and loyalty of ICL methods on a dataset (paper Table 2)",
        description="Accuracy, label loyalty and word loyalty of each method against vanilla ICL, averaged over "
                    "seeds (paper Table 2). Prints a markdown table; --out also writes a PNG beside the JSON.",
        epilog="example: anchorserve eval --preset sst2 --methods vanilla,hidden_anchor --limit 200 --out r.json",
    )
    _add_data_arg(ev, "train.jsonl and test.jsonl")
    _add_task_args(ev)
    ev.add_argument("--methods", type=_methods, default=["vanilla", "hidden_anchor"],
                    help=f"comma-separated, from {','.join(VARIANT_NAMES)} (default vanilla,hidden_anchor)")
    ev.add_argument("--seeds", type=_ints, default=[42, 43, 44, 45, 46], help="default 42,43,44,45,46")
    ev.add_argument("--limit", type=int, default=1000, help="test examples sampled per seed (default 1000)")
    ev.add_argument("--top-draws", type=int, default=20, help="random draws hidden_random_top chooses from")
    ev.add_argument("--top-dev-size", type=int, default=100, help="train rows (not demos) it chooses on")
    ev.add_argument("--pool-per-class", type=int, default=16,
                    help="labelled train rows per class (disjoint from demos and test) that linear_head and knn "
                         "are fitted on, per seed (default 16)")
    ev.add_argument("--priors", type=_priors, default=["pool"],
                    help="class priors every method is also scored under, from pool,uniform,adapt (adapt: the "
                         "test rows' class frequencies estimated by EM as they arrive; default pool)")
    ev.add_argument("--out", type=Path, metavar="FILE.json",
                    help="write results JSON here, and the accuracy/loyalty plot beside it (FILE.png)")
    _add_reweight_args(ev)
    ev.set_defaults(run=_command("run_eval"))

    rw = sub.add_parser(
        "reweight", help="learn anchor re-weighting β for a task (paper §3.1) and save it",
        description="Learn β on a few labelled train rows (disjoint from the demonstrations) with the model "
                    "frozen; report test accuracy before and after. Writes beta.safetensors, reweighting.json "
                    "and loss.png into --out; `classify --beta` reads the β back.",
        epilog="example: anchorserve reweight --preset sst2 --out beta/",
    )
    _add_data_arg(rw, "train.jsonl (and test.jsonl unless --limit 0)")
    _add_task_args(rw)
    rw.add_argument("--method", type=Method, default=Method.HIDDEN_ANCHOR,
                    choices=[Method.HIDDEN_ANCHOR, Method.VANILLA], help="default hidden_anchor")
    rw.add_argument("--seed", type=int, default=42, help="draws the demonstrations and the training rows")
    rw.add_argument("--limit", type=int, default=200, help="test rows to report accuracy before/after on (0: skip)")
    rw.add_argument("--out", type=Path, required=True, metavar="DIR",
                    help="folder for beta.safetensors, reweighting.json and loss.png")
    _add_reweight_args(rw)
    rw.set_defaults(run=_command("run_reweight"))

    an = sub.add_parser(
        "analyze", help="the paper's analyses: results.json and PNG plots in --out",
        description="saliency (§2.1), isolation (§2.2), deep-layers (§2.3) or error-diagnosis (§3.3) on a "
                    "dataset; writes results.json and the plots into --out.",
        epilog="example: anchorserve analyze saliency --preset trec --limit 100 --out runs/trec-saliency",
    )
    an.add_argument("kind", type=lambda k: k.replace("_", "-"), choices=[k.replace("_", "-") for k in ANALYSES],
                    help="which analysis (deep-layers or deep_layers, as the API spells it)")
    _add_data_arg(an, "test.jsonl and train.jsonl (demonstrations are drawn from it)")
    _add_task_args(an)
    an.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for results.json and the plots")
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
    an.add_argument("--params", type=_json_object, default={},
                    help="any other parameter as JSON, e.g. '{\"limit\": 50}'")
    an.set_defaults(run=_command("run_analyze"))


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = CommandLineParser(prog=prog, description=__doc__.split("\n\n")[0],
                               epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


# --- entry points ------------------------------------------------------------------------------------


def quiet_progress_bars() -> None:
    """No "Loading weights: …it/s" bar from transformers on the command line (our own bars stay)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def run_command(args: argparse.Namespace, prog: str) -> int:
    """Run a parsed engine command; a user mistake becomes one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    quiet_progress_bars()
    try:
        args.run(args)
    except (AnchorServeError, PydanticValidationError) as exc:
        sys.stderr.write(f"{prog}: error: {one_line(exc)}\n")
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv), PROG)
