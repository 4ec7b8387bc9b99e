"""Save and load anchor caches: `<key>.safetensors` (tensors) plus `<key>.json` (manifest).

The key is a content hash of everything the cached K/V depend on: model identity (config, weight
samples, dtype), tokenizer, template, separator, label words, demonstrations, method and seed.
Loading recomputes it from the manifest and checks it against the current model, so a cache can
never be served by a model, tokenizer or task it was not built from. Files are written to a
temporary name and renamed, so a crash mid-write leaves the previous version intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from anchor_cache.cache import AnchorCache
from anchor_cache.errors import CacheMismatchError
from anchor_cache.models import LoadedModel
from anchor_cache.prompt import TaskPrompt
from anchor_cache.task import Method

FORMAT_VERSION = 1


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


def write_atomic(path: Path, write) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`."""
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


def save_cache(directory: Path, cache: AnchorCache, identity: dict[str, Any], model_name: str) -> str:
    """Write tensors first, manifest last: a manifest only ever points at complete tensors."""
    key = cache_key(identity)
    tensors = {f"layers.{i}.keys": k.contiguous() for i, k in enumerate(cache.keys)}
    tensors |= {f"layers.{i}.values": v.contiguous() for i, v in enumerate(cache.values)}
    write_atomic(directory / f"{key}.safetensors", lambda p: save_file(tensors, str(p)))
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
    text = json.dumps(manifest, indent=1, ensure_ascii=False)
    write_atomic(directory / f"{key}.json", lambda p: p.write_text(text, encoding="utf-8"))
    return key


def find_cache(directory: Path, identity: dict[str, Any], lm: LoadedModel) -> AnchorCache | None:
    """The persisted cache for `identity` in `directory`, or None when none was saved."""
    manifest_path = directory / f"{cache_key(identity)}.json"
    return load_cache(manifest_path, lm, identity) if manifest_path.is_file() else None


def load_cache(manifest_path: Path, lm: LoadedModel, expected: dict[str, Any] | None = None) -> AnchorCache:
    """Load a cache by its manifest; refuses a tampered file, another model or tokenizer, or another task."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        stored = manifest["identity"]
        key = manifest["key"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CacheMismatchError(f"{manifest_path} is not a readable anchor-cache manifest ({exc})") from exc
    if cache_key(stored) != key:
        raise CacheMismatchError(f"{manifest_path}: content hash does not match its key; the file was altered")
    if stored.get("model_identity") != lm.identity or stored.get("tokenizer_hash") != lm.tokenizer_hash:
        raise CacheMismatchError(
            f"{manifest_path} was built by model {manifest.get('model_name')!r} with other weights, dtype or "
            f"tokenizer than the loaded {lm.name!r}; rebuild it"
        )
    if expected is not None and cache_key(expected) != key:
        changed = sorted(k for k in expected if expected[k] != stored.get(k))
        raise CacheMismatchError(f"{manifest_path} belongs to another task or method (differs in {changed})")
    tensors = load_file(str(manifest_path.with_suffix(".safetensors")), device=str(lm.device))
    n = manifest["num_layers"]
    return AnchorCache(
        keys=tuple(tensors[f"layers.{i}.keys"] for i in range(n)),
        values=tuple(tensors[f"layers.{i}.values"] for i in range(n)),
        positions=tuple(manifest["positions"]),
        context_length=manifest["context_length"],
        label_slots=tuple(manifest["label_slots"]),
        label_classes=tuple(manifest["label_classes"]),
    )


def save_beta(directory: Path, key: str, beta: torch.Tensor, info: dict[str, Any]) -> None:
    """Learned β for the task variant `key` (its cache key): tensor first, then its manifest."""
    write_atomic(directory / f"{key}.beta.safetensors", lambda p: save_file({"beta": beta.cpu().contiguous()}, str(p)))
    text = json.dumps(info | {"key": key, "shape": list(beta.shape)}, indent=1)
    write_atomic(directory / f"{key}.beta.json", lambda p: p.write_text(text, encoding="utf-8"))


def find_beta(directory: Path, key: str, lm: LoadedModel) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """The β saved for `key`, if any. The key already covers the model, tokenizer and task."""
    manifest = directory / f"{key}.beta.json"
    if not manifest.is_file():
        return None
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
        beta = load_file(str(directory / f"{key}.beta.safetensors"), device=str(lm.device))["beta"]
    except (OSError, ValueError, KeyError) as exc:
        raise CacheMismatchError(f"{manifest} or its tensor file is unreadable ({exc})") from exc
    if info.get("key") != key or list(beta.shape) != info.get("shape"):
        raise CacheMismatchError(f"{manifest} does not describe the β stored beside it")
    return beta, info
