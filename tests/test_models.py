"""Model loading fails fast and clearly; the default GGUF is found inside its wheel."""

from __future__ import annotations

import time

import pytest
import torch

from anchor_cache import ModelNotFoundError, ValidationError, load_model
from anchor_cache.models import default_gguf_path, resolve_dtype


def test_hub_ids_are_refused_without_network():
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert time.monotonic() - start < 5


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a local model folder"):
        load_model(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(("device", "dtype"), [("cpu", "float16"), ("cpu", "int8")])
def test_unsupported_dtypes_are_refused(device, dtype):
    with pytest.raises(ValidationError, match="not supported"):
        resolve_dtype(dtype, torch.device(device))


def test_auto_dtype_is_float32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16


def test_default_gguf_ships_in_the_wheel():
    path = default_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_tiny_model_is_frozen_and_uses_anchor_attention(tiny_lm):
    assert tiny_lm.model.config._attn_implementation == "anchor"
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())
    assert len(tiny_lm.identity) == 64 and len(tiny_lm.tokenizer_hash) == 64


def test_bfloat16_on_cpu_runs(tiny_lm, tmp_path):
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu", dtype="bfloat16")
    assert lm.identity != tiny_lm.identity  # the dtype is part of the identity
    from anchor_cache import Classifier
    from tests.conftest import QUERIES, sentiment_task

    preds = Classifier(lm, sentiment_task()).classify(QUERIES)
    assert all(abs(sum(p.probs.values()) - 1) < 1e-3 for p in preds)
