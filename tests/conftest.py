"""Fixtures: tiny random GPT-2 (learned positions) and Llama (RoPE + grouped-query attention)
models with a byte-level BPE tokenizer trained here, plus the real default model.

The tiny models are saved to a folder and loaded through `load_model(path)`, so the local-folder
path is exercised too. A large init range keeps attention far from uniform, so equivalence tests
can actually fail.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from anchor_cache import Demonstration, LoadedModel, TaskSpec, load_model
from server.app import build_app
from server.settings import Settings

pytest_plugins = ["tests.redis_server", "tests.processes"]

CORPUS = [
    "Review: a wonderful, moving film\nSentiment: Positive",
    "Review: dull and lifeless, a waste\nSentiment: Negative",
    "Article: the match ended in a draw\nAnswer: Sports",
    "Article: markets fell after the report\nAnswer: Business",
    "Question: who wrote hamlet?\nAnswer Type: Person",
    "the quick brown fox jumps over the lazy dog. Positive Negative World Sports Business",
] * 20


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)  # GPT-2's setting
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(family: str, vocab: int):
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=512, n_embd=32, n_layer=3, n_head=4, initializer_range=0.2)
    return LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False,
    )


def save_tiny_model(family: str, folder: Path) -> Path:
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_lm(request, tmp_path_factory) -> LoadedModel:
    folder = save_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))
    return load_model(str(folder), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def real_lm() -> LoadedModel:
    return load_model("default", device="cpu", dtype="float32")


def sentiment_task(**overrides) -> TaskSpec:
    spec = {
        "name": "sentiment",
        "template": "Review: {text}\nSentiment:",
        "labels": ["Negative", "Positive"],
        "demonstrations": [
            Demonstration(text="a wonderful, moving film", label="Positive"),
            Demonstration(text="dull and lifeless, a waste", label="negative"),
            Demonstration(text="the fox jumps over the lazy dog", label="Positive"),
        ],
    }
    return TaskSpec(**(spec | overrides))


QUERIES = ["a moving match", "dull", "the markets fell after a wonderful report on the lazy dog"]


@pytest.fixture()
def dataset_dir(tmp_path) -> Path:
    """A dataset folder in the shared-data shape: train.jsonl and test.jsonl of {text,label}."""
    rows = [
        {"text": "a wonderful, moving film", "label": "positive"},
        {"text": "dull and lifeless", "label": "negative"},
        {"text": "the quick brown fox", "label": "positive"},
        {"text": "a waste of a report", "label": "negative"},
    ] * 4
    for name in ("train", "test"):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


# --- servers in process (TestClient runs the lifespan), on the tiny Llama -----------------------------

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The tiny Llama as a model folder, for servers."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("server-model"))


def settings(model_dir, state_dir, **overrides) -> Settings:
    base = {"model": str(model_dir), "device": "cpu", "dtype": "float32", "state_dir": state_dir,
            "tasks": [sentiment_task()]}
    return Settings(**(base | overrides))


def wait_finished(client: TestClient, path: str, timeout: float = 60) -> dict:
    """Poll a job's status URL (admin key) until it is neither pending nor running; its body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(path, headers=ADMIN).json()
        if job["status"] not in ("pending", "running"):
            return job
        time.sleep(0.02)
    raise TimeoutError(job)


def wait_reweighted(client: TestClient, name: str, timeout: float = 120) -> dict:
    """Poll a task until it serves a β (a pool's β is learned in a job after start); its info."""
    deadline = time.monotonic() + timeout
    while not (info := client.get(f"/v1/tasks/{name}").json())["reweighted"]:
        if time.monotonic() > deadline:
            raise TimeoutError(info)
        time.sleep(0.02)
    return info


def wait_ready(client: TestClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError(client.get("/ready").json())


@pytest.fixture()
def serve(model_dir, tmp_path):
    """serve(**settings) -> a ready TestClient; every client is closed (and drained) at teardown."""
    clients = []

    def start(**overrides) -> TestClient:
        client = TestClient(build_app(settings(model_dir, tmp_path / "state", **overrides)))
        client.__enter__()
        clients.append(client)
        wait_ready(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def error_of(response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "type"} and body["type"] == kind, body
    error = body["error"]
    if isinstance(error, dict):  # vLLM's routes: OpenAI's error object
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == status, body
        return error["message"]
    return error
