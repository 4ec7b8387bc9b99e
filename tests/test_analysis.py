"""Analyses (paper §2, §3.3): exactness of the interventions, the metrics on toys, and the runs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from anchor_cache import AttentionPlan
from anchor_cache.analysis import (
    KINDS,
    AnalysisData,
    JobControl,
    deep_layers,
    error_diagnosis,
    isolation,
    parse_params,
    run_analysis,
    saliency,
)
from anchor_cache.analysis.common import final_hidden, padded_rows, prompt_rows
from anchor_cache.analysis.deep_layers import auc_roc, r_curve
from anchor_cache.analysis.error_diagnosis import pair_spearman, predicted_confusion, real_confusion
from anchor_cache.analysis.isolation import isolated_layers, random_positions
from anchor_cache.analysis.saliency import flows, saliency_matrices
from anchor_cache.attention import Isolation
from anchor_cache.data import Example
from anchor_cache.errors import Cancelled, ValidationError
from anchor_cache.forward import label_logits
from anchor_cache.prompt import label_token_ids
from tests.conftest import ADMIN, QUERIES, sentiment_task, wait_finished


def analyse(lm, kind, data, params, control=None):
    """The edge's two steps: check the params once, then run."""
    return run_analysis(lm, kind, data, parse_params(kind, params, lm.model.config.num_hidden_layers), control)


ROWS = [Example(text, i % 2) for i, text in enumerate([*QUERIES, "a wonderful film", "a dull report", "lazy"])]


def _prompts(lm, rows=ROWS):
    task = sentiment_task()
    return prompt_rows(lm, task, task.demonstrations, rows, 1024)[0]


def test_ones_multiplier_equals_attention_times_its_gradient(tiny_lm):
    """Reference: keep the weights themselves (retain_grad) and form A ⊙ ∂L/∂A by autograd."""
    prompts = _prompts(tiny_lm)
    label_ids = label_token_ids(sentiment_task().labels, tiny_lm.tokenizer)
    fast = saliency_matrices(tiny_lm, prompts, label_ids)
    for prompt, sal in zip(prompts, fast, strict=True):
        # The weights are frozen: a leaf input makes the graph reach the attention weights.
        embeds = tiny_lm.model.get_input_embeddings()(torch.tensor([prompt.ids])).detach().requires_grad_()
        with torch.enable_grad():
            out = tiny_lm.model.base_model(inputs_embeds=embeds, output_attentions=True,
                                           anchor_plan=AttentionPlan(True))
            for a in out.attentions:
                a.retain_grad()
            logits = label_logits(tiny_lm, out.last_hidden_state[:, -1], label_ids)
            F.cross_entropy(logits, torch.tensor([prompt.gold])).backward()
        reference = torch.stack([(a * a.grad).sum(1).abs()[0] for a in out.attentions])
        torch.testing.assert_close(sal, reference, atol=1e-6, rtol=1e-4)
        assert sal.abs().max() > 0


def test_flows_match_a_hand_computation():
    s = torch.arange(1.0, 26.0).reshape(5, 5).tril()  # q = 4, label words at 1 and 3
    wp = (s[1, 0] + s[3, 0] + s[3, 1] + s[3, 2]) / (1 + 3)
    pq = (s[4, 1] + s[4, 3]) / 2
    others = s.tril(-1).sum() - wp * 4 - pq * 2
    ww = others / (4 * 5 / 2 - 4 - 2)
    assert flows(s, (1, 3)) == pytest.approx((float(wp), float(pq), float(ww)))


def test_isolating_no_layer_changes_nothing(tiny_lm):
    prompts = _prompts(tiny_lm)
    rows = padded_rows(prompts, [p.label_positions for p in prompts], tiny_lm.device)
    with torch.inference_mode():
        plain = final_hidden(tiny_lm, prompts)
        none = final_hidden(tiny_lm, prompts, AttentionPlan(isolation=Isolation(frozenset(), rows)))
        some = final_hidden(tiny_lm, prompts, AttentionPlan(isolation=Isolation(frozenset({0}), rows)))
    torch.testing.assert_close(none, plain, atol=0, rtol=0)
    assert (some - plain).abs().max() > 1e-4  # the test can fail


def test_isolated_rows_attend_only_to_themselves(tiny_lm):
    prompts = _prompts(tiny_lm)
    everything = padded_rows(prompts, [range(len(p.ids)) for p in prompts], tiny_lm.device)
    labels_only = padded_rows(prompts, [p.label_positions for p in prompts], tiny_lm.device)
    plan = AttentionPlan(isolation=Isolation(frozenset({0}), everything), capture_maps=True)
    with torch.inference_mode():
        final_hidden(tiny_lm, prompts, plan)
    heads = tiny_lm.model.config.num_attention_heads
    for b, p in enumerate(prompts):
        n = len(p.ids)
        torch.testing.assert_close(plan.capture.maps[0][b, :n, :n], heads * torch.eye(n))
        assert not torch.allclose(plan.capture.maps[1][b, :n, :n], heads * torch.eye(n))
    # The fast (SDPA, masked) path equals the written-out one under isolation.
    with torch.inference_mode():
        fast = final_hidden(tiny_lm, prompts, AttentionPlan(isolation=Isolation(frozenset({0, 2}), labels_only)))
        slow = final_hidden(tiny_lm, prompts, AttentionPlan(isolation=Isolation(frozenset({0, 2}), labels_only),
                                                            explicit=True))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_fast_target_rows_equal_the_full_maps(tiny_lm):
    prompts = _prompts(tiny_lm)
    fast, full = AttentionPlan(capture_target_weights=True), AttentionPlan(capture_maps=True)
    with torch.inference_mode():
        final_hidden(tiny_lm, prompts, fast)
        final_hidden(tiny_lm, prompts, full)
    for layer, weights in fast.capture.target_weights.items():
        for b, p in enumerate(prompts):
            torch.testing.assert_close(weights[b].sum(0), full.capture.maps[layer][b, p.target], atol=1e-5, rtol=0)


def test_layers_and_random_positions():
    assert isolated_layers("first", 3, 30) == {0, 1, 2}
    assert isolated_layers("last", 2, 30) == {28, 29}
    assert isolated_layers("last", 0, 30) == frozenset()
    prompt = _FakePrompt(ids=tuple(range(20)), label_positions=(4, 9, 14))
    picked = random_positions(prompt, np.random.default_rng(0))
    assert len(picked) == 3 and not set(picked) & {4, 9, 14} and max(picked) <= 17
    assert picked == random_positions(prompt, np.random.default_rng(0))


class _FakePrompt:
    def __init__(self, ids, label_positions):
        self.ids, self.label_positions = ids, label_positions
        self.target = len(ids) - 1


def test_auc_and_r_match_hand_values():
    predicted = np.array([0, 0, 1, 1])
    scores = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    assert auc_roc(predicted, scores) == pytest.approx(0.75)  # 3 of the 4 (1, 0) pairs are ordered
    assert np.isnan(auc_roc(np.array([1, 1]), scores[:2]))
    three = np.array([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    # Class 1 is never predicted: drop it, renormalise over classes 0 and 2, binary AUC.
    kept = three[:, [0, 2]] / three[:, [0, 2]].sum(1, keepdims=True)
    assert auc_roc(np.array([0, 2, 0, 2]), three) == pytest.approx(roc_auc_score([0, 1, 0, 1], kept[:, 1]))
    np.testing.assert_allclose(r_curve(np.array([0.5, 0.7, 0.9])), [0, 1 / 3, 1])


def test_confusions_and_their_correlation():
    keys = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    queries = np.random.default_rng(0).normal(size=(50, 2))
    pred = predicted_confusion(queries, keys, 2)
    assert pred.max() == 1 and pred[0, 1] < pred[0, 2]  # classes 0 and 1 look alike
    probs = np.array([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8]])
    real = real_confusion(probs, np.array([0, 0, 1, 2]))
    assert real[0, 1] == pytest.approx(1.0)  # p0/p1: 8 and 0.8 (gold 0) vs 0.5 (gold 1)
    assert np.isnan(real_confusion(probs, np.array([0, 0, 0, 0]))[0, 1])
    assert pair_spearman(pred, pred) == pytest.approx(1.0)
    assert pair_spearman(pred[:2, :2], pred[:2, :2]) is None  # one pair: no correlation


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_analysis_runs_reports_and_plots(tiny_lm, kind):
    data = AnalysisData(task=sentiment_task(), test=ROWS, train=ROWS)
    params = {"error_diagnosis": {"contexts": 2}, "isolation": {"seeds": [1], "ks": [0, 1]}}.get(kind, {"seeds": [1]})
    seen = []
    out = analyse(tiny_lm, kind, data, params, JobControl(on_progress=lambda d, t: seen.append((d, t))))
    json.dumps(out.results, allow_nan=False)
    assert out.results["kind"] == kind and out.results["layers"] == 3
    assert all(png.startswith(b"\x89PNG") for png in out.plots.values()) and out.plots
    assert seen and seen[-1][0] == seen[-1][1]
    named = {"saliency": ["s_wp", "s_pq", "s_ww"], "deep_layers": ["auc_roc", "r"],
             "isolation": ["label_loyalty", "word_loyalty"], "error_diagnosis": ["spearman"]}[kind]
    assert all(name in out.results for name in named)
    assert isinstance(out.results["warnings"], list) and all(isinstance(w, str) for w in out.results["warnings"])
    if kind == "isolation":
        assert out.results["label_loyalty"]["first"]["label"]["0"] == 100.0
    if kind == "error_diagnosis":  # two classes make one pair: no correlation, and the results say why
        assert out.results["spearman"] is None
        assert any("Spearman" in w and "2 classes" in w for w in out.results["warnings"])


def test_per_layer_arrays_and_normalisation(tiny_lm):
    data = AnalysisData(task=sentiment_task(), test=ROWS, train=ROWS)
    res = analyse(tiny_lm, "saliency", data, {"seeds": [1, 2]}).results
    assert res["sampling"] == "per_example"
    totals = np.array(res["s_wp"]) + np.array(res["s_pq"]) + np.array(res["s_ww"])
    np.testing.assert_allclose(totals, 1.0)
    fixed = analyse(tiny_lm, "saliency", AnalysisData(task=sentiment_task(), test=ROWS), {"seeds": [1]})
    assert fixed.results["sampling"] == "fixed"


def test_bad_params_and_cancellation(tiny_lm):
    with pytest.raises(ValidationError, match="ks"):
        parse_params("isolation", {"ks": "many"})
    with pytest.raises(ValidationError, match="unknown analysis"):
        parse_params("tea_leaves", {})
    with pytest.raises(ValidationError, match="seedz"):
        parse_params("saliency", {"seedz": [1]})
    data = AnalysisData(task=sentiment_task(), test=ROWS)
    with pytest.raises(ValidationError, match="per-example"):
        analyse(tiny_lm, "saliency", data, {"sampling": "per_example"})
    with pytest.raises(Cancelled):
        analyse(tiny_lm, "deep_layers", data, {}, JobControl(should_stop=lambda: True))
    for kind in ("saliency", "isolation", "deep_layers"):
        with pytest.raises(ValidationError, match="longer than max_tokens"):
            extra = {"ks": [1]} if kind == "isolation" else {}
            analyse(tiny_lm, kind, data, {"seeds": [1], "max_tokens": 8} | extra)
    with pytest.raises(ValidationError, match="max_map_values"):
        analyse(tiny_lm, "deep_layers", data, {"seeds": [1], "attention_maps": 2, "max_map_values": 10})


# Degenerate results carry warnings in words (a deep_layers job once returned null AUCs and an empty plot, silently)


@pytest.fixture()
def one_class_model(monkeypatch):
    """Every deep-layer prediction becomes class 1 ('Positive'), as a label-biased model's would."""
    def always_positive(lm, hidden, label_ids):
        return torch.tensor([[0.0, 1.0]]).expand(hidden.shape[0], -1)

    monkeypatch.setattr(deep_layers, "label_logits", always_positive)


def test_deep_layers_warns_when_every_prediction_is_one_class(tiny_lm, one_class_model):
    data = AnalysisData(task=sentiment_task(), test=ROWS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no 0/0 on the way
        out = analyse(tiny_lm, "deep_layers", data, {"seeds": [1, 2]})
    res = json.loads(json.dumps(out.results, allow_nan=False))
    assert res["auc_roc"] == [None] * 3 and res["r"] == [None] * 3
    assert res["warnings"] == ["every prediction was class 'Positive', so AUCROC_l is undefined in all layers and "
                               "R_l with it (both null); the plot is empty"]
    assert out.plots["deep_layers"].startswith(b"\x89PNG")


def test_deep_layer_warnings_name_partial_and_unbalanced_cases():
    labels, mixed = ["a", "b", "c"], np.array([0, 2, 0, 2])
    auc = np.array([0.6, 0.8])
    assert deep_layers.degenerate(labels[:2], [1, 2], [np.array([0, 1]), np.array([1, 0])], auc) == []
    partial = deep_layers.degenerate(labels, [1, 2], [np.array([1, 1]), mixed], auc)
    assert partial[0] == ("seed 1 predicted only 'b', so AUCROC_l there is undefined; the means cover the other 1 "
                          "of 2 seeds")
    assert partial[1].startswith("classes never predicted in some seeds: 'b' (1 of 1)")
    assert "R_l is undefined" in deep_layers.degenerate(labels, [1], [mixed], np.array([0.6, 0.4]))[-1]
    assert "below 0.5 on balance" in deep_layers.degenerate(labels, [1], [mixed], np.array([0.4, 0.45]))[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert np.isnan(r_curve(np.array([0.6, 0.4]))).all()


def test_saliency_isolation_and_error_diagnosis_name_what_is_undefined():
    flows_ = np.array([[0.5, np.nan], [0.3, np.nan], [0.2, np.nan]])  # (3 flows, 2 layers): layer 1 had no saliency
    assert saliency.degenerate([42, 43], [flows_, flows_[:, :1]]) == [
        "the flows are undefined (null) in layers 1 for seed 42: the saliency there summed to zero or was not "
        "finite, so those layers' means are null too"]
    said = isolation.degenerate(["Negative", "Positive"], [1, 2], [np.array([1, 1]), np.array([0, 1])], 2)
    assert said[0].startswith("the unmodified model predicted 'Positive' for every row (seed 1)")
    assert said[1].startswith("2 prompt(s) had fewer other positions than label words")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        same_keys = predicted_confusion(np.random.default_rng(0).normal(size=(20, 2)), np.ones((3, 2)), 2)
    assert np.isnan(same_keys[0, 1]) and pair_spearman(same_keys, same_keys) is None
    said = error_diagnosis.degenerate(["a", "b", "c"], np.array([0, 0, 1]), same_keys, None, 64, 64, True)
    assert said == ["no analysed row has gold class 'c', so the real confusion of its pairs is undefined (null)",
                    "every label word has the same key in the PCA subspace, so the predicted confusion is undefined "
                    "(null)",
                    "the Spearman correlation is undefined (null): fewer than 3 class pairs have both confusions, or "
                    "one of them is the same for every pair"]


def test_server_analysis_status_passes_the_warnings_through(serve, one_class_model):
    client = serve(admin_api_key="admin-secret")
    rows = [{"text": r.text, "label": ["Negative", "Positive"][r.label]} for r in ROWS]
    started = client.post("/admin/analyses", headers=ADMIN, json={
        "kind": "deep_layers", "task": "sentiment", "data": {"examples": rows}, "params": {"seeds": [1]}})
    assert started.status_code == 202, started.text
    job = wait_finished(client, started.json()["status_url"])
    assert job["status"] == "succeeded", job["error"]
    assert job["results"]["warnings"][0].startswith("every prediction was class 'Positive'")
    assert job["results"]["auc_roc"] == [None] * 3
