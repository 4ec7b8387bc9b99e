"""Anchor caches and β round-trip through one checksummed safetensors blob each (here in a local
store, where a blob is the file caches/<name>), refuse mismatches and damage, and are written
atomically."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from anchor_cache import CacheMismatchError, Classifier, Demonstration, Method
from anchor_cache.blobs import (
    beta_blob,
    cache_blob,
    cache_identity,
    cache_key,
    dump_tensors,
    find_beta,
    find_cache,
    load_cache,
    parse_tensors,
    save_beta,
    save_cache,
)
from server.store.local import LocalStore, quarantine, write_atomic
from tests.conftest import QUERIES, sentiment_task


def cache_file(state_dir, key):
    return state_dir / "caches" / cache_blob(key)


def beta_file(state_dir, key):
    return state_dir / "caches" / beta_blob(key)


def _saved(tiny_lm, tmp_path, method=Method.HIDDEN_ANCHOR):
    clf = Classifier(tiny_lm, sentiment_task())
    identity = cache_identity(tiny_lm, clf.prompt, method, clf.seed)
    key = save_cache(LocalStore(tmp_path), clf.prefix(method).cache, identity, tiny_lm.name)
    return clf, identity, key


def test_a_many_shot_cache_keeps_its_group_bias_through_storage(tiny_lm, tmp_path):
    pool = [Demonstration(text=t, label=label) for t, label in
            [("warm", "Positive"), ("dull", "Negative"), ("moving", "Positive"), ("lifeless", "Negative")]]
    clf = Classifier(tiny_lm, sentiment_task(examples=pool))
    original = clf.prefix(Method.MANY_SHOT).cache
    identity = cache_identity(tiny_lm, clf.prompt, Method.MANY_SHOT, clf.seed)
    save_cache(LocalStore(tmp_path), original, identity, tiny_lm.name)
    loaded = find_cache(LocalStore(tmp_path), identity, tiny_lm)
    assert original.key_bias is not None and torch.equal(loaded.key_bias, original.key_bias)
    restored = Classifier(tiny_lm, clf.task)
    restored.install_cache(Method.MANY_SHOT, loaded)
    assert torch.equal(restored.label_logits(QUERIES, Method.MANY_SHOT), clf.label_logits(QUERIES, Method.MANY_SHOT))
    save_cache(LocalStore(tmp_path), dataclasses.replace(original, key_bias=original.key_bias[:3]), identity,
               tiny_lm.name)
    with pytest.raises(CacheMismatchError, match="key_bias has shape"):
        find_cache(LocalStore(tmp_path), identity, tiny_lm)


def data_offset(blob: bytes) -> int:
    """Where a safetensors file's tensor bytes start (after its length prefix and JSON header)."""
    return 8 + int.from_bytes(blob[:8], "little")


def test_round_trip_gives_identical_predictions(tiny_lm, tmp_path):
    clf, identity, key = _saved(tiny_lm, tmp_path)
    original = clf.prefix(Method.HIDDEN_ANCHOR).cache
    loaded = find_cache(LocalStore(tmp_path), identity, tiny_lm)
    assert loaded is not None and loaded.positions == original.positions
    assert loaded.label_slots == original.label_slots and loaded.context_length == original.context_length
    for a, b in zip(original.keys + original.values, loaded.keys + loaded.values, strict=True):
        assert torch.equal(a, b)
    fresh = Classifier(tiny_lm, sentiment_task())
    fresh.install_cache(Method.HIDDEN_ANCHOR, loaded)
    assert torch.equal(fresh.label_logits(QUERIES, "hidden_anchor"), clf.label_logits(QUERIES, "hidden_anchor"))
    assert [p.name for p in (tmp_path / "caches").iterdir()] == [f"{key}.safetensors"]


def test_key_covers_task_method_and_model(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    base = cache_identity(tiny_lm, clf.prompt, Method.HIDDEN_ANCHOR, 42)
    other_task = Classifier(tiny_lm, sentiment_task(template="Text: {text}\nSentiment:"))
    keys = {
        cache_key(base),
        cache_key(cache_identity(tiny_lm, clf.prompt, Method.HIDDEN_RANDOM, 42)),
        cache_key(cache_identity(tiny_lm, other_task.prompt, Method.HIDDEN_ANCHOR, 42)),
        cache_key(base | {"model_identity": "other"}),
    }
    assert len(keys) == 4
    assert cache_key(cache_identity(tiny_lm, clf.prompt, Method.HIDDEN_ANCHOR, 7)) == cache_key(base)


def test_missing_cache_is_none(tiny_lm, tmp_path):
    clf = Classifier(tiny_lm, sentiment_task())
    identity = cache_identity(tiny_lm, clf.prompt, Method.HIDDEN_ANCHOR, 42)
    assert find_cache(LocalStore(tmp_path), identity, tiny_lm) is None


def test_other_model_is_refused(tiny_lm, tmp_path):
    _, _, key = _saved(tiny_lm, tmp_path)
    impostor = dataclasses.replace(tiny_lm, identity="0" * 64)
    with pytest.raises(CacheMismatchError, match="other weights"):
        load_cache(cache_file(tmp_path, key).read_bytes(), cache_blob(key), impostor)


def test_other_task_is_refused(tiny_lm, tmp_path):
    _, identity, key = _saved(tiny_lm, tmp_path)
    expected = identity | {"labels": ["Bad", "Good"]}
    with pytest.raises(CacheMismatchError, match="labels"):
        load_cache(cache_file(tmp_path, key).read_bytes(), cache_blob(key), tiny_lm, expected)


def test_altered_manifest_with_a_recomputed_checksum_is_refused(tiny_lm, tmp_path):
    _, _, key = _saved(tiny_lm, tmp_path)
    path = cache_file(tmp_path, key)
    tensors, manifest = parse_tensors(path.read_bytes(), path.name, "cpu")
    manifest["identity"]["template"] = "Other: {text}\nSentiment:"
    with pytest.raises(CacheMismatchError, match="altered"):
        load_cache(dump_tensors(tensors, manifest), path.name, tiny_lm)


def test_flipped_tensor_bytes_fail_the_checksum(tiny_lm, tmp_path):
    _, identity, key = _saved(tiny_lm, tmp_path)
    path = cache_file(tmp_path, key)
    blob = bytearray(path.read_bytes())
    start = data_offset(blob) + 16
    blob[start : start + 64] = bytes(b ^ 0x5A for b in blob[start : start + 64])
    path.write_bytes(bytes(blob))
    with pytest.raises(CacheMismatchError, match="checksum") as caught:
        find_cache(LocalStore(tmp_path), identity, tiny_lm)
    assert str(tmp_path) not in str(caught.value) and f"caches/{key}.safetensors" in str(caught.value)


@pytest.mark.parametrize("damage", ["truncated", "header", "manifest", "junk"])
def test_damaged_file_is_refused(tiny_lm, tmp_path, damage):
    _, identity, key = _saved(tiny_lm, tmp_path)
    path = cache_file(tmp_path, key)
    blob = path.read_bytes()
    damaged = {
        "truncated": blob[: len(blob) // 2],
        "header": blob[:8] + b"#" * 24 + blob[32:],
        "manifest": blob.replace(b"context_length", b"context_lengtX", 1),
        "junk": blob + b"\0junk",
    }[damage]
    assert damaged != blob
    path.write_bytes(damaged)
    with pytest.raises(CacheMismatchError) as caught:
        find_cache(LocalStore(tmp_path), identity, tiny_lm)
    assert str(tmp_path) not in str(caught.value)


def test_beta_is_one_file_that_round_trips_and_refuses_damage(tiny_lm, tmp_path):
    beta = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    info = {"seconds": 1.5, "epoch_losses": [0.7, 0.5]}
    save_beta(LocalStore(tmp_path), "k1", beta, info)
    assert [p.name for p in (tmp_path / "caches").iterdir()] == ["k1.beta.safetensors"]
    loaded, loaded_info = find_beta(LocalStore(tmp_path), "k1", tiny_lm)
    assert torch.equal(loaded, beta) and loaded_info == info
    assert find_beta(LocalStore(tmp_path), "k2", tiny_lm) is None
    path = beta_file(tmp_path, "k1")
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(CacheMismatchError, match="checksum"):
        find_beta(LocalStore(tmp_path), "k1", tiny_lm)


def test_beta_under_another_key_is_refused(tiny_lm, tmp_path):
    save_beta(LocalStore(tmp_path), "k1", torch.ones(2), {})
    beta_file(tmp_path, "k1").rename(beta_file(tmp_path, "k2"))
    with pytest.raises(CacheMismatchError, match="does not hold"):
        find_beta(LocalStore(tmp_path), "k2", tiny_lm)


def test_loading_touches_the_blob(tiny_lm, tmp_path):
    _, identity, key = _saved(tiny_lm, tmp_path)
    path = cache_file(tmp_path, key)
    os.utime(path, (1_000_000, 1_000_000))
    assert find_cache(LocalStore(tmp_path), identity, tiny_lm) is not None
    assert path.stat().st_mtime > 1_000_000 + 86_400


def test_failed_write_leaves_the_old_version(tmp_path):
    path = tmp_path / "spec.json"
    write_atomic(path, lambda p: p.write_text("old"))

    def crash(p):
        p.write_text("half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, crash)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["spec.json"]


def test_quarantine_moves_and_never_overwrites(tmp_path):
    (tmp_path / "caches").mkdir()
    path = tmp_path / "caches" / "k.safetensors"
    moved = []
    for content in ("first", "second"):
        path.write_text(content)
        moved.append(quarantine(path, tmp_path))
    assert not path.exists() and len(set(moved)) == 2
    assert all(m.startswith("quarantine/k.safetensors.") for m in moved)
    assert sorted((tmp_path / m).read_text() for m in moved) == ["first", "second"]
