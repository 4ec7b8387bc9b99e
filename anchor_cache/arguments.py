"""Command-line arguments checked before the model loads: the dataset folder, the task the flags
describe, and errors as one line naming the flag."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from pydantic import ValidationError as PydanticValidationError

from anchor_cache.errors import ValidationError
from anchor_cache.task import PRESETS, Demonstration, DemonstrationSource, Method, TaskSpec

DATA_DIR_ENV = "ANCHORSERVE_DATA_DIR"
TASK_FLAGS = {"template": "--template", "labels": "--labels"}  # TaskSpec fields the flags fill in


def one_line(exc: BaseException, names: dict[str, str] | None = None) -> str:
    """An engine or pydantic error as one line; `names` renames pydantic field locations (to flags)."""
    if isinstance(exc, PydanticValidationError):
        parts = []
        for error in exc.errors():
            loc = [str(x) for x in error["loc"]]
            if loc and names and loc[0] in names:
                loc[0] = names[loc[0]]
            message = error["msg"].removeprefix("Value error, ")
            parts.append(f"{'.'.join(loc)}: {message}" if loc else message)
        text = "; ".join(parts)
    else:
        text = str(exc) or type(exc).__name__
    return re.sub(r"\s*\n\s*", " ", text).strip()


def default_data_root() -> Path:
    """Where `--preset NAME` looks for its folder NAME: `ANCHORSERVE_DATA_DIR` when set, else the
    shared datasets folder beside a source checkout (`../shared/data`). For an installed package
    the latter points nowhere useful; `data_dir` then says to set one of the two."""
    root = os.environ.get(DATA_DIR_ENV)
    return Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "data"


def data_dir(data: Path | None, preset: str | None, needs: tuple[str, ...]) -> Path:
    """The dataset folder (`--data`, else the preset's under the data root), holding `needs`."""
    if data is None:
        if preset is None:
            raise ValidationError(f"give --data DIR (a folder with {' and '.join(needs)}); only --preset "
                                  f"has a default, under {DATA_DIR_ENV}")
        data = default_data_root() / preset
        if not data.is_dir():
            raise ValidationError(f"no data folder for --preset {preset}: {data} does not exist; give --data DIR, "
                                  f"or set {DATA_DIR_ENV} to the folder that holds {preset}/")
    elif not data.is_dir():
        raise ValidationError(f"--data {data}: no such folder")
    missing = [name for name in needs if not (data / name).is_file()]
    if missing:
        raise ValidationError(f"data folder {data} has no {' or '.join(missing)} (--data must hold "
                              f"{' and '.join(needs)})")
    return data


def template_and_labels(args: argparse.Namespace) -> tuple[str, list[str]]:
    template, labels = PRESETS[args.preset] if args.preset else (None, None)
    template = args.template.replace("\\n", "\n") if args.template is not None else template
    labels = [x.strip() for x in args.labels.split(",")] if args.labels is not None else labels
    if template is None or labels is None:
        raise ValidationError("give --preset, or both --template and --labels")
    return template, labels


def task_from_args(args: argparse.Namespace, demonstrations: list[Demonstration] | DemonstrationSource,
          method: Method = Method.HIDDEN_ANCHOR) -> TaskSpec:
    """The engine's own task validation (template slot, distinct labels, …), errors named by flag."""
    template, labels = template_and_labels(args)
    try:
        return TaskSpec(name="cli", template=template, labels=labels, demonstrations=demonstrations, method=method)
    except PydanticValidationError as exc:
        raise ValidationError(one_line(exc, TASK_FLAGS)) from None
