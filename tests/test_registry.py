"""The registry serves the state store's records: it survives damaged files and tasks that cannot
load, applies revisions only forward, and collects the caches nothing uses any more; the server
seeds configured tasks. These run on the local store; tests/test_replicas.py runs replicas on both
backends."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from anchor_cache import Classifier, Method
from anchor_cache.blobs import beta_blob, cache_blob, cache_identity, shipped_beta_file, shipped_beta_key
from anchor_cache.errors import ConflictError, NotFoundError, UnavailableError
from anchor_cache.registry import TaskRegistry
from anchor_cache.reweighting import pool_hash
from server.replication import seed
from server.store import ABSENT, TaskRecord
from server.store.local import LocalStore
from server.store.records import stored_specs
from tests.conftest import QUERIES, sentiment_task

LONG_AGO = 1_000_000.0  # an mtime far older than any grace period


def registry(tiny_lm, state_dir: Path, configured=(), max_tasks: int = 4, gc_grace_s: float | None = None,
             shipped_betas: Path | None = None) -> TaskRegistry:
    """A registry started as the server starts one: configured tasks seeded, every record applied,
    then (with `gc_grace_s`) garbage collected."""
    reg = TaskRegistry(tiny_lm, LocalStore(state_dir), max_tasks=max_tasks, max_demo_tokens=512,
                       shipped_betas=shipped_betas)
    seed(reg.store, list(configured))
    for record in reg.store.records().values():
        apply(reg, record)
    if gc_grace_s is not None:
        collect(reg, gc_grace_s)
    return reg


def apply(reg: TaskRegistry, record: TaskRecord):
    return reg.apply(record.name, record.revision, record.spec, record.error)


def collect(reg: TaskRegistry, grace_s: float) -> int:
    return reg.collect_garbage(grace_s, *stored_specs(reg.store.records()))


def cache_file(directory: Path, key: str) -> Path:
    return directory / cache_blob(key)


def beta_file(directory: Path, key: str) -> Path:
    return directory / beta_blob(key)


def quarantined(state_dir: Path) -> list[str]:
    folder = state_dir / "quarantine"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def write_spec(state_dir: Path, name: str, text: str) -> Path:
    path = state_dir / "tasks" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def unbuildable(name: str, state_dir: Path) -> dict:
    """A valid spec whose demonstrations file does not exist."""
    spec = sentiment_task(name=name).model_dump(mode="json")
    spec["demonstrations"] = {"path": str(state_dir / "missing.jsonl")}
    return spec


def stored(spec: dict) -> str:
    """`spec` as a task record file holds it."""
    return json.dumps({"revision": 1, "source": "admin", "spec": spec})


def logits(reg: TaskRegistry, name: str) -> torch.Tensor:
    return reg.get(name).classifier.label_logits(QUERIES, Method.HIDDEN_ANCHOR)


def test_restart_loads_the_cache_from_disk(tiny_lm, tmp_path):
    before = logits(registry(tiny_lm, tmp_path, [sentiment_task()]), "sentiment")
    again = registry(tiny_lm, tmp_path, [sentiment_task()])
    assert again.get("sentiment").loaded_from_disk
    assert torch.equal(logits(again, "sentiment"), before)


@pytest.mark.parametrize("damage", ["flipped", "truncated", "header", "manifest", "junk"])
def test_damaged_cache_is_quarantined_and_rebuilt(tiny_lm, tmp_path, damage, caplog):
    key = registry(tiny_lm, tmp_path, [sentiment_task()]).get("sentiment").key
    path = cache_file(tmp_path / "caches", key)
    blob = path.read_bytes()
    data = 8 + int.from_bytes(blob[:8], "little")
    damaged = {
        "flipped": blob[:data] + bytes(b ^ 0xFF for b in blob[data : data + 4096]) + blob[data + 4096 :],
        "truncated": blob[: len(blob) - 100],
        "header": blob[:8] + b"\x00" * 40 + blob[48:],
        "manifest": blob.replace(b"context_length", b"context_lengtX", 1),
        "junk": blob + b"junk" * 10,
    }[damage]
    assert damaged != blob
    path.write_bytes(damaged)
    with caplog.at_level(logging.ERROR):
        reg = registry(tiny_lm, tmp_path, [sentiment_task()])
    served = reg.get("sentiment")
    assert not served.loaded_from_disk and reg.failures() == {}
    assert quarantined(tmp_path) == [n for n in quarantined(tmp_path) if n.startswith(f"{key}.safetensors.")] != []
    assert f"caches/{key}.safetensors" in caplog.text and "quarantine/" in caplog.text
    fresh = Classifier(tiny_lm, sentiment_task())
    assert torch.equal(logits(reg, "sentiment"), fresh.label_logits(QUERIES, Method.HIDDEN_ANCHOR))
    assert registry(tiny_lm, tmp_path, [sentiment_task()]).get("sentiment").loaded_from_disk


def test_beta_survives_a_restart_and_a_damaged_one_is_quarantined(tiny_lm, tmp_path, caplog):
    reg = registry(tiny_lm, tmp_path, [sentiment_task()])
    served = reg.get("sentiment")
    beta = served.classifier.zero_beta() + 0.25
    reg.save_beta(reg.with_beta(served, beta, {"seconds": 2.0}))
    restarted = registry(tiny_lm, tmp_path, [sentiment_task()]).get("sentiment")
    assert torch.equal(restarted.beta, beta) and restarted.reweighting == {"seconds": 2.0}
    path = beta_file(tmp_path / "caches", served.key)
    blob = bytearray(path.read_bytes())
    blob[-4:] = b"\xff\xff\xff\x7f"
    path.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING):
        reg = registry(tiny_lm, tmp_path, [sentiment_task()])
    lost = reg.get("sentiment")
    assert lost.beta is None and reg.failures() == {}
    assert "quarantine/" in lost.reweighting["lost"] and str(tmp_path) not in lost.reweighting["lost"]
    assert quarantined(tmp_path)[0].startswith(f"{served.key}.beta.safetensors.")
    assert "serving without β" in caplog.text
    assert torch.equal(logits(reg, "sentiment"), logits(registry(tiny_lm, tmp_path / "fresh", [sentiment_task()]),
                                                        "sentiment"))


def test_a_task_that_says_reweight_false_serves_without_the_beta_stored_under_its_key(tiny_lm, tmp_path):
    reg = registry(tiny_lm, tmp_path, [sentiment_task()])
    served = reg.get("sentiment")
    reg.save_beta(reg.with_beta(served, served.classifier.zero_beta() + 0.25, {}))
    assert reg.prepare(sentiment_task()).beta is not None
    unweighted = reg.prepare(sentiment_task(reweight=False))
    assert unweighted.key == served.key and unweighted.beta is None and unweighted.reweighting is None


def test_a_shipped_beta_serves_only_for_its_weights_task_and_pool(tiny_lm, tmp_path, caplog):
    """The built-in task's β ships with the server: it serves in any dtype of the same weights, but
    not for another pool (that learns again) nor another task, and a damaged file is skipped."""
    pooled = sentiment_task(examples=[{"text": "a fine film", "label": "Positive"},
                                      {"text": "a dull film", "label": "Negative"}])
    clf = Classifier(tiny_lm, pooled)
    identity = cache_identity(tiny_lm, clf.prompt, pooled.method, clf.seed)
    beta = clf.zero_beta() + 0.5
    folder = tmp_path / "shipped"
    name, data = shipped_beta_file(shipped_beta_key(identity, tiny_lm), beta,
                                   {"source": "examples", "pool": pool_hash(clf)})
    folder.mkdir()
    file = folder / name
    file.write_bytes(data)

    def start(spec, lm=tiny_lm, state=tmp_path / "state"):
        return registry(lm, state, [spec], shipped_betas=folder).get(spec.name)

    served = start(pooled)
    assert torch.equal(served.beta, beta) and served.reweighting["shipped"] is True
    assert not TaskRegistry.needs_pool_beta(served)
    assert not beta_file(tmp_path / "state" / "caches", served.key).exists()  # read from the file, not copied
    other_dtype = dataclasses.replace(tiny_lm, identity="another dtype", dtype=torch.bfloat16)
    assert torch.equal(start(pooled, other_dtype, tmp_path / "bf16").beta, beta)
    other_weights = dataclasses.replace(tiny_lm, weights_hash="other weights")
    assert start(pooled, other_weights, tmp_path / "other").beta is None
    repooled = start(pooled.model_copy(update={"examples": pooled.examples[:1]}), state=tmp_path / "repooled")
    assert TaskRegistry.needs_pool_beta(repooled)  # shipped for another pool: learned again
    assert start(pooled.model_copy(update={"examples": None}), state=tmp_path / "unpooled").beta is None
    assert start(pooled.model_copy(update={"reweight": False}), state=tmp_path / "unweighted").beta is None
    assert start(sentiment_task(template="Text: {text}\nSentiment:", examples=pooled.examples),
                 state=tmp_path / "retemplated").beta is None
    file.write_bytes(file.read_bytes()[:-3])
    with caplog.at_level(logging.WARNING):
        assert start(pooled, state=tmp_path / "damaged").beta is None
    assert "shipped β skipped" in caplog.text


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\udcff"])
def test_damaged_stored_record_is_quarantined_and_reported_not_replaced(tiny_lm, tmp_path, text, caplog):
    path = write_spec(tmp_path, "sentiment", "")
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.ERROR):
        reg = registry(tiny_lm, tmp_path, [sentiment_task(), sentiment_task(name="other")])
    assert [t.spec.name for t in reg.all()] == ["other"]
    message = reg.failures()["sentiment"]
    assert "tasks/sentiment.json was damaged" in message and "quarantine/sentiment.json." in message
    assert str(tmp_path) not in message and "tasks/sentiment.json" in caplog.text
    with pytest.raises(UnavailableError, match="was damaged"):
        reg.get("sentiment")
    assert quarantined(tmp_path)[0].startswith("sentiment.json.")
    assert json.loads(path.read_text())["error"] == message  # failed on every replica, and after restarts
    assert registry(tiny_lm, tmp_path, [sentiment_task()]).failures() == {"sentiment": message}


def test_an_invalid_stored_spec_fails_alone(tiny_lm, tmp_path):
    write_spec(tmp_path, "sentiment", stored({"name": "sentiment", "labels": ["One"]}))
    reg = registry(tiny_lm, tmp_path, [sentiment_task(name="other")])
    assert [t.spec.name for t in reg.all()] == ["other"] and "template" in reg.failures()["sentiment"]


def test_task_that_cannot_load_fails_alone_and_can_be_removed(tiny_lm, tmp_path):
    write_spec(tmp_path, "broken", stored(unbuildable("broken", tmp_path)))
    reg = registry(tiny_lm, tmp_path, [sentiment_task()])
    assert [t.spec.name for t in reg.all()] == ["sentiment"] and list(reg.failures()) == ["broken"]
    with pytest.raises(UnavailableError, match=r"missing\.jsonl"):
        reg.get("broken")
    assert reg.remove("broken") is None and reg.failures() == {}
    with pytest.raises(NotFoundError):
        reg.get("broken")
    with pytest.raises(NotFoundError):
        reg.remove("broken")


def test_a_successful_put_clears_the_failure(tiny_lm, tmp_path):
    write_spec(tmp_path, "broken", stored(unbuildable("broken", tmp_path)))
    reg = registry(tiny_lm, tmp_path)
    reg.put(reg.prepare(sentiment_task(name="broken")))
    assert reg.failures() == {} and reg.get("broken").spec.name == "broken"


def test_records_apply_only_forward(tiny_lm, tmp_path):
    reg = registry(tiny_lm, tmp_path, [sentiment_task()])
    store = reg.store
    first = reg.get("sentiment").revision
    newer = sentiment_task(template="Text: {text}\nSentiment:")
    record = store.write("sentiment", newer.model_dump(mode="json"), "admin", first)
    assert record.revision > first
    assert apply(reg, record).spec == newer and reg.revision("sentiment") == record.revision
    assert apply(reg, store.records()["sentiment"]) is None  # applied already
    stale = dataclasses.replace(record, revision=first, spec=sentiment_task().model_dump(mode="json"))
    assert apply(reg, stale) is None and reg.get("sentiment").spec == newer
    tombstone = store.write("sentiment", None, "admin", None)
    assert apply(reg, tombstone) is None and reg.all() == [] and reg.failures() == {}


def test_a_failing_revision_keeps_the_working_version(tiny_lm, tmp_path):
    reg = registry(tiny_lm, tmp_path, [sentiment_task()])
    record = reg.store.write("sentiment", unbuildable("sentiment", tmp_path), "admin", None)
    assert apply(reg, record) is None
    assert reg.get("sentiment").spec == sentiment_task() and reg.revision("sentiment") == record.revision


def test_configuration_seeds_the_store_and_admin_writes_win(tiny_lm, tmp_path):
    reg = registry(tiny_lm, tmp_path, [sentiment_task(), sentiment_task(name="other")])
    assert {r.name: r.source for r in reg.store.records().values()} == {"sentiment": "config", "other": "config"}
    admin = sentiment_task(template="Admin: {text}\nSentiment:")
    reg.store.write("sentiment", admin.model_dump(mode="json"), "admin", None)
    reg.store.write("other", None, "admin", None)  # an admin delete of a configured task
    changed = sentiment_task(name="third", template="Changed: {text}\nSentiment:")
    restarted = registry(tiny_lm, tmp_path, [sentiment_task(), sentiment_task(name="other"), changed])
    assert sorted(t.spec.name for t in restarted.all()) == ["sentiment", "third"]
    assert restarted.get("sentiment").spec == admin
    edited = sentiment_task(name="third", template="Edited: {text}\nSentiment:")
    assert registry(tiny_lm, tmp_path, [edited]).get("third").spec == edited  # a changed config replaces its seed
    dropped = registry(tiny_lm, tmp_path, [])
    assert [t.spec.name for t in dropped.all()] == ["sentiment"]  # seeds no longer configured are deleted


def test_a_create_race_in_the_store_has_one_winner(tiny_lm, tmp_path):
    store = LocalStore(tmp_path)
    store.write("x", sentiment_task(name="x").model_dump(mode="json"), "admin", ABSENT)
    with pytest.raises(ConflictError):
        store.write("x", sentiment_task(name="x").model_dump(mode="json"), "admin", ABSENT)


def test_max_tasks_is_a_conflict(tiny_lm, tmp_path):
    reg = registry(tiny_lm, tmp_path, [sentiment_task()], max_tasks=1)
    reg.put(reg.prepare(sentiment_task(template="Text: {text}\nSentiment:")))  # a replacement fits
    with pytest.raises(ConflictError, match="max_tasks"):
        reg.put(reg.prepare(sentiment_task(name="second")))


def test_garbage_collection_removes_only_old_unreferenced_files(tiny_lm, tmp_path):
    reg = registry(tiny_lm, tmp_path)
    first, second = sentiment_task(name="a"), sentiment_task(name="a", template="Text: {text}\nSentiment:")
    replaced = reg.prepare(first)
    reg.save_beta(reg.with_beta(replaced, replaced.classifier.zero_beta(), {}))
    for spec in (first, second):
        apply(reg, reg.store.write(spec.name, spec.model_dump(mode="json"), "admin", None))
    caches = tmp_path / "caches"
    stored = sentiment_task(name="b", template="Stored: {text}\nSentiment:")
    reg.store.write(stored.name, stored.model_dump(mode="json"), "admin", None)  # not applied here yet
    cache_file(caches, reg.key_of(stored)).write_bytes(b"being built by another replica")
    fresh_orphan = caches / "fresh.safetensors"
    fresh_orphan.write_bytes(b"just written")
    (tmp_path / "quarantine").mkdir()
    (tmp_path / "quarantine" / "x.safetensors.20240101T000000Z").write_bytes(b"evidence")
    for path in [*caches.iterdir(), *(tmp_path / "quarantine").iterdir()]:
        if path != fresh_orphan:
            os.utime(path, (LONG_AGO, LONG_AGO))
    old = [cache_file(caches, replaced.key), beta_file(caches, replaced.key)]
    kept = sorted(p.name for p in caches.iterdir() if p not in old)
    old_bytes = sum(p.stat().st_size for p in old)
    assert collect(reg, 3600) == old_bytes
    assert sorted(p.name for p in caches.iterdir()) == kept
    assert quarantined(tmp_path) == ["x.safetensors.20240101T000000Z"]
    assert collect(reg, 3600) == 0


@pytest.mark.parametrize("broken", ["unbuildable", "damaged"])
def test_garbage_collection_keeps_beta_while_a_key_is_unknown(tiny_lm, tmp_path, broken):
    reg = registry(tiny_lm, tmp_path)
    served = reg.prepare(sentiment_task(name="gone"))
    reg.save_beta(reg.with_beta(served, served.classifier.zero_beta(), {}))
    write_spec(tmp_path, "broken", stored(unbuildable("broken", tmp_path)) if broken == "unbuildable" else "{not json")
    for path in (tmp_path / "caches").iterdir():
        os.utime(path, (LONG_AGO, LONG_AGO))
    collect(reg, 0)
    assert [p.name for p in (tmp_path / "caches").iterdir()] == [beta_file(tmp_path / "caches", served.key).name]


def test_start_collects_garbage_but_keeps_configured_caches(tiny_lm, tmp_path):
    registry(tiny_lm, tmp_path, [sentiment_task(), sentiment_task(name="dropped", template="D: {text}\nSentiment:")])
    for path in (tmp_path / "caches").iterdir():
        os.utime(path, (LONG_AGO, LONG_AGO))
    reg = registry(tiny_lm, tmp_path, [sentiment_task()], gc_grace_s=60)
    assert [p.name for p in (tmp_path / "caches").iterdir()] == [f"{reg.get('sentiment').key}.safetensors"]
