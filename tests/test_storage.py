"""Anchor caches round-trip through safetensors + manifest and refuse mismatches."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from anchor_cache import CacheMismatchError, Classifier, Method
from anchor_cache.storage import cache_identity, cache_key, find_cache, load_cache, save_cache
from tests.conftest import QUERIES, sentiment_task


def _saved(tiny_lm, tmp_path, method=Method.HIDDEN_ANCHOR):
    clf = Classifier(tiny_lm, sentiment_task())
    identity = cache_identity(tiny_lm, clf.prompt, method, clf.seed)
    key = save_cache(tmp_path, clf.prefix(method).cache, identity, tiny_lm.name)
    return clf, identity, key


def test_round_trip_gives_identical_predictions(tiny_lm, tmp_path):
    clf, identity, key = _saved(tiny_lm, tmp_path)
    original = clf.prefix(Method.HIDDEN_ANCHOR).cache
    loaded = find_cache(tmp_path, identity, tiny_lm)
    assert loaded is not None and loaded.positions == original.positions
    assert loaded.label_slots == original.label_slots and loaded.context_length == original.context_length
    for a, b in zip(original.keys + original.values, loaded.keys + loaded.values, strict=True):
        assert torch.equal(a, b)
    fresh = Classifier(tiny_lm, sentiment_task())
    fresh.install_cache(Method.HIDDEN_ANCHOR, loaded)
    assert torch.equal(fresh.label_logits(QUERIES, "hidden_anchor"), clf.label_logits(QUERIES, "hidden_anchor"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.json", f"{key}.safetensors"]


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
    assert find_cache(tmp_path, cache_identity(tiny_lm, clf.prompt, Method.HIDDEN_ANCHOR, 42), tiny_lm) is None


def test_other_model_is_refused(tiny_lm, tmp_path):
    _, _, key = _saved(tiny_lm, tmp_path)
    impostor = dataclasses.replace(tiny_lm, identity="0" * 64)
    with pytest.raises(CacheMismatchError, match="other weights"):
        load_cache(tmp_path / f"{key}.json", impostor)


def test_other_task_is_refused(tiny_lm, tmp_path):
    _, identity, key = _saved(tiny_lm, tmp_path)
    expected = identity | {"labels": ["Bad", "Good"]}
    with pytest.raises(CacheMismatchError, match="labels"):
        load_cache(tmp_path / f"{key}.json", tiny_lm, expected)


def test_tampered_manifest_is_refused(tiny_lm, tmp_path):
    _, _, key = _saved(tiny_lm, tmp_path)
    path = tmp_path / f"{key}.json"
    manifest = json.loads(path.read_text())
    manifest["identity"]["template"] = "Other: {text}\nSentiment:"
    path.write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match="altered"):
        load_cache(path, tiny_lm)
    path.write_text("{not json")
    with pytest.raises(CacheMismatchError, match="not a readable"):
        load_cache(path, tiny_lm)
