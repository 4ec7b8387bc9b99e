"""Files admin requests may name: only under `data_root`, never outside it (no `..`, no symlink
escape), and none at all when `data_root` is unset. Messages name paths as the client gave them."""

from __future__ import annotations

from pathlib import Path

from anchor_cache.data import load_demonstrations
from anchor_cache.errors import ValidationError
from anchor_cache.task import Demonstration, DemonstrationSource, TaskSpec, preview
from server.settings import Settings


def data_path(settings: Settings, relative: str | Path) -> Path:
    """A file or folder under data_root; anything resolving outside it (../, symlinks) is refused."""
    if settings.data_root is None:
        raise ValidationError("reading files is disabled: start the server with ANCHORSERVE_DATA_ROOT set")
    root = settings.data_root.resolve()
    shown = preview(str(relative))
    try:
        path = (root / relative).resolve()
        exists = path.exists()
    except (OSError, ValueError, RuntimeError) as exc:  # too long, NUL, a symlink loop
        raise ValidationError(f"{shown} is not a usable path ({type(exc).__name__})") from None
    if not path.is_relative_to(root):
        raise ValidationError(f"{shown} is outside the data root")
    if not exists:
        raise ValidationError(f"{shown} does not exist under the data root")
    return path


def dataset_file(settings: Settings, relative: str, split: str) -> Path:
    """`relative` names a .jsonl file, or a dataset folder whose `<split>.jsonl` is meant."""
    path = data_path(settings, relative)
    return path / f"{split}.jsonl" if path.is_dir() else path


def inline_rows(settings: Settings, spec: TaskSpec) -> TaskSpec:
    """A spec sent by a client with demonstrations or an examples pool drawn from a file: the file is
    resolved under data_root and its draw written into the spec, so the stored spec needs no file."""
    update: dict[str, list[Demonstration]] = {}
    for field in ("demonstrations", "examples"):
        source = getattr(spec, field)
        if isinstance(source, DemonstrationSource):
            resolved = source.model_copy(update={"path": dataset_file(settings, str(source.path), "train")})
            update[field] = load_demonstrations(resolved, spec.labels)
    return spec.model_copy(update=update) if update else spec
