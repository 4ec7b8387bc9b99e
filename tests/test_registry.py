"""The registry survives damaged files, crashes mid-change and tasks that cannot load, and collects
the caches nothing uses any more."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from anchor_cache import Classifier, Method
from anchor_cache.errors import ConflictError, NotFoundError, UnavailableError
from anchor_cache.registry import TaskRegistry
from anchor_cache.storage import beta_file, cache_file
from tests.conftest import QUERIES, sentiment_task

LONG_AGO = 1_000_000.0  # an mtime far older than any grace period


def registry(tiny_lm, state_dir: Path, configured=(), max_tasks: int = 4) -> TaskRegistry:
    reg = TaskRegistry(tiny_lm, state_dir, max_tasks=max_tasks, max_demo_tokens=512)
    reg.start(list(configured))
    return reg


def quarantined(state_dir: Path) -> list[str]:
    folder = state_dir / "quarantine"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def write_spec(state_dir: Path, name: str, text: str, pending: bool = False) -> Path:
    path = state_dir / "tasks" / ("pending" if pending else "") / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def unbuildable(name: str, state_dir: Path):
    """A valid spec whose demonstrations file does not exist."""
    spec = sentiment_task(name=name).model_dump(mode="json")
    spec["demonstrations"] = {"path": str(state_dir / "missing.jsonl")}
    return json.dumps(spec)


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


@pytest.mark.parametrize("text", ["{not json", '{"name": "sentiment", "labels": ["One"]}', "\udcff"])
def test_damaged_runtime_spec_is_quarantined_and_reported_not_replaced(tiny_lm, tmp_path, text, caplog):
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
    assert not path.exists() and quarantined(tmp_path)[0].startswith("sentiment.json.")


def test_task_that_cannot_load_fails_alone_and_can_be_removed(tiny_lm, tmp_path):
    write_spec(tmp_path, "broken", unbuildable("broken", tmp_path))
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
    write_spec(tmp_path, "broken", unbuildable("broken", tmp_path))
    reg = registry(tiny_lm, tmp_path)
    reg.put(reg.prepare(sentiment_task(name="broken")))
    assert reg.failures() == {} and reg.get("broken").spec.name == "broken"


def test_pending_change_is_built_and_committed_at_start(tiny_lm, tmp_path):
    reg = registry(tiny_lm, tmp_path)
    reg.put(reg.prepare(sentiment_task()))
    reg.commit(sentiment_task())
    newer = sentiment_task(template="Text: {text}\nSentiment:")
    reg.persist_pending(newer)  # the process dies before the build finishes
    restarted = registry(tiny_lm, tmp_path)
    assert restarted.get("sentiment").spec == newer
    assert json.loads((tmp_path / "tasks" / "sentiment.json").read_text())["template"] == newer.template
    assert not (tmp_path / "tasks" / "pending" / "sentiment.json").exists()


def test_failing_pending_change_is_quarantined_and_the_previous_version_serves(tiny_lm, tmp_path):
    reg = registry(tiny_lm, tmp_path, [sentiment_task()])
    write_spec(tmp_path, "sentiment", unbuildable("sentiment", tmp_path), pending=True)
    write_spec(tmp_path, "fresh", unbuildable("fresh", tmp_path), pending=True)
    restarted = registry(tiny_lm, tmp_path, [sentiment_task()])
    assert restarted.get("sentiment").spec == reg.get("sentiment").spec
    assert list(restarted.failures()) == ["fresh"] and "did not build" in restarted.failures()["fresh"]
    assert [n.split(".")[0] for n in quarantined(tmp_path)] == ["fresh", "sentiment"]
    assert not any((tmp_path / "tasks" / "pending").iterdir())


def test_discarded_pending_change_and_deletion_survive_a_restart(tiny_lm, tmp_path):
    reg = registry(tiny_lm, tmp_path, [sentiment_task(), sentiment_task(name="other")])
    reg.persist_pending(sentiment_task(template="Text: {text}\nSentiment:"))
    reg.discard_pending("sentiment")
    reg.persist_pending(sentiment_task(name="other", template="Text: {text}\nSentiment:"))
    reg.remove("other")
    reg.persist_deletion("other")
    restarted = registry(tiny_lm, tmp_path, [sentiment_task(), sentiment_task(name="other")])
    assert [t.spec for t in restarted.all()] == [sentiment_task()] and restarted.failures() == {}


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
        reg.put(reg.prepare(spec))
        reg.commit(spec)
    caches = tmp_path / "caches"
    pending = sentiment_task(name="b", template="Pending: {text}\nSentiment:")
    reg.persist_pending(pending)
    cache_file(caches, reg.key_of(pending)).write_bytes(b"being built by another replica")
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
    assert reg.collect_garbage(grace_s=3600) == old_bytes
    assert sorted(p.name for p in caches.iterdir()) == kept
    assert quarantined(tmp_path) == ["x.safetensors.20240101T000000Z"]
    assert reg.collect_garbage(grace_s=3600) == 0


@pytest.mark.parametrize("broken", ["unbuildable", "damaged"])
def test_garbage_collection_keeps_beta_while_a_key_is_unknown(tiny_lm, tmp_path, broken):
    reg = registry(tiny_lm, tmp_path)
    served = reg.prepare(sentiment_task(name="gone"))
    reg.save_beta(reg.with_beta(served, served.classifier.zero_beta(), {}))
    write_spec(tmp_path, "broken", unbuildable("broken", tmp_path) if broken == "unbuildable" else "{not json")
    for path in (tmp_path / "caches").iterdir():
        os.utime(path, (LONG_AGO, LONG_AGO))
    reg.collect_garbage(grace_s=0)
    assert [p.name for p in (tmp_path / "caches").iterdir()] == [beta_file(tmp_path / "caches", served.key).name]


def test_start_collects_garbage_but_keeps_configured_caches(tiny_lm, tmp_path):
    registry(tiny_lm, tmp_path, [sentiment_task(), sentiment_task(name="dropped", template="D: {text}\nSentiment:")])
    for path in (tmp_path / "caches").iterdir():
        os.utime(path, (LONG_AGO, LONG_AGO))
    reg = TaskRegistry(tiny_lm, tmp_path, max_tasks=4, max_demo_tokens=512)
    reg.start([sentiment_task()], gc_grace_s=60)
    assert [p.name for p in (tmp_path / "caches").iterdir()] == [f"{reg.get('sentiment').key}.safetensors"]
