"""The `python -m anchor_cache eval` contract used by outside evaluators."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from anchor_cache.cli import main
from tests.conftest import save_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("cli-model"))


def test_eval_writes_the_results_contract(tiny_folder, dataset_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    methods = "vanilla,hidden_anchor,text_anchor,hidden_random,hidden_random_top,zero_shot"
    code = main([
        "eval", "--data", str(dataset_dir), "--template", "Review: {text}\\nSentiment:",
        "--labels", "Negative,Positive", "--methods", methods, "--shots-per-class", "1",
        "--seeds", "42,43", "--limit", "5", "--top-draws", "2", "--top-dev-size", "4",
        "--model", str(tiny_folder), "--dtype", "float32", "--out", str(out),
    ])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["config"]["template"] == "Review: {text}\nSentiment:"
    assert list(results["methods"]) == methods.split(",")
    for m in results["methods"].values():
        assert set(m) == {"accuracy", "label_loyalty", "word_loyalty", "per_seed", "tokens_per_request",
                          "kv_cache_bytes"}
        assert [s["seed"] for s in m["per_seed"]] == [42, 43] and all(s["n"] == 5 for s in m["per_seed"])
        assert 0 <= m["accuracy"] <= 100 and isinstance(m["kv_cache_bytes"], int)
    vanilla, anchor = results["methods"]["vanilla"], results["methods"]["hidden_anchor"]
    assert vanilla["label_loyalty"] == vanilla["word_loyalty"] == 100
    assert anchor["tokens_per_request"] < vanilla["tokens_per_request"]
    assert 0 < anchor["kv_cache_bytes"] < vanilla["kv_cache_bytes"]
    assert results["methods"]["zero_shot"]["kv_cache_bytes"] == 0
    assert "| hidden_anchor |" in capsys.readouterr().out


def test_bad_arguments_fail_cleanly(tiny_folder, dataset_dir, tmp_path):
    with pytest.raises(SystemExit):
        main(["eval", "--data", str(dataset_dir), "--methods", "vanilla,nonsense"])
    code = main(["eval", "--data", str(tmp_path / "empty"), "--preset", "sst2", "--model", str(tiny_folder)])
    assert code == 2  # missing train.jsonl: a clear error, not a traceback


def test_module_entry_point_shows_help():
    out = subprocess.run([sys.executable, "-m", "anchor_cache", "eval", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--shots-per-class" in out.stdout and "--preset" in out.stdout


def test_reweight_writes_beta_and_loss_curve(tiny_folder, dataset_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "beta"
    code = main([
        "reweight", "--data", str(dataset_dir), "--template", "Review: {text}\\nSentiment:",
        "--labels", "Negative,Positive", "--model", str(tiny_folder), "--train-per-class", "2", "--epochs", "2",
        "--limit", "4", "--out", str(out),
    ])
    assert code == 0
    report = json.loads((out / "reweighting.json").read_text())
    assert len(report["epoch_losses"]) == 2 and len(report["step_losses"]) == 8
    assert {"accuracy_before", "accuracy_after"} <= set(report)
    assert load_file(str(out / "beta.safetensors"))["beta"].shape == (3, 4, 2)


@pytest.mark.parametrize("kind", ["saliency", "isolation", "deep-layers", "error-diagnosis"])
def test_analyze_writes_results_and_plots(tiny_folder, dataset_dir, tmp_path, kind):
    out = tmp_path / kind
    flags = {"isolation": ["--ks", "0,1"], "error-diagnosis": ["--contexts", "2"]}.get(kind, [])
    seeds = [] if kind == "error-diagnosis" else ["--seeds", "42"]
    code = main([
        "analyze", kind, "--data", str(dataset_dir), "--template", "Review: {text}\\nSentiment:",
        "--labels", "Negative,Positive", "--model", str(tiny_folder), "--limit", "4", *seeds, *flags,
        "--out", str(out),
    ])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    named = {"saliency": "s_wp", "isolation": "word_loyalty", "deep-layers": "auc_roc", "error-diagnosis": "spearman"}
    assert named[kind] in results and results["params"]["limit"] == 4
    assert all(png.read_bytes().startswith(b"\x89PNG") for png in out.glob("*.png")) and list(out.glob("*.png"))


def test_analyze_refuses_bad_parameters(tiny_folder, dataset_dir, tmp_path):
    args = ["analyze", "isolation", "--data", str(dataset_dir), "--preset", "sst2", "--model", str(tiny_folder),
            "--out", str(tmp_path)]
    assert main([*args, "--ks", "99"]) == 2
    assert main([*args, "--params", '{"nonsense": 1}']) == 2
