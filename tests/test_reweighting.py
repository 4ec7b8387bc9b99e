"""Anchor re-weighting: β = 0 is vanilla, the fast path equals the written-out formula, only β learns."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from anchor_cache import Classifier, Method, ValidationError, reweighting
from anchor_cache.forward import label_logits, last_hidden
from anchor_cache.reweighting import Cancelled, TrainConfig, train_reweighting
from tests.conftest import QUERIES, sentiment_task

METHODS = (Method.HIDDEN_ANCHOR, Method.VANILLA)


def _logits(clf: Classifier, method: Method, plan=None) -> torch.Tensor:
    queries = clf.encode(QUERIES)
    with torch.no_grad():
        return label_logits(clf.lm, last_hidden(clf.lm, clf.prefix(method), queries, plan), clf.prompt.label_ids)


def _random_beta(clf: Classifier) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn_like(clf.zero_beta())


@pytest.mark.parametrize("method", METHODS)
def test_zero_beta_changes_nothing(tiny_lm, method):
    clf = Classifier(tiny_lm, sentiment_task())
    plain = _logits(clf, method)
    torch.testing.assert_close(_logits(clf, method, clf.reweighting_plan(method, clf.zero_beta())), plain,
                               atol=1e-5, rtol=0)
    assert (_logits(clf, method, clf.reweighting_plan(method, _random_beta(clf))) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_fast_path_matches_the_explicit_formula(tiny_lm, method):
    """Padded batch of different lengths: SDPA + target-row correction == written-out Â·v."""
    clf = Classifier(tiny_lm, sentiment_task())
    plan = clf.reweighting_plan(method, _random_beta(clf))
    fast = _logits(clf, method, plan)
    explicit = _logits(clf, method, dataclasses.replace(plan, explicit=True))
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=0)


def test_explicit_weights_scale_only_the_target_row(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    beta = torch.full_like(clf.zero_beta(), 0.5)
    plan = dataclasses.replace(clf.reweighting_plan(Method.VANILLA, beta), record_weights=True)
    ids = torch.tensor([list(clf.prompt.context.ids) + clf.encode(["dull"])[0]])
    plain_plan = dataclasses.replace(plan, reweighting=None)
    with torch.no_grad():
        base = tiny_lm.model.base_model(input_ids=ids, output_attentions=True, anchor_plan=plain_plan).attentions
        plan = dataclasses.replace(plan, targets=torch.tensor([ids.shape[1] - 1]))
        scaled = tiny_lm.model.base_model(input_ids=ids, output_attentions=True, anchor_plan=plan).attentions
    labels = list(clf.prompt.context.label_positions)
    ratio = scaled[0][0, :, -1, labels] / base[0][0, :, -1, labels]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(torch.exp(torch.tensor(0.5)))))
    torch.testing.assert_close(scaled[0][0, :, :-1], base[0][0, :, :-1])  # other rows untouched, no renorm


def test_training_moves_only_beta_and_lowers_the_loss(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    texts = ["a wonderful film", "dull and lifeless", "moving", "a waste"] * 2
    labels = [1, 0, 1, 0] * 2
    result = train_reweighting(clf, texts, labels, TrainConfig(lr=0.1, epochs=5), progress=False)
    assert result.beta.abs().sum() > 0 and not result.beta.requires_grad
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert len(result.step_losses) == 5 * len(texts)
    assert all(p.grad is None and not p.requires_grad for p in tiny_lm.model.parameters())


def test_dev_split_keeps_the_best_beta_and_stops_early(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    cfg = TrainConfig(lr=0.5, epochs=30, batch_size=2, patience=2)
    result = train_reweighting(clf, ["a", "b", "c", "d"], [0, 1, 0, 1], cfg, dev=(["e", "f"], [1, 0]), progress=False)
    assert len(result.dev_losses) < 30
    assert len(result.epoch_losses) == len(result.dev_losses)


def test_reweighting_needs_label_words(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    with pytest.raises(ValidationError, match="label words"):
        clf.reweighting_plan(Method.ZERO_SHOT, clf.zero_beta())
    with pytest.raises(ValidationError, match="shape"):
        clf.reweighting_plan(Method.HIDDEN_ANCHOR, torch.zeros(1, 1, 1))


def test_calibration_matches_a_hand_computation(tiny_lm):
    from anchor_cache.classifier import CONTENT_FREE_INPUTS, calibrate

    clf = Classifier(tiny_lm, sentiment_task())
    content_free = clf.content_free_logprobs(Method.HIDDEN_ANCHOR)
    by_hand = torch.stack([torch.softmax(clf.label_logits([t], Method.HIDDEN_ANCHOR)[0], -1)
                           for t in CONTENT_FREE_INPUTS]).mean(0)
    torch.testing.assert_close(content_free.exp(), by_hand, atol=1e-6, rtol=0)
    logits = clf.label_logits(QUERIES, Method.HIDDEN_ANCHOR)
    expected = torch.softmax(logits, -1) / by_hand
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(torch.softmax(calibrate(logits, content_free), -1), expected, atol=1e-6, rtol=0)


def test_eval_runs_reweighting_and_calibration_variants(tiny_lm, dataset_dir):
    from anchor_cache.evaluate import EvalConfig, evaluate
    from anchor_cache.reweighting import TrainConfig

    methods = ["hidden_anchor", "vanilla_reweighted", "hidden_anchor_reweighted", "calibrated",
               "hidden_anchor_reweighted_calibrated"]
    cfg = EvalConfig(data=dataset_dir, template="Review: {text}\nSentiment:", labels=["Negative", "Positive"],
                     methods=methods, seeds=[42], limit=6, train_per_class=2, reweight=TrainConfig(epochs=2))
    results = evaluate(tiny_lm, cfg, progress=False)
    assert list(results["methods"]) == ["vanilla", *methods]
    assert results["config"]["reweight"]["epochs"] == 2


@pytest.mark.parametrize("method", METHODS)
def test_training_shortcut_equals_the_full_forward(tiny_lm, method):
    """Training caches everything before the last token once; with β ≠ 0 the logits are unchanged."""
    from anchor_cache.reweighting import _examples, _loss

    clf = Classifier(tiny_lm, sentiment_task())
    plan = clf.reweighting_plan(method, _random_beta(clf))
    examples = _examples(clf, clf.prefix(method), QUERIES, [0, 1, 0])
    full = torch.nn.functional.cross_entropy(_logits(clf, method, plan), torch.tensor([0, 1, 0]))
    with torch.no_grad():
        shortcut = _loss(clf, plan, examples)
    torch.testing.assert_close(shortcut, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", [*METHODS, Method.MANY_SHOT])
def test_a_batched_step_equals_its_examples_one_at_a_time(tiny_lm, method):
    """One forward of several examples' last tokens, each behind its own padded cache (and the
    many-shot key bias), gives the loss and the gradient of β of those examples taken one by one."""
    from anchor_cache.reweighting import _examples, _loss

    pool = [{"text": t, "label": label} for t, label in (("a fine film", "Positive"), ("a dull one", "Negative"))]
    clf = Classifier(tiny_lm, sentiment_task(examples=pool, method=method))
    examples = _examples(clf, clf.prefix(method), [*QUERIES, "ok"], [0, 1, 0, 1])
    assert len({ex.before_last.cache.num_tokens for ex in examples}) > 1  # padding is exercised

    def loss_and_grad(batch):
        beta = _random_beta(clf).requires_grad_(True)
        loss = _loss(clf, clf.reweighting_plan(method, beta), batch)
        loss.backward()
        return loss.detach(), beta.grad

    batched, batched_grad = loss_and_grad(examples)
    singles = [loss_and_grad([ex]) for ex in examples]
    torch.testing.assert_close(batched, torch.stack([s[0] for s in singles]).mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(batched_grad, torch.stack([s[1] for s in singles]).mean(0), atol=1e-5, rtol=1e-4)


def test_a_cancel_is_heard_between_the_rows_of_the_precompute(tiny_lm, monkeypatch):
    """Each training row costs a forward before the first step: a large pool must stop at the next
    row once cancelled, not after all of them."""
    extended = []
    real = reweighting.extend_cache
    monkeypatch.setattr(reweighting, "extend_cache", lambda *a: extended.append(1) or real(*a))
    polls = []

    def cancelled_after_three() -> bool:
        polls.append(1)
        return len(polls) > 3

    texts = QUERIES * 20
    with pytest.raises(Cancelled):
        train_reweighting(Classifier(tiny_lm, sentiment_task()), texts, [0, 1, 0] * 20, progress=False,
                          should_stop=cancelled_after_three)
    assert len(extended) == 3  # of 60 rows
