"""Persisted artefacts under the state dir: anchor caches and learned β, one self-checking file each.

`caches/<key>.safetensors` holds a cache's per-layer K/V, `caches/<key>.beta.safetensors` the β
learned for that task variant. The key is a content hash of everything the cached K/V depend on:
model identity (config, weight samples, dtype), tokenizer, template, separator, label words,
demonstrations, method and seed. Each file's safetensors metadata carries a JSON manifest and a
sha256 over that manifest and every tensor's name, dtype, shape and bytes; loading recomputes it,
so bit rot, truncation, appended bytes or a damaged header raise CacheMismatchError instead of
being served. Loading also recomputes the key from the manifest and checks it against the current
model, so a cache is never served by a model, tokenizer or task it was not built from.

Every write goes to a temporary name, is fsynced, renamed over the target and the directory fsynced,
so a crash leaves the previous or the new version, never a mix. Every successful load touches the
file (mtime): garbage collection reads a recent mtime as "in use, maybe by another replica".
Error messages name files relative to the state dir (`caches/<key>.safetensors`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from anchor_cache.cache import AnchorCache
from anchor_cache.errors import CacheMismatchError
from anchor_cache.models import LoadedModel
from anchor_cache.prompt import TaskPrompt
from anchor_cache.task import Method

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the cached content (part of the key), not of the file layout


def cache_identity(lm: LoadedModel, prompt: TaskPrompt, method: Method, seed: int) -> dict[str, Any]:
    task = prompt.task
    return {
        "format": FORMAT_VERSION,
        "model_identity": lm.identity,
        "tokenizer_hash": lm.tokenizer_hash,
        "template": task.template,
        "separator": task.separator,
        "labels": list(task.labels),
        "demonstrations": [d.model_dump() for d in prompt.demonstrations],
        "method": str(method),
        "seed": seed if method != Method.HIDDEN_ANCHOR else None,
    }


def cache_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def cache_file(directory: Path, key: str) -> Path:
    return directory / f"{key}.safetensors"


def beta_file(directory: Path, key: str) -> Path:
    return directory / f"{key}.beta.safetensors"


def key_of_file(path: Path) -> str:
    """The cache key a file in `caches/` belongs to ('' for temporary files, whose names start with '.')."""
    return path.name.split(".", 1)[0]


def shown(path: Path) -> str:
    """`path` as error messages name it: relative to the state dir, e.g. `caches/<key>.safetensors`."""
    return f"{path.parent.name}/{path.name}"


# --- durable writes ------------------------------------------------------------------------------


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)`, fsync, rename over `path`, then fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def remove_durably(path: Path) -> None:
    """Unlink `path` (if present; another process may remove it first) and fsync its directory."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_directory(path.parent)


def quarantine(path: Path, state_dir: Path) -> str:
    """Move a damaged file to `<state_dir>/quarantine/<name>.<UTC timestamp>` for an operator to
    inspect (never deleted, never overwritten); returns where it went, relative to the state dir."""
    folder = state_dir / "quarantine"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = folder / f"{path.name}.{stamp}"
    n = 1
    while target.exists():
        target, n = folder / f"{path.name}.{stamp}.{n}", n + 1
    os.replace(path, target)
    fsync_directory(path.parent)
    fsync_directory(folder)
    return f"quarantine/{target.name}"


# --- checked tensor files ------------------------------------------------------------------------


def checksum(manifest_text: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the manifest text and each tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256(manifest_text.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """One atomic safetensors file whose metadata holds `manifest` and the checksum of it all."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    text = json.dumps(manifest, ensure_ascii=False)
    blob = save(tensors, metadata={"manifest": text, "sha256": checksum(text, tensors)})
    write_atomic(path, lambda p: p.write_bytes(blob))


def load_tensors(path: Path, device: torch.device | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and manifest of a file `save_tensors` wrote; any damage is a CacheMismatchError."""
    try:
        data = path.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len])["__metadata__"]
        text, stored_sum = metadata["manifest"], metadata["sha256"]
        tensors = load(data)
        manifest = json.loads(text)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CacheMismatchError(f"{shown(path)} is unreadable or truncated ({type(exc).__name__}: {exc})") from exc
    if not isinstance(manifest, dict) or checksum(text, tensors) != stored_sum:
        raise CacheMismatchError(f"{shown(path)} fails its sha256 checksum: the file is damaged")
    os.utime(path)
    return {name: t.to(device) for name, t in tensors.items()}, manifest


# --- anchor caches -------------------------------------------------------------------------------


def save_cache(directory: Path, cache: AnchorCache, identity: dict[str, Any], model_name: str) -> str:
    """Write `caches/<key>.safetensors` (tensors and manifest in one file); returns the key."""
    key = cache_key(identity)
    tensors = {f"layers.{i}.keys": k for i, k in enumerate(cache.keys)}
    tensors |= {f"layers.{i}.values": v for i, v in enumerate(cache.values)}
    manifest = {
        "key": key,
        "model_name": model_name,
        "identity": identity,
        "positions": list(cache.positions),
        "context_length": cache.context_length,
        "label_slots": list(cache.label_slots),
        "label_classes": list(cache.label_classes),
        "num_layers": len(cache.keys),
        "nbytes": cache.nbytes,
    }
    save_tensors(cache_file(directory, key), tensors, manifest)
    return key


def find_cache(directory: Path, identity: dict[str, Any], lm: LoadedModel) -> AnchorCache | None:
    """The persisted cache for `identity` in `directory`, or None when none was saved."""
    path = cache_file(directory, cache_key(identity))
    return load_cache(path, lm, identity) if path.is_file() else None


def load_cache(path: Path, lm: LoadedModel, expected: dict[str, Any] | None = None) -> AnchorCache:
    """Load a cache file; refuses a damaged or altered file, another model or tokenizer, or another task."""
    tensors, manifest = load_tensors(path, lm.device)
    try:
        stored, key, n = manifest["identity"], manifest["key"], manifest["num_layers"]
        if cache_key(stored) != key:
            raise CacheMismatchError(f"{shown(path)}: content hash does not match its key; the file was altered")
        if stored.get("model_identity") != lm.identity or stored.get("tokenizer_hash") != lm.tokenizer_hash:
            raise CacheMismatchError(
                f"{shown(path)} was built by model {manifest.get('model_name')!r} with other weights, dtype or "
                f"tokenizer than the loaded {lm.name!r}; rebuild it"
            )
        if expected is not None and cache_key(expected) != key:
            changed = sorted(k for k in expected if expected[k] != stored.get(k))
            raise CacheMismatchError(f"{shown(path)} belongs to another task or method (differs in {changed})")
        return AnchorCache(
            keys=tuple(tensors[f"layers.{i}.keys"] for i in range(n)),
            values=tuple(tensors[f"layers.{i}.values"] for i in range(n)),
            positions=tuple(manifest["positions"]),
            context_length=manifest["context_length"],
            label_slots=tuple(manifest["label_slots"]),
            label_classes=tuple(manifest["label_classes"]),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise CacheMismatchError(f"{shown(path)} is not an anchor-cache file ({type(exc).__name__}: {exc})") from exc


# --- learned β -----------------------------------------------------------------------------------


def save_beta(directory: Path, key: str, beta: torch.Tensor, info: dict[str, Any]) -> None:
    """β for the task variant `key` (its cache key) and how it was trained, in one atomic file."""
    save_tensors(beta_file(directory, key), {"beta": beta}, {"key": key, "info": info})


def find_beta(directory: Path, key: str, lm: LoadedModel) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """The β saved for `key` and its training info, if any. The key already covers the model,
    tokenizer and task."""
    path = beta_file(directory, key)
    if not path.is_file():
        return None
    tensors, manifest = load_tensors(path, lm.device)
    if manifest.get("key") != key or "beta" not in tensors or not isinstance(manifest.get("info"), dict):
        raise CacheMismatchError(f"{shown(path)} does not hold the β of this task")
    return tensors["beta"], manifest["info"]


# --- garbage collection --------------------------------------------------------------------------


def collect_garbage(directory: Path, live_keys: set[str], grace_s: float, keep_beta: bool = False) -> int:
    """Delete files in `directory` whose key is not in `live_keys` and whose mtime is older than
    `grace_s` (another replica may have just written or loaded them); with `keep_beta`, β files
    stay whatever their key. Returns the bytes freed."""
    if not directory.is_dir():
        return 0
    freed, cutoff = 0, time.time() - grace_s
    for path in sorted(directory.iterdir()):
        if not path.is_file() or key_of_file(path) in live_keys or (keep_beta and ".beta." in path.name):
            continue
        try:  # another replica sharing the state dir may collect the same file first
            stat = path.stat()
            if stat.st_mtime > cutoff:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        freed += stat.st_size
        log.info("garbage collection removed %s (%d bytes, unused for %.0fs)",
                 shown(path), stat.st_size, time.time() - stat.st_mtime)
    return freed
