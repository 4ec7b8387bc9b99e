"""Model loading fails fast and clearly; the default GGUF is found inside its wheel."""

from __future__ import annotations

import time

import pytest
import torch

from anchor_cache import ModelFilesMissing, ValidationError, load_model, models
from anchor_cache.models import auto_cpu_dtype, cpu_flags, default_gguf_path, resolve_dtype


def test_hub_ids_are_refused_without_network():
    start = time.monotonic()
    with pytest.raises(ModelFilesMissing, match="never downloads"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert time.monotonic() - start < 5


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(ModelFilesMissing, match="not a local model folder"):
        load_model(str(tmp_path / "nowhere"))
    for path in ("/nope", "./nope", "~/nope"):  # one slash, but a path: no talk of the Hub
        with pytest.raises(ModelFilesMissing) as caught:
            load_model(path)
        assert "Hub" not in str(caught.value), path


@pytest.mark.parametrize(("device", "dtype"), [("cpu", "float16"), ("cpu", "int8")])
def test_unsupported_dtypes_are_refused(device, dtype):
    with pytest.raises(ValidationError, match="not supported"):
        resolve_dtype(dtype, torch.device(device))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma", "avx512f", "avx512_bf16"}, "bfloat16"),  # e.g. AMD Zen 4, Intel Cooper Lake
        ({"avx512f", "amx_tile", "amx_bf16", "amx_int8"}, "bfloat16"),  # Intel Sapphire Rapids and later
        ({"avx2", "fma", "avx512f", "avx512_vnni"}, "float32"),  # AVX-512 without bf16: emulated, slow
        ({"amx_tile", "amx_int8"}, "float32"),  # AMX without its bf16 part
        ({"avx2", "fma"}, "float32"),
        (set(), "float32"),  # no flags at all (not Linux)
    ],
)
def test_auto_cpu_dtype_follows_bf16_matmul_flags(flags, expected):
    assert auto_cpu_dtype(frozenset(flags)) == expected


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\n"
                    "flags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(("flags", "expected"), [({"avx512_bf16"}, torch.bfloat16), ({"avx2"}, torch.float32)])
def test_resolve_auto_on_cpu_uses_the_detected_flags(monkeypatch, caplog, flags, expected):
    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset(flags))
    models.auto_cpu.cache_clear()
    try:
        with caplog.at_level("INFO", logger="anchor_cache.models"):
            assert resolve_dtype("auto", torch.device("cpu")) is expected
            resolve_dtype("auto", torch.device("cpu"))
    finally:
        models.auto_cpu.cache_clear()
    decisions = [r.getMessage() for r in caplog.records if "dtype auto on CPU" in r.getMessage()]
    assert len(decisions) == 1 and decisions[0].endswith(str(expected).removeprefix("torch."))  # one line, once
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32


def test_auto_dtype_on_this_cpu():
    """This machine's own flags: bfloat16 where it has AMX-BF16 or AVX512-BF16, else float32."""
    flags = cpu_flags()
    has_bf16 = bool(flags & {"amx_bf16", "avx512_bf16"})
    assert resolve_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if has_bf16 else torch.float32)
    if not has_bf16:
        pytest.skip("this CPU has neither amx_bf16 nor avx512_bf16; checked only the float32 fallback")


def test_auto_dtype_on_cuda_is_bfloat16():
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16


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
