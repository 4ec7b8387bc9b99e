"""Server settings: defaults < config file (`ANCHORSERVE_CONFIG`, YAML or JSON) < environment.

Every field is also an `ANCHORSERVE_<NAME>` variable; `HOST` and `PORT` work too. Settings are
validated before the model loads, so a bad value stops the start with a message naming it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from anchor_cache.cpus import api_servers_for, usable_cpus
from anchor_cache.names import DEFAULT_MODEL, cache_dir
from anchor_cache.task import Demonstration, TaskSpec

CONFIG_ENV = "ANCHORSERVE_CONFIG"


# The built-in task's labelled pool, written for anchorserve (not drawn from any dataset): its β is
# learned from these and ships with the server (server/shipped.py).
BUILTIN_POOL = {
    "Negative": [
        "a tiresome muddle", "awful", "the plot goes nowhere and takes its time getting there",
        "flat characters and a script full of clichés", "i walked out halfway through",
        "painfully slow and never funny", "a waste of a talented cast", "the worst film i have seen this year",
        "loud, long and empty", "it looks cheap and feels cheaper", "tedious from the first scene to the last",
        "the jokes fall flat", "a confused, lifeless sequel", "nothing about it works",
        "clumsy direction and wooden acting", "boring and far too long",
    ],
    "Positive": [
        "a lovely picture", "superb", "a moving story told with real warmth", "sharp, funny and beautifully shot",
        "i loved every minute of it", "the best thing the director has ever made", "a warm, uplifting comedy",
        "gripping from start to finish", "smart writing and a terrific cast", "a small gem worth seeking out",
        "tender, funny and true", "an absolute delight", "the performances are superb",
        "it left me smiling for days", "a thrilling, inventive ride", "beautiful and deeply felt",
    ],
}


def builtin_task() -> TaskSpec:
    """Sentiment with the paper's SST-2 template, demonstrations and a labelled pool written for
    anchorserve; β is learned from the pool (see BUILTIN_POOL)."""
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
        examples=[Demonstration(text=text, label=label) for label, texts in BUILTIN_POOL.items() for text in texts],
    )


def redact_url(url: str) -> str:
    """A URL with its password (if any) replaced by ***."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ANCHORSERVE_", env_ignore_empty=True, extra="forbid")

    host: str = Field("127.0.0.1", validation_alias=AliasChoices("ANCHORSERVE_HOST", "HOST", "host"))
    port: int = Field(8000, ge=1, le=65535, validation_alias=AliasChoices("ANCHORSERVE_PORT", "PORT", "port"))
    model: str = Field(DEFAULT_MODEL, description="'default' (SmolLM2-135M-Instruct) or a local HF model folder")
    device: str = "auto"
    dtype: str = "auto"
    state_dir: Path = Field(default_factory=lambda: cache_dir() / "state", description="persisted tasks and caches")
    tasks: list[TaskSpec] = Field(default_factory=lambda: [builtin_task()], description="tasks served at start")
    default_task: str | None = Field(None, description="the task POST /predict and POST /v1/classify use when a "
                                     "request names none; unset: the first configured task (a name that is not "
                                     "served is a 404 at request time: admin writes may add it later)")
    state_url: SecretStr = Field(SecretStr("local"), description="'local' (the state dir, for processes on one "
                                 "host) or redis://host:port/db (shared by replicas on any host)")
    sync_interval_s: float = Field(1.0, gt=0, description="full resync with the state store at least this often "
                                   "(changes arrive sooner by notification)")
    job_ttl_s: float = Field(86400.0, gt=0, description="how long finished job records and plots are kept")

    api_servers: int = Field(default_factory=lambda: api_servers_for(usable_cpus()), ge=0, le=64,
                             description="HTTP frontend processes in front of one engine-core process (tokenising "
                             "and shaping answers in parallel); 0: one process does everything. Default: 0 on up "
                             "to 2 usable CPUs, else one per 8")
    access_log: bool = Field(False, description="log every HTTP request (uvicorn's access log)")
    torch_threads: int | None = Field(None, ge=1, description="torch threads of the process that runs the model; "
                                      "unset: the CPUs it may use (affinity, cgroup quota), less one for each HTTP "
                                      "process (its own event loop, or each frontend; at least 1)")

    api_key: SecretStr | None = Field(None, description="Bearer key for /v1/*; unset = open")
    admin_api_key: SecretStr | None = Field(None, description="Bearer key for /admin/*; unset = admin disabled")

    max_batch_size: int = Field(32, ge=1, description="inputs per forward")
    max_batch_tokens: int = Field(8192, ge=16, description="tokens per forward, summed over its rows: each row's "
                                  "cached anchor tokens, re-encoded prefix and query (packed, no padding)")
    cuda_graphs: bool = Field(True, description="on CUDA, replay the packed forward as CUDA graphs, one per padded "
                              "batch shape, captured on first use (removes the launch cost of every layer's kernels)")
    max_wait_ms: float = Field(2.0, ge=0, description="how long the worker waits to fill a batch")
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
    data_root: Path | None = Field(None, description="datasets admin jobs may read (no path outside it)")
    max_train_examples: int = Field(512, ge=1, description="training examples per re-weighting job")
    max_analysis_jobs: int = Field(1, ge=1, description="analysis jobs pending or running at once; more get 429")
    max_analysis_examples: int = Field(2000, ge=1, description="prompts per analysis job (rows × seeds)")
    max_analysis_tokens: int = Field(1024, ge=8, description="prompt tokens per analysed example")
    max_attention_map_values: int = Field(2_000_000, ge=0, description="numbers in requested full attention maps")
    admin_sync_wait_s: float = Field(2.0, ge=0, description="admin builds finishing sooner answer 201, else 202")
    gc_grace_s: float = Field(600.0, ge=0, description="unreferenced caches younger than this are kept (another "
                              "replica on the same state dir may be about to load them)")

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
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        config = os.environ.get(CONFIG_ENV)
        if config:
            if not Path(config).is_file():
                raise ValueError(f"{CONFIG_ENV}={config} is not a file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config))  # YAML ⊇ JSON
        return tuple(sources)

    def redacted(self) -> dict:
        """For the start-up log and GET /info: keys are shown only as set or unset."""
        data = self.model_dump(mode="json", exclude={"tasks"})
        for key in ("api_key", "admin_api_key"):
            data[key] = "set" if getattr(self, key) else "unset"
        data["state_url"] = redact_url(self.state_url.get_secret_value())
        return data | {"tasks": [t.name for t in self.tasks]}
