"""Requests and expectations from vLLM's and TEI's own tests of their classify endpoints, replayed here.

vLLM: tests/entrypoints/pooling/classify/test_online.py (a 2-class classifier served with
`--max-model-len 512`); TEI: router/tests/test_http_predict.rs. Their inputs and their checks are
kept; the model is conftest's tiny one serving the sentiment task (labels Negative and Positive), and
the server's max_input_tokens is 512, as their max-model-len. vLLM's chat requests (`messages`) and
its /tokenize, /pooling, /score and /rerank routes have no counterpart here and are not replayed.
"""

from __future__ import annotations

import math

import pytest
from transformers import AutoTokenizer

from tests.conftest import sentiment_task

INPUT_TEXT = "This product was excellent and exceeded my expectations"
LABELS = sentiment_task().labels


@pytest.fixture
def client(serve):
    return serve(max_input_tokens=512)


@pytest.fixture
def model_name(client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


def check_classification(body: dict, model_name: str, n: int) -> None:
    """What vLLM's tests read from a ClassificationResponse."""
    assert body["object"] == "list" and body["model"] == model_name and len(body["data"]) == n
    for i, item in enumerate(body["data"]):
        assert item["index"] == i and item["label"] in LABELS
        assert len(item["probs"]) == item["num_classes"] == len(LABELS)


def test_vllm_completion_request_text_and_token_ids(client, model_name, model_dir):
    body = client.post("/classify", json={"model": model_name, "input": INPUT_TEXT})
    assert body.status_code == 200, body.text
    check_classification(body.json(), model_name, 1)
    tokens = AutoTokenizer.from_pretrained(model_dir)(INPUT_TEXT, add_special_tokens=False)["input_ids"]
    by_ids = client.post("/classify", json={"model": model_name, "input": tokens})
    assert by_ids.status_code == 200, by_ids.text
    check_classification(by_ids.json(), model_name, 1)


def test_vllm_completion_request_batched(client, model_name, model_dir):
    n = 10
    check_classification(client.post("/classify", json={"model": model_name, "input": [INPUT_TEXT] * n}).json(),
                         model_name, n)
    tokens = AutoTokenizer.from_pretrained(model_dir)(INPUT_TEXT, add_special_tokens=False)["input_ids"]
    check_classification(client.post("/classify", json={"model": model_name, "input": [tokens] * n}).json(),
                         model_name, n)


@pytest.mark.parametrize("empty", ["", []])
def test_vllm_empty_input_error(client, model_name, empty):
    response = client.post("/classify", json={"model": model_name, "input": empty})
    assert response.status_code == 400 and "error" in response.json()


def test_vllm_truncate_prompt_tokens(client, model_name):
    response = client.post("/classify", json={"model": model_name, "input": "hello " * 600,
                                              "truncate_prompt_tokens": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == 1 and body["data"][0]["index"] == 0 and "probs" in body["data"][0]
    # vLLM's input is the whole prompt (5 tokens); here the task's template adds its own
    template = client.post("/classify", json={"model": model_name, "input": "hello", "truncate_prompt_tokens": 0})
    prompt_tokens = 5 + template.json()["usage"]["prompt_tokens"]
    assert body["usage"]["prompt_tokens"] == prompt_tokens and body["usage"]["total_tokens"] == prompt_tokens
    invalid = client.post("/classify", json={"model": model_name, "input": "test", "truncate_prompt_tokens": 513})
    assert invalid.status_code == 400
    assert "truncate_prompt_tokens" in invalid.json()["error"]["message"]


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_vllm_add_special_tokens(client, model_name, add_special_tokens):
    response = client.post("/classify", json={"model": model_name, "input": INPUT_TEXT,
                                              "add_special_tokens": add_special_tokens})
    assert response.status_code == 200, response.text
    check_classification(response.json(), model_name, 1)


def test_vllm_invocations_completion_request(client):
    request_args = {"model": client.get("/v1/models").json()["data"][0]["id"], "input": INPUT_TEXT}
    classification = client.post("/classify", json=request_args)
    invocation = client.post("/invocations", json=request_args)
    assert classification.status_code == invocation.status_code == 200, invocation.text
    classification_output, invocation_output = classification.json(), invocation.json()
    assert classification_output.keys() == invocation_output.keys()
    for classification_data, invocation_data in zip(classification_output["data"], invocation_output["data"],
                                                    strict=True):
        assert classification_data.keys() == invocation_data.keys()
        assert classification_data["probs"] == pytest.approx(invocation_data["probs"], rel=0.01)


def test_vllm_use_activation(client, model_name):
    def get_outputs(use_activation):
        response = client.post("/classify", json={"model": model_name, "input": INPUT_TEXT,
                                                  "use_activation": use_activation})
        return response.json()["data"][0]["probs"]

    default, w_activation, wo_activation = get_outputs(None), get_outputs(True), get_outputs(False)
    assert default == pytest.approx(w_activation, abs=1e-2), "Default should use activation."
    assert wo_activation != pytest.approx(w_activation, abs=1e-2), "wo_activation should not use activation."
    total = sum(math.exp(x) for x in wo_activation)
    softmax = [math.exp(x) / total for x in wo_activation]
    assert softmax == pytest.approx(w_activation, abs=1e-2), "w_activation: activation(wo_activation)."


def test_tei_predict_single_and_batch(client):
    """TEI's test_predict: every label with its score, highest first; each row of a batch of the same
    input equals the single answer (TEI's snapshots agree to about 1e-7)."""
    single = client.post("/predict", json={"inputs": "test"})
    assert single.status_code == 200, single.text
    predictions_single = single.json()
    assert sorted(p["label"] for p in predictions_single) == sorted(LABELS)
    scores = [p["score"] for p in predictions_single]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-6)
    batch = client.post("/predict", json={"inputs": [["test"]] * 5})
    assert batch.status_code == 200, batch.text
    predictions_batch = batch.json()
    assert len(predictions_batch) == 5
    for predictions in predictions_batch:
        assert [p["label"] for p in predictions] == [p["label"] for p in predictions_single]
        assert [p["score"] for p in predictions] == pytest.approx(scores, abs=1e-6)
