"""Server settings: defaults < settings file < environment < flags of `anchorserve serve`.

Every field is an `ANCHORSERVE_<NAME>` variable and a flag of `anchorserve serve` (generated from
these fields: server/serving.py); `HOST` and `PORT` work too, below their `ANCHORSERVE_` forms. The
settings file (YAML or JSON) is itself a setting, `config`: `--config FILE`, `ANCHORSERVE_CONFIG`, or
`Settings(config=path)`. Settings are validated before the model loads, so a bad value stops the
start with a message naming it; no message, log line or `GET /info` shows a key or a password.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from anchor_cache.cpus import api_servers_for, usable_cpus
from anchor_cache.names import DEFAULT_MODEL, cache_dir
from anchor_cache.task import Demonstration, TaskSpec
from server.redaction import redact_url, userinfo_cut_short
from server.store.records import typed_line
from server.store.url import REDIS_SCHEMES

CONFIG_ENV = "ANCHORSERVE_CONFIG"
LogFormat = Literal["text", "json"]
# The built-in task's labelled pool, {label: [text, ...]}, written for anchorserve (not drawn from any
# dataset). Its order is part of the task's identity: the shipped β (server/shipped.py) serves only
# for this exact pool.
BUILTIN_POOL = Path(__file__).resolve().parent / "data" / "builtin_pool.json"
_DB_PATH = re.compile(r"/?\d*")


def builtin_task() -> TaskSpec:
    """Sentiment with the paper's SST-2 template and demonstrations, and the labelled pool in
    `BUILTIN_POOL`, from which β is learned."""
    pool: dict[str, list[str]] = json.loads(BUILTIN_POOL.read_text(encoding="utf-8"))
    return TaskSpec(
        name="sentiment",
        template="Review: {text}\nSentiment:",
        labels=["Negative", "Positive"],
        demonstrations=[
            Demonstration(text="i hated every minute of it", label="Negative"),
            Demonstration(text="one of the best performances of the year", label="Positive"),
            Demonstration(text="a boring, badly acted mess", label="Negative"),
            Demonstration(text="an utterly delightful, warm and funny film", label="Positive"),
        ],
        examples=[Demonstration(text=text, label=label) for label, texts in pool.items() for text in texts],
    )


def builtin_tasks() -> list[TaskSpec]:
    return [builtin_task()]


def default_state_dir() -> Path:
    return cache_dir() / "state"


def default_api_servers() -> int:
    return api_servers_for(usable_cpus())


def check_state_url(url: SecretStr) -> SecretStr:
    """'local', or a Redis URL the state store can open. The checks catch what redis-py would
    read silently as something else (`/abc` as database 0, a password cut short by an unencoded
    character); messages show the URL with its password hidden."""
    text = url.get_secret_value()
    if text == "local":
        return url
    shown = redact_url(text)
    if not text.startswith(REDIS_SCHEMES):
        raise ValueError(f"must be 'local' or a redis://, rediss:// or unix:// URL, got {shown!r}")
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ValueError(f"{shown!r} is not a valid URL") from None
    if userinfo_cut_short(parts):
        raise ValueError(f"{shown!r}: a user name or password holds an unencoded '/', '?' or '#'; "
                         "percent-encode it (%2F, %3F, %23)")
    try:
        parts.port  # noqa: B018 - reading the port parses it
    except ValueError:
        raise ValueError(f"{shown!r}: the port is not a number from 0 to 65535") from None
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{shown!r} names no socket path (unix:///path/to/redis.sock)")
    elif not parts.hostname:
        raise ValueError(f"{shown!r} names no host (redis://host:port/db)")
    elif not _DB_PATH.fullmatch(parts.path):
        raise ValueError(f"{shown!r}: the path must be a database number, like /0")
    from redis.connection import parse_url  # its query parameters (db, timeouts) are redis-py's own

    parse_url(text)  # its messages name the parameter, never a value
    return url


StateUrl = Annotated[SecretStr, AfterValidator(check_state_url)]


class SettingsFile(PydanticBaseSettingsSource):
    """The YAML or JSON file the `config` setting names, read once the sources above it (flags,
    init arguments, the environment) have said which file that is."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError("a settings file is read whole, by __call__")

    def __call__(self) -> dict[str, Any]:
        config = self.current_state.get("config")
        if config is None:
            return {}
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"the settings file {path} (--config, {CONFIG_ENV}): no such file")
        try:
            data = YamlConfigSettingsSource(self.settings_cls, yaml_file=path)()  # YAML ⊇ JSON
        except yaml.YAMLError as exc:
            raise ValueError(f"the settings file {path} is not valid YAML or JSON: {typed_line(str(exc))}"
                             ) from None
        if "config" in data:
            raise ValueError(f"the settings file {path} names another settings file (config): use one file")
        return data


class Settings(BaseSettings):
    # No error message repeats the value it refuses: that value may be a key or a password.
    model_config = SettingsConfigDict(env_prefix="ANCHORSERVE_", env_ignore_empty=True, extra="forbid",
                                      hide_input_in_errors=True)

    config: Path | None = Field(None, description="YAML or JSON settings file (the environment and flags win "
                                "over it)")
    host: str = Field("127.0.0.1", description="address to listen on (HOST works too)")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on (PORT works too)")
    model: str = Field(DEFAULT_MODEL, description="'default' (SmolLM2-135M-Instruct) or a local HF model folder")
    device: str = "auto"
    dtype: str = "auto"
    state_dir: Path = Field(default_factory=default_state_dir, description="persisted tasks and caches")
    # Decoded by `_tasks_from_json`, not by pydantic-settings, whose flag parser doubles every
    # backslash inside a list and so turns a template's "\n" into a backslash and an n.
    tasks: Annotated[list[TaskSpec], NoDecode] = Field(default_factory=builtin_tasks,
                                                       description="tasks served at start (a JSON list)")
    default_task: str | None = Field(None, description="the task POST /predict and POST /v1/classify use when a "
                                     "request names none; unset: the first configured task (a name that is not "
                                     "served is a 404 at request time: admin writes may add it later)")
    state_url: StateUrl = Field("local", validate_default=True, description="'local' (the state dir, for "
                                "processes on one host) or redis://[:password@]host:port/db, rediss://… or "
                                "unix:///path.sock?db=0 (shared by replicas); shown with its password as ***")
    sync_interval_s: float = Field(1.0, gt=0, description="full resync with the state store at least this often "
                                   "(changes arrive sooner by notification)")
    job_ttl_s: float = Field(86400.0, gt=0, description="how long finished job records and plots are kept")

    api_servers: int = Field(default_factory=default_api_servers, ge=0, le=64,
                             description="HTTP frontend processes in front of one engine-core process (tokenising "
                             "and shaping answers in parallel); 0: one process does everything. Default: 0 on up "
                             "to 2 usable CPUs, else one per 8")
    access_log: bool = Field(False, description="log every HTTP request (uvicorn's access log)")
    log_format: LogFormat = Field("text", description="json: each log line one JSON object with time, level, "
                                  "logger, message and request_id")
    torch_threads: int | None = Field(None, ge=1, description="torch threads of the process that runs the model, "
                                      "fixed; unset on a CPU: the CPUs it may use (affinity, cgroup quota) that other "
                                      "processes and its own event loop leave free, refitted each second, starting "
                                      "at one fewer per HTTP process (at least 1); unset on a GPU: 1")

    api_key: SecretStr | None = Field(None, description="Bearer key for /v1/*; unset = open")
    admin_api_key: SecretStr | None = Field(None, description="Bearer key for /admin/*; unset = admin disabled")

    max_batch_size: int = Field(32, ge=1, description="inputs per forward")
    max_batch_tokens: int = Field(8192, ge=16, description="tokens per forward, summed over its rows: each row's "
                                  "cached anchor tokens, re-encoded prefix and query (packed, no padding)")
    cuda_graphs: bool = Field(True, description="on CUDA, replay the packed forward as CUDA graphs, one per padded "
                              "batch shape, captured on first use (removes the launch cost of every layer's kernels)")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a request that finds the model idle waits for "
                                "others to join its batch")
    refill_wait_fraction: float = Field(0.15, ge=0, le=1, description="after a forward that returns its rows "
                                        "where it ran (the CPU), the next batch waits for as many rows as it answered "
                                        "to come back, up to this fraction of a forward's time: clients that send "
                                        "their next request on an answer then share one forward instead of "
                                        "alternating in two (1.15-1.20x at 32 such clients). It waits only while the "
                                        "senders of answered rows have been coming back within that time (timed "
                                        "after every such forward). 0: never wait")
    max_queued_requests: int = Field(512, ge=1, description="beyond this, requests get 429 at once")
    request_timeout_s: float = Field(30.0, gt=0, description="queue + inference deadline; past it, 504")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="after SIGTERM/SIGINT the process exits within this: "
                                      "requests in flight drain, and whatever still runs then is cut short")
    max_payload_bytes: int = Field(1_000_000, ge=1024)
    max_inputs_per_request: int = Field(32, ge=1)
    max_input_tokens: int = Field(512, ge=1, description="per input, after rendering the template")
    truncate: bool = Field(False, description="truncate inputs past max_input_tokens instead of refusing them")
    max_tasks: int = Field(32, ge=1)
    max_demo_tokens: int = Field(4096, ge=1, description="demonstration-context tokens per task")
    prior_window: int = Field(2000, ge=10, description="a `prior: adapt` task estimates its traffic's class "
                              "frequencies from this many of its latest inputs (memory: this many × classes floats)")
    prior_min_samples: int = Field(200, ge=1, description="inputs a `prior: adapt` task sees before it corrects")
    traffic_window: int = Field(2000, ge=10, description="a `method: auto` task estimates its accuracy on traffic "
                                "from this many of its latest inputs' served probabilities (anchor_cache/traffic.py)")
    traffic_min_samples: int = Field(200, ge=1, description="inputs a `method: auto` task serves before it "
                                     "estimates its accuracy on them")
    data_root: Path | None = Field(None, description="datasets admin jobs may read (no path outside it)")
    max_train_examples: int = Field(512, ge=1, description="training examples per re-weighting job")
    max_analysis_jobs: int = Field(1, ge=1, description="analysis jobs pending or running at once; more get 429")
    max_analysis_examples: int = Field(2000, ge=1, description="prompts per analysis job (rows × seeds)")
    max_analysis_tokens: int = Field(1024, ge=8, description="prompt tokens per analysed example")
    max_attention_map_values: int = Field(2_000_000, ge=0, description="numbers in requested full attention maps")
    admin_sync_wait_s: float = Field(2.0, ge=0, description="admin builds finishing sooner answer 201, else 202")
    gc_grace_s: float = Field(600.0, ge=0, description="unreferenced caches younger than this are kept (another "
                              "replica on the same state dir may be about to load them)")

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_from_json(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        if len(self.tasks) > self.max_tasks:
            raise ValueError(f"{len(self.tasks)} tasks configured but max_tasks is {self.max_tasks}")
        if self.max_input_tokens > self.max_batch_tokens:
            raise ValueError("max_input_tokens must not exceed max_batch_tokens, or long inputs could never run")
        if self.prior_min_samples > self.prior_window:
            raise ValueError("prior_min_samples must not exceed prior_window, or `prior: adapt` could never act")
        if self.traffic_min_samples > self.traffic_window:
            raise ValueError("traffic_min_samples must not exceed traffic_window, or no estimate could be made")
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Platforms (Heroku, Cloud Run) tell a process where to listen in HOST and PORT.
        platform = {name: os.environ[name.upper()] for name in ("host", "port") if os.environ.get(name.upper())}
        return (init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=platform),
                SettingsFile(settings_cls))

    def redacted(self) -> dict[str, Any]:
        """For the start-up log and GET /info: keys only as set or unset, the state URL's password as ***."""
        data = self.model_dump(mode="json", exclude={"tasks"})
        for key in ("api_key", "admin_api_key"):
            data[key] = "set" if getattr(self, key) else "unset"
        data["state_url"] = redact_url(self.state_url.get_secret_value())
        return data | {"tasks": [t.name for t in self.tasks]}
