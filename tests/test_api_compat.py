"""Drop-in HTTP API for vLLM and TEI users, on the tiny Llama model (in process) and a real server.

- `POST /v1/classify` in vLLM's classify shape (`index`, `label`, `probs` list, `num_classes`), the
  per-label maps beside it, `model` checked against `GET /v1/models`, the default task;
- TEI's `POST /predict` (`[{label, score}]` by descending score, nested for a batch, `raw_scores`);
- per-request `truncate` / `truncation_direction`, TEI's timing headers, the request id in the body;
- `/docs` rendered by a real headless Chromium with every request kept on loopback.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser

import httpx
import pytest

from anchor_cache import Classifier, load_model
from clients import protocol as client_protocol
from server import protocol as server_protocol
from server.protocol import ClassifyResponse, ModelList
from tests.conftest import QUERIES, error_of, sentiment_task
from tests.test_uvicorn import running_server

TOPICS = sentiment_task(name="topics", labels=["World", "Sports", "Business"], demonstrations=[
    {"text": "the match ended in a draw", "label": "Sports"}, {"text": "markets fell", "label": "Business"},
    {"text": "talks in the capital", "label": "World"}])
TIMING = ("x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time")
# Distinct words at each end of a long input, so the kept part shows which end a cut removed.
LONG = "wonderful moving film " * 15 + "dull lifeless waste " * 15


def labels_of(client, task: str = "sentiment") -> list[str]:
    return client.get(f"/v1/tasks/{task}").json()["labels"]


def slow_forwards(client, seconds: float) -> None:
    """Every forward takes `seconds` longer (as tests/test_server.py slows the model thread)."""
    engine = client.app.state.anchor.engine
    run = engine._run_batch

    def slow_run(*args):
        time.sleep(seconds)
        return run(*args)

    engine.scheduler.run_batch = slow_run


# --- vLLM's classify shape ----------------------------------------------------------------------------


def test_classify_has_vllms_shape_field_by_field(serve, model_dir):
    client = serve()
    model = client.get("/v1/models").json()["data"][0]["id"]
    response = client.post("/v1/classify", json={"model": model, "task": "sentiment", "input": QUERIES})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["object"] == "list" and body["model"] == model == client.get("/info").json()["model"]
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 60
    usage = body["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0 and usage["completion_tokens"] == 0
    labels = labels_of(client)
    want = Classifier(load_model(str(model_dir), "cpu", "float32"), sentiment_task()).classify(QUERIES)
    for position, (item, expected) in enumerate(zip(body["data"], want, strict=True)):
        assert set(item) == {"index", "label", "probs", "num_classes", "label_probs", "label_logprobs",
                             "raw_label_probs"}
        assert item["index"] == position  # the input's position, not the predicted class
        assert isinstance(item["probs"], list) and all(isinstance(p, float) for p in item["probs"])
        assert math.isclose(sum(item["probs"]), 1.0, abs_tol=1e-6)
        assert item["num_classes"] == len(item["probs"]) == len(labels) == 2
        # probs in label order, equal to the engine's per-label probabilities
        assert item["probs"] == pytest.approx([expected.probs[label] for label in labels], abs=1e-5)
        assert item["label"] == labels[item["probs"].index(max(item["probs"]))] == expected.label
        assert item["label_probs"] == dict(zip(labels, item["probs"], strict=True))
        assert [math.exp(item["label_logprobs"][label]) for label in labels] == pytest.approx(item["probs"], abs=1e-6)
        assert item["raw_label_probs"] == pytest.approx(expected.raw_probs, abs=1e-5)  # no pool: calibrated
    parsed = ClassifyResponse.model_validate(body)
    assert [d.index for d in parsed.data] == [0, 1, 2]


def test_index_is_the_input_position_for_any_prediction(serve):
    client = serve(tasks=[TOPICS])
    data = client.post("/v1/classify", json={"task": "topics", "input": ["markets fell"] * 5}).json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2, 3, 4]  # one predicted class, five positions
    assert {d["num_classes"] for d in data} == {3} and len({d["label"] for d in data}) == 1


def test_calibrated_task_keeps_raw_probabilities_under_their_own_name(serve):
    client = serve(tasks=[sentiment_task(calibrate=True)])
    labels = labels_of(client)
    for item in client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]:
        raw = item["raw_label_probs"]
        assert set(raw) == set(labels) and math.isclose(sum(raw.values()), 1.0, abs_tol=1e-6)
        assert [raw[label] for label in labels] != pytest.approx(item["probs"], abs=1e-6)  # calibration moved them
        assert item["label_probs"] == dict(zip(labels, item["probs"], strict=True))


def test_a_calibrated_task_calibrates_a_method_a_request_asks_for(serve):
    """A request naming another method than the task's own is calibrated against that method's own
    content-free scores, not silently left raw."""
    client = serve(tasks=[sentiment_task(calibrate=True)])
    for method in ("vanilla", "zero_shot", "hidden_anchor"):
        for item in client.post("/v1/classify", json={"input": QUERIES, "method": method}).json()["data"]:
            raw = item["raw_label_probs"]
            assert raw is not None, method
            assert [raw[label] for label in labels_of(client)] != pytest.approx(item["probs"], abs=1e-6), method


# --- model, models and the default task -------------------------------------------------------------


def test_models_list_and_the_model_field(serve, model_dir):
    client = serve()
    listed = client.get("/v1/models")
    assert listed.status_code == 200
    body = listed.json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert set(card) == {"id", "object", "created", "owned_by"} and card["object"] == "model"
    assert card["id"] == model_dir.name and isinstance(card["created"], int) and isinstance(card["owned_by"], str)
    ModelList.model_validate(body)
    for name in (card["id"], str(model_dir)):  # the served name, or the `model` setting it was loaded from
        ok = client.post("/v1/classify", json={"model": name, "task": "sentiment", "input": "x"})
        assert ok.status_code == 200, ok.text
    message = error_of(client.post("/v1/classify", json={"model": "gpt-4o", "task": "sentiment", "input": "x"}),
                       404, "model_not_found")
    assert "'gpt-4o'" in message and card["id"] in message


def test_a_vllm_body_without_task_uses_the_default_task(serve):
    client = serve(tasks=[sentiment_task(), TOPICS], default_task="topics")
    model = client.get("/v1/models").json()["data"][0]["id"]
    data = client.post("/v1/classify", json={"model": model, "input": "markets fell"}).json()["data"]
    assert set(data[0]["label_probs"]) == {"World", "Sports", "Business"}
    named = client.post("/v1/classify", json={"task": "sentiment", "input": "markets fell"}).json()["data"]
    assert set(named[0]["label_probs"]) == {"Negative", "Positive"}
    first = serve(tasks=[TOPICS, sentiment_task()])  # without default_task: the first configured task
    assert {s["label"] for s in first.post("/predict", json={"inputs": "x"}).json()} == {"World", "Sports", "Business"}


def test_predict_and_models_need_the_api_key(serve):
    client = serve(api_key="user-secret")
    error_of(client.post("/predict", json={"inputs": "x"}), 401, "unauthorized")
    error_of(client.get("/v1/models"), 401, "unauthorized")
    key = {"Authorization": "Bearer user-secret"}
    assert client.post("/predict", json={"inputs": "x"}, headers=key).status_code == 200
    assert client.get("/v1/models", headers=key).status_code == 200


# --- TEI's /predict ---------------------------------------------------------------------------------


def test_predict_single_and_batch_sorted_like_tei(serve):
    client = serve(tasks=[TOPICS])
    classified = client.post("/v1/classify", json={"task": "topics", "input": QUERIES}).json()["data"]
    for inputs in (QUERIES[0], [QUERIES[0]]):  # a string, or [string]: one input, a flat answer
        single = client.post("/predict", json={"inputs": inputs})
        assert single.status_code == 200, single.text
        scores = single.json()
        assert [set(s) for s in scores] == [{"label", "score"}] * 3
        assert [s["score"] for s in scores] == sorted((s["score"] for s in scores), reverse=True)
        assert {s["label"]: s["score"] for s in scores} == pytest.approx(classified[0]["label_probs"], abs=1e-6)
        assert scores[0]["label"] == classified[0]["label"]
    batch = client.post("/predict", json={"inputs": [[q] for q in QUERIES]}).json()
    assert len(batch) == len(QUERIES)
    for row, item in zip(batch, classified, strict=True):  # in input order, each sorted
        assert [s["score"] for s in row] == sorted((s["score"] for s in row), reverse=True)
        assert {s["label"]: s["score"] for s in row} == pytest.approx(item["label_probs"], abs=1e-6)


def test_predict_raw_scores_are_the_logits(serve):
    client = serve(tasks=[TOPICS])
    probs = client.post("/predict", json={"inputs": [["markets fell"], ["a draw"]]}).json()
    raw = client.post("/predict", json={"inputs": [["markets fell"], ["a draw"]], "raw_scores": True}).json()
    for p_row, r_row in zip(probs, raw, strict=True):
        assert [s["score"] for s in r_row] == sorted((s["score"] for s in r_row), reverse=True)
        logits = {s["label"]: s["score"] for s in r_row}
        assert not math.isclose(sum(logits.values()), 1.0, abs_tol=1e-3)  # not probabilities
        norm = math.log(sum(math.exp(v) for v in logits.values()))
        softmax = {label: math.exp(v - norm) for label, v in logits.items()}
        assert softmax == pytest.approx({s["label"]: s["score"] for s in p_row}, abs=1e-6)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": ["a", "b"]}, "pairs"),
        ({"inputs": ["a", "b", "c"]}, "[[a], [b], ...]"),
        ({"inputs": [["a"], ["b", "c"]]}, "pairs"),
        ({"inputs": "x", "truncation_direction": "up"}, "truncation_direction"),
        ({"inputs": "x", "top_k": 2}, "top_k"),
    ],
)
def test_predict_refuses_what_it_cannot_mean(serve, body, message):
    assert message in error_of(serve().post("/predict", json=body), 422, "validation")


def test_predict_unknown_task_is_404(serve):
    error_of(serve().post("/predict", json={"inputs": "x", "task": "nope"}), 404, "not_found")


# --- truncation ------------------------------------------------------------------------------------


def kept_text(prompt, direction: str, max_tokens: int) -> str:
    """The part of LONG that survives a cut, read back from the token ids (template removed)."""
    ids = prompt.encode_within(LONG, max_tokens, direction)
    assert len(ids) <= max_tokens
    rendered = prompt.tokenizer.decode(ids)
    assert rendered.startswith("Review: ") and rendered.endswith("\nSentiment:")  # the template is never cut
    return rendered.removeprefix("Review: ").removesuffix("\nSentiment:")


def test_encode_within_cuts_the_chosen_end(model_dir):
    prompt = Classifier(load_model(str(model_dir), "cpu", "float32"), sentiment_task()).prompt
    right, left = kept_text(prompt, "right", 20), kept_text(prompt, "left", 20)
    assert LONG.startswith(right) and "wonderful" in right and "dull" not in right
    assert LONG.rstrip().endswith(left.rstrip()) and "dull" in left and "wonderful" not in left
    assert prompt.encode_within("dull", 20, "left") == prompt.encode_within("dull", 20) == prompt.encode("dull")


def test_truncation_direction_per_request(serve, model_dir):
    client = serve(max_input_tokens=20)  # the server's truncate setting is off
    error_of(client.post("/v1/classify", json={"task": "sentiment", "input": LONG}), 400, "input_limit")
    prompt = Classifier(load_model(str(model_dir), "cpu", "float32"), sentiment_task()).prompt
    answers = {}
    for direction in ("right", "left"):
        body = {"task": "sentiment", "input": LONG, "truncate": True, "truncation_direction": direction}
        response = client.post("/v1/classify", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] <= 20
        answers[direction] = response.json()["data"][0]["label_probs"]
        # the same as classifying the kept text itself
        kept = client.post("/v1/classify", json={"task": "sentiment", "input": kept_text(prompt, direction, 20)})
        assert answers[direction] == pytest.approx(kept.json()["data"][0]["label_probs"], abs=1e-6)
        predicted = client.post("/predict", json={"inputs": LONG, "truncate": True,
                                                  "truncation_direction": direction}).json()
        assert {s["label"]: s["score"] for s in predicted} == pytest.approx(answers[direction], abs=1e-6)
    assert answers["right"] != pytest.approx(answers["left"], abs=1e-6)
    server_truncates = serve(max_input_tokens=20, truncate=True)
    default = server_truncates.post("/v1/classify", json={"task": "sentiment", "input": LONG}).json()["data"][0]
    assert default["label_probs"] == pytest.approx(answers["right"], abs=1e-6)  # right, as TEI's default
    refused = {"task": "sentiment", "input": LONG, "truncate": False}
    error_of(server_truncates.post("/v1/classify", json=refused), 400, "input_limit")


# --- timing headers and the request id ----------------------------------------------------------------


def timing_of(response) -> dict[str, int]:
    values = {name: response.headers[name] for name in (*TIMING, "x-compute-tokens", "x-compute-time",
                                                          "x-compute-characters")}
    assert all(v.isdigit() for v in values.values()), values  # whole milliseconds, as TEI sends them
    return {name: int(v) for name, v in values.items()}


def test_timing_headers_measure_the_request(serve):
    client = serve()
    response = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES})
    timing = timing_of(response)
    assert timing["x-compute-tokens"] == response.json()["usage"]["prompt_tokens"]
    assert timing["x-compute-characters"] == sum(len(q) for q in QUERIES)
    assert timing["x-compute-time"] == timing["x-total-time"]
    assert response.headers["x-compute-type"] == "cpu"  # TEI's: the device the model runs on
    assert timing["x-total-time"] >= sum(timing[name] for name in TIMING[1:])
    slow_forwards(client, 0.3)
    for response in (client.post("/v1/classify", json={"task": "sentiment", "input": "x"}),
                     client.post("/predict", json={"inputs": [["x"], ["y"]]})):
        assert response.status_code == 200, response.text
        timing = timing_of(response)
        assert timing["x-inference-time"] >= 300 and timing["x-tokenization-time"] < 300
        assert timing["x-total-time"] >= max(timing[name] for name in TIMING[1:])
        assert timing["x-total-time"] >= sum(timing[name] for name in TIMING[1:])


def test_queue_time_is_the_wait_for_the_first_forward(serve):
    """TEI's meaning: two requests that cannot share a batch (one row per batch); whichever goes
    second waits in the queue for the other's whole forward."""
    client = serve(max_batch_size=1)
    slow_forwards(client, 0.5)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda text: client.post("/v1/classify", json={"task": "sentiment", "input": text}),
                                ["x", "y"]))
    timings = sorted((timing_of(a) for a in answers), key=lambda t: t["x-queue-time"])
    assert timings[0]["x-queue-time"] < 400 <= timings[1]["x-queue-time"]
    assert all(t["x-inference-time"] >= 500 for t in timings)


def test_request_id_in_the_body_equals_the_header(serve):
    """vLLM's id form, classify-<id>, with the request's own id, as in X-Request-ID and the log."""
    client = serve()
    made = client.post("/v1/classify", json={"task": "sentiment", "input": "x"})
    assert made.json()["id"] == "classify-" + made.headers["x-request-id"] and len(made.headers["x-request-id"]) >= 16
    given = client.post("/v1/classify", json={"task": "sentiment", "input": "x"}, headers={"X-Request-ID": "req-42"})
    assert given.headers["x-request-id"] == "req-42" and given.json()["id"] == "classify-req-42"
    predicted = client.post("/predict", json={"inputs": "x"}, headers={"X-Request-ID": "req-43"})
    assert predicted.headers["x-request-id"] == "req-43"


# --- /docs in a real browser ---------------------------------------------------------------------------

CHROMIUM = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)


class Operations(HTMLParser):
    """The operation paths Swagger UI rendered: `data-path` of each `opblock-summary-path` inside an `opblock`."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: set[str] = set()
        self.opblocks = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if "opblock" in classes:
            self.opblocks += 1
        if "opblock-summary-path" in classes and self.opblocks:
            self.paths.add(dict(attrs).get("data-path") or "")


def test_docs_render_offline_in_a_real_browser(tmp_path):
    if CHROMIUM is None:
        message = "no chromium binary for the /docs browser check: apt-get install chromium (Debian's package)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with running_server(tmp_path) as url:
        page = httpx.get(f"{url}/docs").text
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            assert f'"/static/swagger/{asset}"' in page and httpx.get(f"{url}/static/swagger/{asset}").is_success
        assert "cdn.jsdelivr.net" not in page and "https://" not in page
        # Every host but loopback fails to resolve: a page that needed a CDN would stay blank.
        done = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
             "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", f"--user-data-dir={tmp_path / 'profile'}",
             "--dump-dom", f"{url}/docs"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    rendered = Operations()
    rendered.feed(done.stdout)
    assert rendered.opblocks > 10, done.stdout[:2000]
    assert {"/v1/classify", "/predict", "/v1/models", "/health"} <= rendered.paths, rendered.paths
    assert "cdn.jsdelivr.net" not in done.stdout


CLIENT_MODELS = [(client_protocol.ClassifyResponse, ClassifyResponse), (client_protocol.ModelList, ModelList),
                 (client_protocol.TaskList, server_protocol.TaskList),
                 (client_protocol.TaskInfo, server_protocol.TaskInfo),
                 (client_protocol.ClassificationData, server_protocol.ClassificationData),
                 (client_protocol.LabelScore, server_protocol.LabelScore)]


@pytest.mark.parametrize(("client_model", "server_model"), CLIENT_MODELS, ids=lambda m: m.__name__)
def test_the_clients_models_name_only_fields_the_server_sends(client_model, server_model):
    assert set(client_model.model_fields) <= set(server_model.model_fields), client_model.__name__


def test_the_clients_models_parse_real_responses(serve):
    client = serve()
    classified = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()
    parsed = client_protocol.ClassifyResponse.model_validate(classified)
    assert [d.label_probs for d in parsed.data] == [d["label_probs"] for d in classified["data"]]
    assert client_protocol.TaskList.model_validate(client.get("/v1/tasks").json()).data[0].name == "sentiment"
    assert client_protocol.ModelList.model_validate(client.get("/v1/models").json()).data
    predicted = client.post("/predict", json={"inputs": QUERIES[0]}).json()
    assert [client_protocol.LabelScore.model_validate(s).label for s in predicted] == [s["label"] for s in predicted]


# --- vLLM's and TEI's requests, as their clients send them --------------------------------------------


def test_vllm_path_and_request_fields(serve):
    """vLLM's clients post to /classify and may send truncate_prompt_tokens, user, priority,
    add_special_tokens, use_activation, cache_salt and truncation_side; each is taken."""
    client = serve()
    plain = client.post("/v1/classify", json={"input": QUERIES}).json()
    extras = {"user": "u-1", "priority": 0, "add_special_tokens": True, "cache_salt": "s", "truncation_side": "left"}
    same = client.post("/classify", json={"input": QUERIES, **extras})
    assert same.status_code == 200, same.text
    assert [d["probs"] for d in same.json()["data"]] == [d["probs"] for d in plain["data"]]
    assert same.json()["id"].startswith("classify-")
    usage = same.json()["usage"]
    anchors = client.get("/v1/tasks/sentiment").json()["anchor_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": anchors * len(QUERIES)} and anchors > 0
    logits = client.post("/classify", json={"input": QUERIES, "use_activation": False}).json()["data"]
    for row, probs in zip(logits, plain["data"], strict=True):
        exp = [math.exp(x) for x in row["probs"]]
        assert [e / sum(exp) for e in exp] == pytest.approx(probs["probs"], abs=1e-6)


def test_pipeline_parameters_apply_the_function_and_keep_the_top_k(serve):
    """Hugging Face's `parameters` as the text-classification pipeline means them: `none` gives the
    scores vLLM's `use_activation: false` gives, `sigmoid` those through a sigmoid, softmax (and
    unset) the probabilities; `top_k` keeps the k best, best first."""
    client = serve()
    labels = client.get("/v1/tasks/sentiment").json()["labels"]

    def by_label(body: dict) -> list[dict[str, float]]:
        answer = client.post("/classify", json={"input": QUERIES} | body)
        return [dict(zip(labels, d["probs"], strict=True)) for d in answer.json()["data"]]

    probs, logits = by_label({}), by_label({"use_activation": False})

    def scores(parameters: dict) -> list[dict[str, float]]:
        answer = client.post("/", json={"inputs": QUERIES, "parameters": parameters})
        assert answer.status_code == 200, answer.text
        rows = answer.json()
        for row in rows:
            assert [e["score"] for e in row] == sorted((e["score"] for e in row), reverse=True)
        return [{e["label"]: e["score"] for e in row} for row in rows]

    assert scores({}) == scores({"function_to_apply": "softmax"})
    for got, want in zip(scores({}), probs, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    for got, want in zip(scores({"function_to_apply": "none"}), logits, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    for got, want in zip(scores({"function_to_apply": "sigmoid"}), logits, strict=True):
        assert got == pytest.approx({k: 1 / (1 + math.exp(-x)) for k, x in want.items()}, abs=1e-6)
    top = scores({"top_k": 1, "function_to_apply": "none"})
    assert [list(row) for row in top] == [[max(row, key=row.get)] for row in logits]


def test_vllm_truncate_prompt_tokens_cuts_each_input(serve):
    client = serve(max_input_tokens=64)
    long_text = "a moving match " * 100
    assert client.post("/classify", json={"input": long_text}).status_code == 400
    for value in (-1, 8):
        cut = client.post("/classify", json={"input": long_text, "truncate_prompt_tokens": value})
        assert cut.status_code == 200, cut.text
    def usage(value: int) -> int:
        return client.post("/classify", json={"input": long_text, "truncate_prompt_tokens": value}).json()["usage"]

    template = usage(0)["prompt_tokens"]  # the template alone: hidden_anchor re-encodes no demonstration
    assert template > 0 and usage(8)["prompt_tokens"] == template + 8 and usage(-1)["prompt_tokens"] == 64
    assert usage(64)["prompt_tokens"] == 64  # never beyond max_input_tokens
    assert client.post("/classify", json={"input": "x", "truncate_prompt_tokens": -2}).status_code == 400
    assert "truncate_prompt_tokens" in error_of(
        client.post("/classify", json={"input": "x", "truncate_prompt_tokens": 65}), 400, "validation")


def test_vllm_token_id_input_reads_as_its_text(serve, model_dir):
    client = serve()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in QUERIES]
    by_text = client.post("/classify", json={"input": QUERIES}).json()["data"]
    by_ids = client.post("/classify", json={"input": ids}).json()["data"]
    one = client.post("/classify", json={"input": ids[0]}).json()["data"]
    for a, b in zip(by_ids, by_text, strict=True):
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-6)
    assert one[0]["probs"] == pytest.approx(by_text[0]["probs"], abs=1e-6)
    error_of(client.post("/classify", json={"input": [[len(tokenizer) + 5]]}), 400, "validation")
    error_of(client.post("/classify", json={"input": [[]]}), 400, "empty_input")


def test_tei_truncation_direction_in_either_case(serve):
    client = serve()
    for direction in ("Left", "Right", "left", "RIGHT"):
        response = client.post("/predict", json={"inputs": "a moving match", "truncation_direction": direction})
        assert response.status_code == 200, (direction, response.text)
    error_of(client.post("/predict", json={"inputs": "x", "truncation_direction": "middle"}), 422, "validation")


def test_tei_routes_answer_errors_in_teis_envelope_too(serve):
    """TEI's clients read `error_type`; this server's own routes keep {"error", "type"} alone."""
    client = serve()
    for path, body in (("/predict", {"inputs": "x", "raw_scores": 1}), ("/", {"inputs": 5}),
                       ("/invocations", {"inputs": 5})):
        response = client.post(path, json=body)
        assert response.status_code == 422 and response.json()["error_type"] == "validation", (path, response.text)
        assert response.json()["type"] == "validation"
    for path in ("/predict", "/", "/invocations"):
        response = client.post(path, json={"inputs": []})
        assert response.status_code == 400 and response.json()["error_type"] == "empty", (path, response.text)
    assert "error_type" not in client.post("/v1/classify", json={"input": []}).json()


@pytest.mark.parametrize("path", ["/v1/classify", "/classify", "/invocations"])
def test_vllm_routes_answer_openais_error_object(serve, path):
    """vLLM's clients read {"error": {"message", "type", "param", "code"}}, and 400 for any invalid
    request; `type` stays beside it. /invocations answers so for vLLM's body shape."""
    client = serve()
    response = client.post(path, json={"input": "x", "truncate_prompt_tokens": "five"})
    assert response.status_code == 400
    body = response.json()
    assert body["error"]["type"] == "BadRequestError" and body["error"]["code"] == 400
    assert "truncate_prompt_tokens" in body["error"]["message"] and body["type"] == "validation"
    missing = client.post(path, json={"input": "x", "task": "nope"}).json()
    assert missing["error"]["type"] == "NotFoundError" and missing["error"]["code"] == 404


def test_refusals_a_client_should_retry_say_when():
    from server.errors import error_response

    assert error_response("unavailable", "loading").headers["retry-after"] == "5"
    assert error_response("overloaded", "queue full").headers["retry-after"] == "1"
    assert "retry-after" not in error_response("validation", "no").headers


def test_info_carries_teis_fields_beside_its_own(serve):
    client = serve(max_input_tokens=100)
    info = client.get("/info").json()
    assert info["model_id"] == info["model"] and info["model_dtype"] == info["dtype"] == "float32"
    assert info["max_input_length"] == 100 and info["max_client_batch_size"] == info["max_inputs_per_request"]
    assert info["model_type"]["classifier"]["id2label"] == {str(i): label for i, label in enumerate(labels_of(client))}
    assert info["max_batch_requests"] == info["max_batch_size"]
    assert info["tokenization_workers"] == max(1, info["api_servers"])  # the frontends, or the one process
    tei = {"model_id", "model_sha", "model_dtype", "model_type", "max_concurrent_requests", "max_input_length",
           "max_batch_tokens", "max_batch_requests", "max_client_batch_size", "auto_truncate", "tokenization_workers",
           "version", "sha", "docker_label"}  # TEI's Info, every field
    assert tei <= set(info), tei - set(info)
