"""Persisted artefacts: anchor caches and learned β, one self-checking blob each in the state store.

Blob `<key>.safetensors` holds a cache's per-layer K/V, `<key>.beta.safetensors` the β learned for
that task variant (in a local store they are files in `caches/`). The key is a content hash of
everything the cached K/V depend on: model identity (config, weight samples, dtype), tokenizer,
template, separator, label words, demonstrations, method and seed. Each blob's safetensors metadata
carries a JSON manifest and a sha256 over that manifest and every tensor's name, dtype, shape and
bytes; loading recomputes it, so bit rot, truncation, appended bytes or a damaged header raise
CacheMismatchError instead of being served. Loading also recomputes the key from the manifest and
checks it against the current model, so a cache is never served by a model, tokenizer or task it
was not built from. Blobs are content-addressed, so replicas may write the same one at once.

The engine reaches a store only through `BlobStore`; the server's state store
(`server/store/`) implements it beside the task records, jobs and plots that the engine never sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from anchor_cache.cache import AnchorCache
from anchor_cache.errors import CacheMismatchError
from anchor_cache.models import LoadedModel
from anchor_cache.prompt import TaskPrompt
from anchor_cache.task import Method, TaskSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the cached content (part of the key), not of the file layout


class BlobStore(Protocol):
    """Content-addressed blobs shared by every replica. Methods may block on I/O, and raise
    `UnavailableError` when the store cannot be reached."""

    def get_blob(self, name: str) -> bytes | None:
        """The blob's bytes (marking it used now, for garbage collection), or None."""

    def put_blob(self, name: str, data: bytes) -> None:
        """Store atomically: a reader sees the old bytes or the new, never a mix."""

    def quarantine_blob(self, name: str) -> str:
        """Move a damaged blob aside (kept, never served); returns where it went, for messages."""

    def blob_ages(self) -> dict[str, float]:
        """Every blob name -> seconds since it was last written or read."""

    def delete_blob(self, name: str) -> int:
        """Remove a blob; returns the bytes freed (0 if it was gone)."""


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
    } | ({"pool": _pool_identity(task), "group_bias": "log(1/G)"} if method == Method.MANY_SHOT else {})


def _pool_identity(task: TaskSpec) -> Any:
    """What a many-shot cache is built from besides the demonstrations: the task's pool."""
    examples = task.examples
    return [d.model_dump() for d in examples] if isinstance(examples, list) else examples.model_dump(mode="json")


def cache_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def cache_blob(key: str) -> str:
    return f"{key}.safetensors"


def beta_blob(key: str) -> str:
    return f"{key}.beta.safetensors"


def choice_blob(key: str) -> str:
    return f"{key}.auto.safetensors"


def key_of_blob(name: str) -> str:
    """The cache key a blob belongs to."""
    return name.split(".", 1)[0]


def shown(name: str) -> str:
    """A blob as messages name it (in a local store it is the file `caches/<name>`)."""
    return f"caches/{name}"


# --- checked tensor blobs ------------------------------------------------------------------------


def checksum(manifest_text: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the manifest text and each tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256(manifest_text.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dump_tensors(tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> bytes:
    """safetensors bytes whose metadata holds `manifest` and the checksum of it all."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    text = json.dumps(manifest, ensure_ascii=False)
    return save(tensors, metadata={"manifest": text, "sha256": checksum(text, tensors)})


def parse_tensors(data: bytes, name: str, device: torch.device | str
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and manifest of bytes `dump_tensors` wrote; any damage is a CacheMismatchError."""
    try:
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len])["__metadata__"]
        text, stored_sum = metadata["manifest"], metadata["sha256"]
        tensors = load(data)
        manifest = json.loads(text)
    except (ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CacheMismatchError(f"{shown(name)} is unreadable or truncated ({type(exc).__name__}: {exc})") from exc
    if not isinstance(manifest, dict) or checksum(text, tensors) != stored_sum:
        raise CacheMismatchError(f"{shown(name)} fails its sha256 checksum: it is damaged")
    return {k: t.to(device) for k, t in tensors.items()}, manifest


# --- anchor caches -------------------------------------------------------------------------------


def save_cache(store: BlobStore, cache: AnchorCache, identity: dict[str, Any], model_name: str) -> str:
    """Store the blob `<key>.safetensors` (tensors and manifest in one); returns the key."""
    key = cache_key(identity)
    tensors = {f"layers.{i}.keys": k for i, k in enumerate(cache.keys)}
    tensors |= {f"layers.{i}.values": v for i, v in enumerate(cache.values)}
    if cache.key_bias is not None:
        tensors["key_bias"] = cache.key_bias
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
    store.put_blob(cache_blob(key), dump_tensors(tensors, manifest))
    return key


def find_cache(store: BlobStore, identity: dict[str, Any], lm: LoadedModel) -> AnchorCache | None:
    """The stored cache for `identity`, or None when none was stored."""
    name = cache_blob(cache_key(identity))
    data = store.get_blob(name)
    return None if data is None else load_cache(data, name, lm, identity)


def load_cache(data: bytes, name: str, lm: LoadedModel, expected: dict[str, Any] | None = None) -> AnchorCache:
    """Parse a cache blob; refuses damaged or altered bytes, another model or tokenizer, or another task."""
    tensors, manifest = parse_tensors(data, name, lm.device)
    try:
        stored, key, n = manifest["identity"], manifest["key"], manifest["num_layers"]
        if cache_key(stored) != key:
            raise CacheMismatchError(f"{shown(name)}: content hash does not match its key; it was altered")
        if stored.get("model_identity") != lm.identity or stored.get("tokenizer_hash") != lm.tokenizer_hash:
            raise CacheMismatchError(
                f"{shown(name)} was built by model {manifest.get('model_name')!r} with other weights, dtype or "
                f"tokenizer than the loaded {lm.name!r}; rebuild it"
            )
        if expected is not None and cache_key(expected) != key:
            changed = sorted(k for k in expected if expected[k] != stored.get(k))
            raise CacheMismatchError(f"{shown(name)} belongs to another task or method (differs in {changed})")
        bias = tensors.get("key_bias")
        if bias is not None and tuple(bias.shape) != (len(manifest["positions"]),):
            raise CacheMismatchError(f"{shown(name)}: key_bias has shape {tuple(bias.shape)} for "
                                     f"{len(manifest['positions'])} cached tokens")
        return AnchorCache(
            keys=tuple(tensors[f"layers.{i}.keys"] for i in range(n)),
            values=tuple(tensors[f"layers.{i}.values"] for i in range(n)),
            positions=tuple(manifest["positions"]),
            context_length=manifest["context_length"],
            label_slots=tuple(manifest["label_slots"]),
            label_classes=tuple(manifest["label_classes"]),
            key_bias=bias,
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise CacheMismatchError(f"{shown(name)} is not an anchor cache ({type(exc).__name__}: {exc})") from exc


# --- learned β -----------------------------------------------------------------------------------


def save_beta(store: BlobStore, key: str, beta: torch.Tensor, info: dict[str, Any]) -> None:
    """β for the task variant `key` (its cache key) and how it was trained, in one blob."""
    store.put_blob(beta_blob(key), dump_tensors({"beta": beta}, {"key": key, "info": info}))


def find_beta(store: BlobStore, key: str, lm: LoadedModel) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """The β stored for `key` and its training info, if any. The key already covers the model,
    tokenizer and task."""
    name = beta_blob(key)
    data = store.get_blob(name)
    if data is None:
        return None
    tensors, info = _keyed(data, name, shown(name), key, lm.device, "beta", "the β of this task")
    return tensors["beta"], info


def _keyed(data: bytes, name: str, shown_as: str, key: str, device: torch.device | str, tensor: str | None,
           what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and `info` of a blob written with {"key", "info"}, checked to be `key`'s (and to
    hold `tensor`); anything else is a CacheMismatchError naming `what` it should hold."""
    tensors, manifest = parse_tensors(data, name, device)
    if manifest.get("key") != key or (tensor is not None and tensor not in tensors) \
            or not isinstance(manifest.get("info"), dict):
        raise CacheMismatchError(f"{shown_as} does not hold {what}")
    return tensors, manifest["info"]


def save_choice(store: BlobStore, key: str, info: dict[str, Any]) -> None:
    """What `method: auto` chose for the task whose choice key is `key` (registry.choice_key), and why."""
    store.put_blob(choice_blob(key), dump_tensors({}, {"key": key, "info": info}))


def find_choice(store: BlobStore, key: str) -> dict[str, Any] | None:
    name = choice_blob(key)
    data = store.get_blob(name)
    if data is None:
        return None
    return _keyed(data, name, shown(name), key, "cpu", None, "this task's choice")[1]


def shipped_beta_key(identity: dict[str, Any], lm: LoadedModel) -> str:
    """The key of a β shipped with the server: its task's cache identity with the weights in place
    of the weights in a dtype, since a β learned in one dtype serves in another."""
    return cache_key(identity | {"model_identity": lm.weights_hash})


def find_shipped_beta(folder: Path, key: str, lm: LoadedModel) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """The β in `folder` shipped for `key` (see shipped_beta_key) and its training info, if any."""
    file = folder / beta_blob(key)
    if not file.is_file():
        return None
    tensors, info = _keyed(file.read_bytes(), file.name, file.name, key, lm.device, "beta", "the β it is named for")
    return tensors["beta"], info | {"shipped": True}


def shipped_beta_file(key: str, beta: torch.Tensor, info: dict[str, Any]) -> tuple[str, bytes]:
    """The file name and bytes of a β that find_shipped_beta reads (a maintainer writes it once and
    checks it in)."""
    return beta_blob(key), dump_tensors({"beta": beta}, {"key": key, "info": info})


# --- garbage collection --------------------------------------------------------------------------


def collect_garbage(store: BlobStore, live_keys: set[str], grace_s: float, keep_beta: bool = False) -> int:
    """Delete blobs whose key is not in `live_keys` and that nobody wrote or read for `grace_s`
    seconds (another replica may have just used them); with `keep_beta`, β and choice blobs (which
    cost minutes to make again) stay whatever their key. Returns the bytes freed."""
    freed = 0
    for name, age in sorted(store.blob_ages().items()):
        precious = ".beta." in name or ".auto." in name
        if key_of_blob(name) in live_keys or age < grace_s or (keep_beta and precious):
            continue
        size = store.delete_blob(name)  # another replica may collect the same blob first: 0 bytes
        if size:
            freed += size
            log.info("garbage collection removed %s (%d bytes, unused for %.0fs)", shown(name), size, age)
    return freed
