"""Settings at the edges: every setting is a flag of `anchorserve serve`, the settings file reaches
them without os.environ, `state_url` is checked at start, no secret shows (GET /info, the logs, error
bodies, messages), and JSON log lines carry the request id."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import torch
from asgi_correlation_id import correlation_id
from fastapi.testclient import TestClient
from pydantic import SecretStr, TypeAdapter, ValidationError

from anchor_cache import Classifier
from anchor_cache.blobs import parse_tensors
from anchor_cache.reweighting import pool_hash
from server.app import build_app
from server.logs import log_handler
from server.redaction import redact_url
from server.serving import load_settings, serve_parser, settings_from_flags
from server.settings import Settings, builtin_task
from server.shipped import SHIPPED_BETAS
from tests.conftest import save_tiny_model, sentiment_task
from tests.conftest import settings as server_settings
from tests.test_cli import serving
from tests.test_frontends import ready, wait_until
from tests.test_uvicorn import free_port

SECRET = "hunter2-s3cret"


@pytest.fixture()
def clean_env(monkeypatch) -> None:
    """No setting from this process's environment (the developer's or CI's)."""
    for name in list(os.environ):
        if name.startswith("ANCHORSERVE_") or name in ("HOST", "PORT"):
            monkeypatch.delenv(name)


def process_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANCHORSERVE_") and k not in ("HOST", "PORT")}
    return env | {f"ANCHORSERVE_{k.upper()}": v for k, v in settings.items()}


# --- one redaction function ------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "shown"), [
    (f"redis://:{SECRET}@db.example:6379/0", "redis://:***@db.example:6379/0"),
    (f"redis://app:{SECRET}@db.example", "redis://app:***@db.example"),
    (f"redis://db.example/0?password={SECRET}", "redis://db.example/0?password=***"),
    (f"redis://db.example/0?db=1&Password={SECRET}&socket_timeout=5",
     "redis://db.example/0?db=1&Password=***&socket_timeout=5"),
    (f"redis://app:{SECRET}@db.example/0?password={SECRET}", "redis://app:***@db.example/0?password=***"),
    (f"rediss://:{SECRET}@db.example:6380/1", "rediss://:***@db.example:6380/1"),
    (f"rediss://{SECRET}@db.example", "rediss://***@db.example"),
    (f"unix:///run/redis.sock?db=1&password={SECRET}", "unix:///run/redis.sock?db=1&password=***"),
    (f"unix://app:{SECRET}@/run/redis.sock", "unix://app:***@/run/redis.sock"),
    ("redis://db.example:6379/0", "redis://db.example:6379/0"),
    ("local", "local"),
])
def test_redact_url_hides_the_password_in_every_form(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", [
    f"redis://:{SECRET[:7]}/{SECRET[7:]}@db.example/0",  # an unencoded / ? # ends the user info early
    f"redis://:{SECRET[:7]}?{SECRET[7:]}@db.example/0",
    f"redis://:{SECRET[:7]}#{SECRET[7:]}@db.example/0",
    f"redis://db.example/0?password={SECRET[:7]}#{SECRET[7:]}",
    f"redis://:{SECRET}@[::1/0",  # not parsable
])
def test_redact_url_hides_all_but_the_scheme_when_the_password_may_spill(url):
    shown = redact_url(url)
    assert SECRET[:7] not in shown and SECRET[7:] not in shown and shown.endswith("***")


# --- state_url, typed ------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [f"redis://:{SECRET}@db.example:6379/0", f"rediss://app:{SECRET}@db.example",
                                 f"redis://db.example/0?password={SECRET}",
                                 f"unix:///run/redis.sock?db=1&password={SECRET}", "local"])
def test_a_good_state_url_is_kept_and_shown_redacted(url, clean_env):
    settings = Settings(state_url=url)
    assert settings.state_url.get_secret_value() == url
    assert settings.redacted()["state_url"] == redact_url(url) and SECRET not in repr(settings)


@pytest.mark.parametrize(("url", "message"), [
    ("http://db.example", "must be 'local' or a redis://, rediss:// or unix:// URL"),
    ("", "must be 'local'"),
    (f"redis://:{SECRET}@db.example/zero", "the path must be a database number"),
    (f"redis://:{SECRET}@db.example:port/0", "the port is not a number"),
    (f"redis://:{SECRET[:7]}/{SECRET[7:]}@db.example/0", "percent-encode it"),
    (f"redis:///0?password={SECRET}", "names no host"),
    (f"unix://?password={SECRET}", "names no socket path"),
    (f"redis://db.example/0?password={SECRET}&db=x", "Invalid value for 'db'"),
])
def test_a_bad_state_url_fails_validation_without_showing_its_password(url, message, clean_env):
    with pytest.raises(ValidationError) as caught:
        Settings(state_url=url)
    (error,) = caught.value.errors()
    assert error["loc"] == ("state_url",) and message in error["msg"], error["msg"]
    assert SECRET[:7] not in str(caught.value) and SECRET[7:] not in str(caught.value)


# --- every setting is a flag; the settings file without os.environ ---------------------------------


def as_flags(name: str, value: object) -> list[str]:
    """The `anchorserve serve` arguments that give setting `name` this value."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else [f"--no-{flag[2:]}"]
    if isinstance(value, SecretStr):
        return [flag, value.get_secret_value()]
    dumped = TypeAdapter(Settings.model_fields[name].annotation).dump_python(value, mode="json")
    return [flag, dumped if isinstance(dumped, str) else json.dumps(dumped)]


def test_every_setting_is_a_flag_of_serve(clean_env, tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    wanted = Settings(config=config, host="0.0.0.0", port=9123, model=str(tmp_path / "m"), state_dir=tmp_path,
                      tasks=[sentiment_task()], default_task="sentiment", state_url=f"redis://:{SECRET}@db/2",
                      api_servers=3, access_log=True, log_format="json", torch_threads=3, api_key="k1",
                      admin_api_key="k2", cuda_graphs=False, max_batch_size=7, truncate=True, data_root=tmp_path,
                      gc_grace_s=1.5)
    parser, flags = serve_parser("anchorserve serve")
    for name in Settings.model_fields:
        got = load_settings(parser.parse_args(as_flags(name, getattr(wanted, name))), flags)
        assert name in got.model_fields_set and getattr(got, name) == getattr(wanted, name), name
    every = [arg for name in Settings.model_fields for arg in as_flags(name, getattr(wanted, name))]
    assert settings_from_flags(every) == wanted


class WriteProtectedEnviron(dict):
    """An os.environ that fails the test when anything writes to it."""

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("os.environ was written")

    __setitem__ = __delitem__ = pop = popitem = setdefault = update = clear = _refuse


def test_the_settings_file_is_read_without_writing_os_environ(monkeypatch, tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("port: 9100\nmax_batch_size: 5\naccess_log: true\n")
    env = process_env()
    with monkeypatch.context() as patched:  # pytest itself writes os.environ between a test's phases
        patched.setattr(os, "environ", WriteProtectedEnviron(env))
        flagged = settings_from_flags(["--config", str(config), "--max-batch-size", "6"])
        assert (flagged.config, flagged.port, flagged.max_batch_size, flagged.access_log) == (config, 9100, 6, True)
        assert Settings(config=config).port == 9100
    with monkeypatch.context() as patched:
        patched.setattr(os, "environ", WriteProtectedEnviron(env | {"ANCHORSERVE_CONFIG": str(config),
                                                                    "ANCHORSERVE_MAX_BATCH_SIZE": "8"}))
        from_env = Settings()  # ANCHORSERVE_CONFIG names the file; the environment wins over it
        assert (from_env.config, from_env.port, from_env.max_batch_size) == (config, 9100, 8)
        assert settings_from_flags(["--max-batch-size", "9"]).max_batch_size == 9  # and flags over the environment


@pytest.mark.parametrize(("text", "message"), [
    (None, "no such file"),
    ("port: [1\n", "is not valid YAML or JSON"),
    ("config: other.yaml\n", "names another settings file"),
])
def test_a_bad_settings_file_is_one_clear_error(text, message, tmp_path, clean_env):
    config = tmp_path / "settings.yaml"
    if text is not None:
        config.write_text(text)
    with pytest.raises(ValueError, match=message):
        Settings(config=config)


def test_host_and_port_come_from_the_platform_below_their_own_variables(monkeypatch, clean_env):
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.setenv("PORT", "9001")
    assert (Settings().host, Settings().port) == ("0.0.0.0", 9001)
    monkeypatch.setenv("ANCHORSERVE_PORT", "9002")
    assert Settings().port == 9002


# --- the built-in task's pool, from its data file --------------------------------------------------


def test_the_builtin_pool_is_the_one_its_shipped_beta_was_learned_from(tiny_lm):
    """The pool is read from server/data/builtin_pool.json; the shipped β records the hash of the pool it
    was learned from, and serves only while the task's pool hashes the same."""
    (shipped,) = SHIPPED_BETAS.glob("*.beta.safetensors")
    _, manifest = parse_tensors(shipped.read_bytes(), shipped.name, torch.device("cpu"))
    task = builtin_task()
    assert pool_hash(Classifier(tiny_lm, task)) == manifest["info"]["pool"]
    assert manifest["info"]["train_examples"] == len(task.examples) == 32


# --- no secret in GET /info, the logs or error bodies ----------------------------------------------


def wait_for_startup_failure(client: TestClient, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while "start-up failed" not in (answer := client.get("/ready")).text:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.02)
    return answer


@pytest.mark.parametrize("form", ["password", "user and password", "query", "tls", "unix socket"])
def test_no_secret_reaches_info_logs_or_error_bodies(form, model_dir, tmp_path, caplog):
    """Each form of a Redis password, and both keys, with a store that cannot be reached: the start
    fails and says so, and nothing the server shows or logs on the way holds a secret."""
    port = free_port()
    url = {"password": f"redis://:{SECRET}@127.0.0.1:{port}/0",
           "user and password": f"redis://app:{SECRET}@127.0.0.1:{port}",
           "query": f"redis://127.0.0.1:{port}/0?password={SECRET}",
           "tls": f"rediss://:{SECRET}@127.0.0.1:{port}/0",
           "unix socket": f"unix://{tmp_path}/none.sock?password={SECRET}"}[form]
    keys = {"api_key": f"{SECRET}-api", "admin_api_key": f"{SECRET}-admin"}
    app = build_app(server_settings(model_dir, tmp_path / "state", state_url=url, **keys))
    with caplog.at_level(logging.INFO), TestClient(app) as client:
        answers = [wait_for_startup_failure(client), info := client.get("/info"),
                   client.post("/v1/classify", json={"input": "x"}, headers={"Authorization": "Bearer wrong"}),
                   client.post("/v1/classify", json={"input": "x"}, headers={"Authorization": f"Bearer {SECRET}-api"}),
                   client.post("/admin/tasks", json={}, headers={"Authorization": "Bearer wrong"}),
                   client.get("/v1/tasks", headers={"Authorization": f"Bearer {SECRET}-api"})]
    assert [a.status_code for a in answers[2:]] == [401, 503, 401, 503]
    assert info.json()["state_url"] == redact_url(url) and info.json()["api_key"] == "set"
    assert redact_url(url) in caplog.text and "'admin_api_key': 'set'" in caplog.text  # the start-up log
    for text in [*(a.text for a in answers), caplog.text]:
        assert SECRET not in text


def json_lines(log: Path) -> list[dict]:
    """Every line of a server's log, each of which must be one JSON object."""
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_json_log_lines_carry_the_request_id():
    out = io.StringIO()
    handler = log_handler("json")
    handler.setStream(out)
    logger = logging.getLogger("tests.json-log")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("outside %s", "requests")
        token = correlation_id.set("req-42")
        try:
            logger.warning("inside")
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                logger.exception("failed")
        finally:
            correlation_id.reset(token)
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["level"], x["message"], x["request_id"]) for x in lines] == [
        ("INFO", "outside requests", None), ("WARNING", "inside", "req-42"), ("ERROR", "failed", "req-42")]
    assert set(lines[0]) == {"time", "level", "logger", "message", "request_id"}
    assert lines[0]["logger"] == "tests.json-log"
    assert datetime.fromisoformat(lines[0]["time"]).utcoffset() == UTC.utcoffset(None)
    assert "RuntimeError: boom" in lines[2]["exception"]


def test_a_served_request_logs_json_with_its_id_and_no_secret(tmp_path):
    """A real server with --log-format json: the start-up log, the access log and an error's log line
    are JSON, the request's lines carry its id, and neither the log nor the answers hold a key."""
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({
        "model": str(save_tiny_model("gpt2", tmp_path / "model")), "device": "cpu", "dtype": "float32",
        "state_dir": str(tmp_path / "state"), "tasks": [sentiment_task().model_dump(mode="json")],
        "admin_api_key": f"{SECRET}-admin"}))
    port, log = free_port(), tmp_path / "server.log"
    command = ["-m", "server", "--config", str(config), "--port", str(port), "--log-format", "json", "--access-log"]
    with serving(command, process_env(api_key=f"{SECRET}-api"), port, log) as url:
        info = httpx.get(f"{url}/info")
        denied = httpx.post(f"{url}/v1/classify", json={"input": "a moving film"},
                            headers={"X-Request-ID": "json-log-1", "Authorization": "Bearer wrong"})
        served = httpx.post(f"{url}/v1/classify", json={"input": "a moving film"},
                            headers={"X-Request-ID": "json-log-2", "Authorization": f"Bearer {SECRET}-api"})
    assert (denied.status_code, served.status_code) == (401, 200)
    lines = json_lines(log)
    assert any("starting with settings" in x["message"] and "'api_key': 'set'" in x["message"] for x in lines)
    assert any(x["request_id"] == "json-log-1" and "401" in x["message"] for x in lines)
    assert any(x["request_id"] == "json-log-2" and "200" in x["message"] for x in lines)  # the access log
    for text in (log.read_text(), info.text, denied.text):
        assert SECRET not in text


def test_a_split_servers_children_read_the_serve_flags(tmp_path):
    """With --api-servers the engine core and each frontend build their settings from the flags
    `anchorserve serve` was given, not only from the environment and the file."""
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({
        "model": str(save_tiny_model("gpt2", tmp_path / "model")), "device": "cpu", "dtype": "float32",
        "state_dir": str(tmp_path / "state"), "tasks": [sentiment_task().model_dump(mode="json")]}))
    port, log = free_port(), tmp_path / "server.log"
    command = ["-m", "server.cli", "serve", "--config", str(config), "--port", str(port), "--api-servers", "2",
               "--api-key", "flag-key", "--max-inputs-per-request", "3", "--log-format", "json"]
    with serving(command, process_env(), port, log) as url:
        wait_until(lambda: all(ready(url) for _ in range(10)), 60, "both frontends ready")
        info = httpx.get(f"{url}/info").json()  # the core answers it
        # Each request is a new connection, which either frontend may take; each checks the key itself.
        refused = [httpx.post(f"{url}/v1/classify", json={"input": "x"}).status_code for _ in range(10)]
        too_many = httpx.post(f"{url}/v1/classify", json={"input": ["x"] * 4},
                              headers={"Authorization": "Bearer flag-key"})
    assert (info["port"], info["max_inputs_per_request"], info["api_key"]) == (port, 3, "set")
    assert refused == [401] * 10
    assert too_many.status_code == 400 and "the limit is 3 (max_inputs_per_request)" in too_many.text
    assert json_lines(log)
