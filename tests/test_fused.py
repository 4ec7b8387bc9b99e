"""The fused β correction (anchor_cache/fused.py) against the torch path it replaces on CUDA, run on
the CPU in Triton's interpreter: a mixed packed batch (several tasks, GQA on Llama, β per row, a
many-shot cache's key bias) through the static forward of graphs.py, once with the kernel and once
without. The interpreter must be chosen before Triton is imported, hence a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, sys
from pathlib import Path
import torch
from anchor_cache import Classifier, Method, fused
from anchor_cache.graphs import PackedGraphs
from anchor_cache.models import load_model
from anchor_cache.packed import packed_label_logits
from tests.conftest import QUERIES, sentiment_task, save_tiny_model
from tests.test_packed import POOL, _beta, mixed_batch

lm = load_model(str(save_tiny_model(sys.argv[1], Path(sys.argv[2]))), device="cpu", dtype="float32")
rows, _ = mixed_batch(lm)
many = Classifier(lm, sentiment_task(name="many", examples=POOL, method=Method.MANY_SHOT))
rows += [many.packed_row(many.prompt.encode(q), Method.MANY_SHOT, _beta(many, 5)) for q in QUERIES]
plain = [r.__class__(r.prefix, r.ids, r.label_ids) for r in rows]
with torch.inference_mode():
    torch_path = packed_label_logits(lm, rows, graphs=PackedGraphs(lm))
    unweighted = packed_label_logits(lm, plain, graphs=PackedGraphs(lm))
    fused.available = lambda query: True
    kernel = packed_label_logits(lm, rows, graphs=PackedGraphs(lm))
diff = lambda a, b: max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
print(json.dumps({"kernel_vs_torch": diff(kernel, torch_path), "beta_effect": diff(torch_path, unweighted)}))
"""


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fused_kernel_equals_the_torch_correction(family, tmp_path):
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, family, str(tmp_path / "model")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["beta_effect"] > 1e-3  # so a kernel that added nothing would fail below
    assert result["kernel_vs_torch"] < 1e-5, result
