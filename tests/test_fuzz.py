"""Schema fuzzing: every operation of the OpenAPI schema, in process, on the tiny Llama model.

Schemathesis generates requests from /openapi.json and they go through one Starlette TestClient,
so the app's lifespan (model, scheduler, jobs) runs once for the module. Every response must hold
to the schema: no 5xx, a status the operation documents, a documented content type, a body that
matches that status's schema, and errors in the one envelope {"error", "type"}. The tests, in order:

- generated requests, valid then invalid, for every operation;
- the success paths random data rarely reaches: valid classify bodies for "sentiment", and valid
  task specs (a hypothesis strategy) created, read, classified, replaced and deleted;
- a β training and an analysis that succeed, then the job and task routes fuzzed with real ids;
- HTTP framing by hand: no or wrong key, non-JSON and broken bodies, oversized bodies, undecodable
  path parameters, unknown methods and routes;
- paths under data_root (traversal, symlinks, bad files, over-long names) on every route reading them;
- builds slower than admin_sync_wait_s (its 202 must be documented too).

Bounded and seeded (a fixed number of examples per operation, a fixed seed per strategy), so CI sees
the same requests every run. With ANCHORSERVE_FUZZ_REPORT set, the totals (with the successful
task writes) go to bench/results/fuzz.json when the module ends; ANCHORSERVE_FUZZ_SCALE=N runs N
times the examples."""

from __future__ import annotations

import contextlib
import json
import os
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup

from server.app import build_app
from server.settings import Settings
from tests.conftest import save_tiny_model, sentiment_task

ADMIN = {"Authorization": "Bearer admin-secret"}
BASE_URL = "http://testserver"
REPORT_ENV = "ANCHORSERVE_FUZZ_REPORT"
# A larger run for the report (docs/RESULTS.md): every example count times this; CI runs 1.
SCALE = int(os.environ.get("ANCHORSERVE_FUZZ_SCALE", "1"))
WRITES = ("POST /admin/tasks", "PUT /admin/tasks/{name}", "DELETE /admin/tasks/{name}")
REPORT_PATH = Path(__file__).resolve().parents[1] / "bench" / "results" / "fuzz.json"

# Examples per operation and generation mode; the success-path strategies have their own counts.
POSITIVE_EXAMPLES = 25
NEGATIVE_EXAMPLES = 25
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
]
SERVED_METHODS = ["hidden_anchor", "vanilla", "text_anchor", "hidden_random", "zero_shot"]
TRAIN_ROWS = [
    {"text": "a wonderful, moving film", "label": "positive"},
    {"text": "dull and lifeless", "label": "negative"},
    {"text": "the quick brown fox", "label": "positive"},
    {"text": "a waste of a report", "label": "negative"},
    {"text": "markets fell after the report", "label": "negative"},
    {"text": "the match was a joy", "label": "positive"},
]


def hypothesis_settings(examples: int) -> settings:
    # No shrinking: a failing case is recorded, not raised, so every failure is reported once.
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


def run_examples(strategy: st.SearchStrategy, body: Callable[[Any], None], examples: int, name: str) -> None:
    """`body(example)` for `examples` draws of `strategy`, seeded by `name` (reproducible)."""

    @seed(zlib.crc32(name.encode()))
    @hypothesis_settings(examples * SCALE)
    @given(strategy)
    def run(example: Any) -> None:
        body(example)

    run()


@dataclass
class Finding:
    operation: str
    title: str
    status: int
    message: str
    reproduce: str


@dataclass
class Fuzzer:
    """Sends cases through the TestClient, validates every response and keeps the totals."""

    client: TestClient
    schema: Any
    cases: int = 0
    operations: set[str] = field(default_factory=set)
    statuses: Counter = field(default_factory=Counter)
    server_errors: list[Finding] = field(default_factory=list)
    violations: list[Finding] = field(default_factory=list)

    def operation(self, path: str, method: str) -> Any:
        return self.schema[path][method.upper()]

    def send(self, case: Any, auth: bool = True) -> httpx.Response:
        """A generated (or hand-made) case, sent as schemathesis would send it, then validated."""
        kwargs = case.as_transport_kwargs(base_url=BASE_URL)
        headers = {k: v for k, v in dict(kwargs.get("headers") or {}).items() if v is not None}
        if auth and case.operation.path.startswith("/admin") and "authorization" not in {h.lower() for h in headers}:
            headers |= ADMIN
        content: bytes | None = None
        if "json" in kwargs:
            content = json.dumps(kwargs["json"], allow_nan=False).encode()  # as requests encodes it
        elif kwargs.get("data") is not None:
            data = kwargs["data"]
            content = data.encode() if isinstance(data, str) else bytes(data)
        response = self.client.request(
            kwargs["method"], kwargs["url"], params=kwargs.get("params") or None, headers=headers, content=content
        )
        self.validate(case, response, headers)
        return response

    def send_raw(
        self, path: str, method: str, url: str, headers: dict[str, str], content: bytes | None, **case_kwargs: Any
    ) -> httpx.Response:
        """Framing the generator never makes (no key, wrong media type, broken JSON), validated the same way."""
        case = self.operation(path, method).Case(**case_kwargs)
        response = self.client.request(method, BASE_URL + url, headers=headers, content=content)
        self.validate(case, response, headers)
        return response

    def send_unrouted(self, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
        """No operation to check against (unknown route or method): 404/405 in the error envelope."""
        response = self.client.request(method, BASE_URL + url, headers=headers)
        label = f"{method} {url}"
        self.cases += 1
        self.statuses[(label, response.status_code)] += 1
        reproduce = f"{method} {url} headers={headers}"
        problem = envelope_problem(response)
        if response.status_code == 405 and "allow" not in response.headers:
            problem = "405 without an Allow header"
        if response.status_code >= 500:
            self.server_errors.append(
                Finding(label, "server error", response.status_code, response.text[:500], reproduce)
            )
        elif response.status_code not in (404, 405) or problem:
            self.violations.append(
                Finding(label, "unrouted request", response.status_code, problem or response.text[:300], reproduce)
            )
        return response

    def validate(self, case: Any, response: httpx.Response, headers: dict[str, str]) -> None:
        label = case.operation.label
        self.cases += 1
        self.operations.add(label)
        self.statuses[(label, response.status_code)] += 1
        reproduce = case_repro(case, response, headers)
        if response.status_code >= 500:  # one finding; its undocumented status is the same bug
            self.server_errors.append(
                Finding(label, "server error", response.status_code, response.text[:500], reproduce)
            )
            return
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                self.violations.append(
                    Finding(label, failure.title, response.status_code, str(failure.message)[:800], reproduce)
                )
        if response.status_code >= 400:
            problem = envelope_problem(response)
            if problem:
                self.violations.append(Finding(label, "error envelope", response.status_code, problem, reproduce))

    def failures(self) -> list[Finding]:
        return self.server_errors + self.violations

    def findings(self) -> Findings:
        return Findings(self, len(self.server_errors), len(self.violations), self.cases)


@dataclass
class Findings:
    """The findings of one test, reported together (deduplicated) when it ends."""

    fuzz: Fuzzer
    errors_before: int
    violations_before: int
    cases_before: int

    def check(self) -> None:
        assert self.fuzz.cases > self.cases_before
        found = self.fuzz.server_errors[self.errors_before :] + self.fuzz.violations[self.violations_before :]
        distinct = list({(f.operation, f.title, f.status, f.reproduce): f for f in found}.values())
        lines = [f"{f.operation} -> {f.status} [{f.title}] {f.message}\n    {f.reproduce}" for f in distinct[:40]]
        assert not found, f"{len(found)} failures ({len(distinct)} distinct):\n" + "\n".join(lines)


def envelope_problem(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return f"error body is not JSON: {response.text[:200]!r}"
    if not (isinstance(body, dict) and isinstance(body.get("type"), str)):
        return f"error body is not {{'error', 'type'}}: {str(body)[:200]}"
    error = body.get("error")
    if isinstance(error, dict):  # vLLM's routes: OpenAI's error object
        vllm = str(response.request.url.path) in ("/v1/classify", "/classify", "/invocations")
        if not vllm or set(error) != {"message", "type", "param", "code"} or error["code"] != response.status_code:
            return f"error body is not vLLM's on {response.request.url.path}: {str(body)[:200]}"
    elif not isinstance(error, str):
        return f"error body is not {{'error', 'type'}}: {str(body)[:200]}"
    return None


def case_repro(case: Any, response: httpx.Response, headers: dict[str, str]) -> str:
    request = response.request
    body = request.content.decode("utf-8", "backslashreplace") if request.content else ""
    shown = {k: v for k, v in headers.items() if k.lower() in ("content-type", "authorization")}
    return f"{request.method} {request.url} headers={shown} body={body[:600]}"


# --- the server ---------------------------------------------------------------------------------


def write_data_root(root: Path) -> Path:
    """A good dataset, and the files an operator's data_root may hold by mistake."""
    good = root / "sst"
    good.mkdir(parents=True)
    for split in ("train", "test"):
        (good / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in TRAIN_ROWS))
    (root / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    (root / "deep.jsonl").write_text("[" * 100_000 + "\n")
    (root / "rows.jsonl").write_text('{"text": 1, "label": []}\n{"text": "x"}\n')
    (root / "empty.jsonl").write_text("")
    (root / "no-train").mkdir()
    (root / "dir.jsonl").mkdir()
    (root / "escape").symlink_to("/etc")
    (root / "loop").symlink_to(root / "loop")
    return root


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model_dir = save_tiny_model("llama", root / "model")
    write_data_root(root / "data")
    settings_ = Settings(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        state_dir=root / "state",
        tasks=[sentiment_task()],
        admin_api_key="admin-secret",
        api_key=None,
        data_root=root / "data",
        max_tasks=8,
    )
    with TestClient(build_app(settings_), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").text
            time.sleep(0.05)
        schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
        fuzz = Fuzzer(client, schema)
        started = time.perf_counter()
        yield fuzz
        summary = {
            "operations": len(fuzz.operations),
            "cases": fuzz.cases,
            "server_errors": len(fuzz.server_errors),
            "schema_violations": len(fuzz.violations),
            "successful_writes": sum(n for (label, status), n in fuzz.statuses.items()
                                     if label in WRITES and 200 <= status < 300),
            "scale": SCALE,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if os.environ.get(REPORT_ENV):
            REPORT_PATH.parent.mkdir(parents=True, exist_ok=True)
            REPORT_PATH.write_text(json.dumps(summary, indent=2) + "\n")


# --- strategies for the success paths -------------------------------------------------------------

SAFE_CHAR = st.characters(codec="utf-8", exclude_characters="\x00")  # FormatText: no NUL, no surrogates
TEXT_CHAR = st.characters(codec="utf-8")  # Text: NUL allowed
FREE_TEXT = st.one_of(
    st.text(TEXT_CHAR, max_size=40),
    st.sampled_from(["a wonderful film", "dull", "", " ", "{text}", "\x00", "é\u3000😀", "\n\n"]),
)
# Words the tiny tokenizer has whole tokens for; random label words mostly share their first (byte)
# token, which is a 422, not the success path wanted here. Random text may follow the word.
WORDS = ["Positive", "Negative", "World", "Sports", "Business", "Person"]
SUFFIX = st.one_of(st.just(""), st.text(SAFE_CHAR, min_size=1, max_size=6))
NAME = st.from_regex(r"fz[A-Za-z0-9_.-]{0,12}", fullmatch=True)


@st.composite
def templates(draw) -> str:
    # Random text mostly before the slot: at the end it often merges with the label's space (a 422).
    prefix = draw(st.one_of(st.sampled_from(["Review: ", "Q: ", "", "{", "}{0}"]), st.text(SAFE_CHAR, max_size=20)))
    suffix = draw(
        st.one_of(*[st.sampled_from(["\nSentiment:", "\nA:", ":", "", " =>"])] * 3, st.text(SAFE_CHAR, max_size=12))
    )
    template = (prefix + "{text}" + suffix).rstrip()
    return template if template.count("{text}") == 1 else "Review: {text}\nSentiment:"


@st.composite
def task_specs(draw, name: str | None = None) -> dict[str, Any]:
    """A TaskSpec the schema and its validators accept: one {text}, no trailing whitespace,
    2+ distinct label words, each demonstrated (or a draw from the dataset under data_root)."""
    spec: dict[str, Any] = {"name": name or draw(NAME), "template": draw(templates())}
    if draw(st.integers(0, 5)) == 0:
        spec["labels"] = ["Negative", "Positive"]
        spec["demonstrations"] = {
            "path": draw(st.sampled_from(["sst", "sst/train.jsonl"])),
            "shots_per_class": draw(st.integers(1, 2)),
            "seed": draw(st.integers(0, 99)),
        }
    else:
        labels = [
            word + draw(SUFFIX) for word in draw(st.lists(st.sampled_from(WORDS), min_size=2, max_size=4, unique=True))
        ]
        demos = [
            {"text": draw(FREE_TEXT), "label": draw(st.sampled_from([label, label.lower(), f" {label} "]))}
            for label in labels
            for _ in range(draw(st.integers(1, 2)))
        ]
        spec["labels"] = labels
        spec["demonstrations"] = draw(st.permutations(demos))
    if draw(st.booleans()):
        spec["separator"] = draw(
            st.one_of(st.sampled_from(["\n", "\n\n", " | "]), st.text(SAFE_CHAR, min_size=1, max_size=3))
        )
    if draw(st.booleans()):
        spec["method"] = draw(st.sampled_from(SERVED_METHODS))
    if draw(st.booleans()):
        spec["calibrate"] = draw(st.booleans())
    return spec


def classify_bodies(task: str) -> st.SearchStrategy[dict[str, Any]]:
    inputs = st.one_of(
        FREE_TEXT, st.lists(FREE_TEXT, min_size=1, max_size=4), st.sampled_from(["word " * 600, ["ok"] * 33])
    )  # past max_input_tokens / max_inputs
    method = st.one_of(st.none(), st.sampled_from(SERVED_METHODS))
    return st.builds(lambda text, m: {"task": task, "input": text} | ({"method": m} if m else {}), inputs, method)


# --- the tests (in order: they share one server) --------------------------------------------------


def wait_job(fuzz: Fuzzer, path: str, job_id: str, timeout: float = 60) -> dict:
    """Poll a job until it ends; the first and the last answer are validated (a fixed count per run)."""
    operation = fuzz.operation(path, "GET")
    fuzz.send(operation.Case(path_parameters={"job_id": job_id}))
    deadline = time.monotonic() + timeout
    while fuzz.client.get(path.format(job_id=job_id), headers=ADMIN).json()["status"] in ("pending", "running"):
        assert time.monotonic() < deadline, f"job {job_id} still running after {timeout} s"
        time.sleep(0.05)
    return fuzz.send(operation.Case(path_parameters={"job_id": job_id})).json()


def test_generated_requests_conform(fuzzer):
    """Every operation, with generated valid then invalid data (the admin key added for /admin)."""
    findings = fuzzer.findings()

    def send(case: Any) -> None:
        if (
            case.method == "DELETE"
            and case.path == "/admin/tasks/{name}"
            and case.path_parameters.get("name") == "sentiment"
        ):
            case.path_parameters["name"] = "not-sentiment"  # keep the served task for the later tests
        fuzzer.send(case)

    for result in fuzzer.schema.get_all_operations():
        operation = result.ok()
        run_examples(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            send,
            POSITIVE_EXAMPLES,
            f"{operation.label} positive",
        )
        # Unsatisfiable: nothing invalid to generate (no parameters, or only free-form string path parameters).
        with contextlib.suppress(Unsatisfiable):
            run_examples(
                operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
                send,
                NEGATIVE_EXAMPLES,
                f"{operation.label} negative",
            )
    assert len(fuzzer.operations) == len(list(fuzzer.schema.get_all_operations()))
    findings.check()


def test_valid_classify_and_task_lifecycles(fuzzer):
    """Valid bodies for the served task; valid specs created, read, classified, replaced and deleted."""
    findings = fuzzer.findings()
    post = fuzzer.operation("/admin/tasks", "POST")
    put = fuzzer.operation("/admin/tasks/{name}", "PUT")
    get = fuzzer.operation("/v1/tasks/{name}", "GET")
    delete = fuzzer.operation("/admin/tasks/{name}", "DELETE")
    classify = fuzzer.operation("/v1/classify", "POST")
    run_examples(
        classify_bodies("sentiment"),
        lambda body: fuzzer.send(classify.Case(body=body, media_type="application/json")),
        30,
        "classify sentiment",
    )
    outcomes: Counter = Counter()

    def lifecycle(example: tuple[dict, dict, list[dict]]) -> None:
        spec, replacement, bodies = example
        name = spec["name"]
        created = fuzzer.send(post.Case(body=spec, media_type="application/json"))
        outcomes[f"create {created.status_code}"] += 1
        if created.status_code != 201:
            return
        fuzzer.send(get.Case(path_parameters={"name": name}))
        for body in bodies[:2]:
            fuzzer.send(classify.Case(body=body | {"task": name}, media_type="application/json"))
        replaced = fuzzer.send(
            put.Case(path_parameters={"name": name}, body=replacement | {"name": name}, media_type="application/json")
        )
        outcomes[f"replace {replaced.status_code}"] += 1
        for body in bodies[2:]:
            fuzzer.send(classify.Case(body=body | {"task": name}, media_type="application/json"))
        deleted = fuzzer.send(delete.Case(path_parameters={"name": name}))
        outcomes[f"delete {deleted.status_code}"] += 1
        gone = fuzzer.send(get.Case(path_parameters={"name": name}))
        assert gone.status_code == 404, gone.text

    strategy = st.tuples(task_specs(), task_specs(name="same"), st.lists(classify_bodies("x"), min_size=1, max_size=4))
    run_examples(strategy, lifecycle, 16, "task lifecycle")
    assert outcomes["create 201"] >= 8 and outcomes["replace 201"] >= 4, outcomes  # the success path ran
    findings.check()


def test_jobs_and_analyses(fuzzer):
    """A β training and an analysis that succeed; then their routes fuzzed with the real ids."""
    findings = fuzzer.findings()
    post = fuzzer.operation("/admin/tasks", "POST")
    delete = fuzzer.operation("/admin/tasks/{name}", "DELETE")
    reweight = fuzzer.operation("/admin/tasks/{name}/reweighting", "POST")
    classify = fuzzer.operation("/v1/classify", "POST")
    spec = sentiment_task(name="fz-reweight").model_dump(mode="json")
    assert fuzzer.send(post.Case(body=spec, media_type="application/json")).status_code == 201
    started = fuzzer.send(
        reweight.Case(
            path_parameters={"name": "fz-reweight"},
            media_type="application/json",
            body={"examples": TRAIN_ROWS[:4], "epochs": 2},
        )
    )
    assert started.status_code == 202, started.text
    job = wait_job(fuzzer, "/admin/jobs/{job_id}", started.json()["job"])
    assert job["status"] == "succeeded", job
    run_examples(
        classify_bodies("fz-reweight"),
        lambda body: fuzzer.send(classify.Case(body=body, media_type="application/json")),
        10,
        "classify reweighted",
    )
    from_data = fuzzer.send(
        reweight.Case(
            path_parameters={"name": "fz-reweight"},
            media_type="application/json",
            body={"data": {"path": "sst", "per_class": 1}, "epochs": 1},
        )
    )
    assert from_data.status_code == 202, from_data.text
    wait_job(fuzzer, "/admin/jobs/{job_id}", from_data.json()["job"])
    for method in ("zero_shot", "vanilla"):  # tasks β cannot apply to
        other = sentiment_task(name=f"fz-{method}", method=method).model_dump(mode="json")
        assert fuzzer.send(post.Case(body=other, media_type="application/json")).status_code == 201
        fuzzer.send(
            reweight.Case(
                path_parameters={"name": f"fz-{method}"},
                media_type="application/json",
                body={"examples": TRAIN_ROWS[:4], "epochs": 1},
            )
        )
        fuzzer.send(delete.Case(path_parameters={"name": f"fz-{method}"}))

    analysis = fuzzer.send(
        fuzzer.operation("/admin/analyses", "POST").Case(
            media_type="application/json",
            body={
                "kind": "deep_layers",
                "task": "sentiment",
                "data": {"examples": TRAIN_ROWS},
                "params": {"seeds": [1], "limit": 4},
            },
        )
    )
    assert analysis.status_code == 202, analysis.text
    analysis_id = analysis.json()["id"]
    done = wait_job(fuzzer, "/admin/analyses/{job_id}", analysis_id)
    assert done["status"] == "succeeded", done
    plot = fuzzer.operation("/admin/analyses/{job_id}/plots/{name}.png", "GET")
    for url in done["plots"].values():
        name = url.rsplit("/", 1)[1].removesuffix(".png")
        fuzzer.send(plot.Case(path_parameters={"job_id": analysis_id, "name": name}))

    # The same routes generated again, with ids that exist (a finished job, a served task).
    fixed = [
        ("/admin/jobs/{job_id}", "GET", {"job_id": job["id"]}),
        ("/admin/jobs/{job_id}", "DELETE", {"job_id": job["id"]}),
        ("/admin/analyses/{job_id}", "GET", {"job_id": analysis_id}),
        ("/admin/analyses/{job_id}", "DELETE", {"job_id": analysis_id}),
        ("/admin/analyses/{job_id}/plots/{name}.png", "GET", {"job_id": analysis_id}),
        ("/v1/tasks/{name}", "GET", {"name": "sentiment"}),
        ("/admin/tasks/{name}/reweighting", "POST", {"name": "fz-reweight"}),
        ("/admin/tasks/{name}", "PUT", {"name": "fz-reweight"}),
    ]
    for path, method, params in fixed:
        strategy = fuzzer.operation(path, method).as_strategy(path_parameters=params)
        run_examples(strategy, fuzzer.send, 10, f"fixed {method} {path}")
    deleted = fuzzer.send(delete.Case(path_parameters={"name": "fz-reweight"}))
    assert deleted.status_code in (200, 409), deleted.text  # 409 while a generated training still runs
    findings.check()


def test_http_framing(fuzzer):
    """What the generator never sends: no or wrong key, non-JSON bodies, broken JSON, huge bodies,
    undecodable path parameters, unknown methods and routes."""
    findings = fuzzer.findings()
    big = b'{"task": "' + b"x" * fuzzer.client.app.state.anchor.settings.max_payload_bytes + b'"}'
    json_type = {"Content-Type": "application/json"}
    methods: dict[str, set[str]] = {}
    for result in fuzzer.schema.get_all_operations():
        operation = result.ok()
        path, method = operation.path, operation.method.upper()
        methods.setdefault(path, set()).add(method)
        auth = ADMIN if path.startswith("/admin") else {}
        params = {p.name: ("sentiment" if p.name == "name" else "job-none") for p in operation.path_parameters}
        url = path.format(**params)
        if path.startswith("/admin"):
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": "admin-secret"},
                {"Authorization": "Basic YWRtaW4tc2VjcmV0"},
            ):
                fuzzer.send_raw(path, method, url, headers, None, path_parameters=params)
        for raw in ("%ED%A0%80", "%FF%FE", "%00", "%20", "%2E"):  # a surrogate's bytes, bad UTF-8, NUL, ...
            if params:
                weird = dict.fromkeys(params, raw)
                fuzzer.send_raw(
                    path,
                    method,
                    path.format(**weird),
                    auth | (json_type if method in ("POST", "PUT") else {}),
                    b"{}" if method in ("POST", "PUT") else None,
                    path_parameters=params,
                    **({"media_type": "application/json"} if method in ("POST", "PUT") else {}),
                )
        if method in ("POST", "PUT"):
            for headers, content in (
                (auth, b"{}"),
                (auth | {"Content-Type": "text/plain"}, b"{}"),
                (auth | {"Content-Type": "application/x-www-form-urlencoded"}, b"a=1"),
                (auth | json_type, b""),
                (auth | json_type, b'{"task": '),
                (auth | json_type, b"\xff\xfe"),
                (auth | json_type, b"[]"),
                (auth | json_type, b"null"),
                (auth | json_type, b'"\\ud800"'),
                (auth | json_type, b"[" * 100_000),
                (auth | json_type, big),
            ):
                fuzzer.send_raw(
                    path, method, url, headers, content, path_parameters=params, media_type="application/json"
                )
    for path, allowed in methods.items():
        url = path.replace("{name}", "sentiment").replace("{job_id}", "job-none")
        for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE"} - allowed):
            fuzzer.send_unrouted(method, url, ADMIN)
    for url in ("/nope", "/v1", "/admin", "/admin/tasks/a/b/c", "/%00", "/v1/classify/x"):
        fuzzer.send_unrouted("GET", url, ADMIN)
    findings.check()


HOSTILE_PATHS = [
    "",
    ".",
    "..",
    "../..",
    "/",
    "/etc/passwd",
    "~",
    "sst",
    "sst/",
    "sst//train.jsonl",
    "sst/train.jsonl/..",
    "sst/nope.jsonl",
    "binary.jsonl",
    "deep.jsonl",
    "rows.jsonl",
    "empty.jsonl",
    "no-train",
    "dir.jsonl",
    "escape",
    "escape/passwd",
    "loop",
    "loop/train.jsonl",
    "a" * 300,
    "a/" * 3000,
    "%2e%2e",
    "sst/train.jsonl\x00",
    "\ud800",
]


def test_paths_under_the_data_root(fuzzer):
    """Every route that reads under data_root, with paths that must each be a clean 4xx (or work)."""
    findings = fuzzer.findings()
    post = fuzzer.operation("/admin/tasks", "POST")
    delete = fuzzer.operation("/admin/tasks/{name}", "DELETE")
    reweight = fuzzer.operation("/admin/tasks/{name}/reweighting", "POST")
    analyses = fuzzer.operation("/admin/analyses", "POST")
    spec = sentiment_task(name="fz-paths").model_dump(mode="json")
    assert fuzzer.send(post.Case(body=spec, media_type="application/json")).status_code == 201
    for i, path in enumerate(HOSTILE_PATHS):
        drawn = spec | {"name": f"fz-path-{i}", "demonstrations": {"path": path}}
        if fuzzer.send(post.Case(body=drawn, media_type="application/json")).status_code == 201:
            fuzzer.send(delete.Case(path_parameters={"name": f"fz-path-{i}"}))
        trained = fuzzer.send(
            reweight.Case(
                path_parameters={"name": "fz-paths"},
                media_type="application/json",
                body={"data": {"path": path, "per_class": 1}, "epochs": 1},
            )
        )
        if trained.status_code == 202:  # wait, or the next path only meets a 409
            wait_job(fuzzer, "/admin/jobs/{job_id}", trained.json()["job"])
        analysed = fuzzer.send(
            analyses.Case(
                media_type="application/json",
                body={"kind": "error_diagnosis", "task": "sentiment", "data": {"path": path}, "params": {"limit": 2}},
            )
        )
        if analysed.status_code == 202:  # wait, or the next path only meets a 429
            wait_job(fuzzer, "/admin/analyses/{job_id}", analysed.json()["id"])
    fuzzer.send(delete.Case(path_parameters={"name": "fz-paths"}))
    findings.check()


def test_slow_builds_answer_a_documented_status(fuzzer):
    """A build slower than admin_sync_wait_s answers 202 + job (under load it happens with the default
    2 s too); that answer must be in the schema, and so must the 409s of writes racing the build."""
    findings = fuzzer.findings()
    settings_ = fuzzer.client.app.state.anchor.settings
    before, settings_.admin_sync_wait_s = settings_.admin_sync_wait_s, 0.0
    try:
        post = fuzzer.operation("/admin/tasks", "POST")
        put = fuzzer.operation("/admin/tasks/{name}", "PUT")
        delete = fuzzer.operation("/admin/tasks/{name}", "DELETE")
        spec = sentiment_task(name="fz-slow").model_dump(mode="json")
        created = fuzzer.send(post.Case(body=spec, media_type="application/json"))
        fuzzer.send(post.Case(body=spec, media_type="application/json"))  # 409: building (or exists)
        fuzzer.send(delete.Case(path_parameters={"name": "fz-slow"}))  # 409 while building
        if created.status_code == 202:
            wait_job(fuzzer, "/admin/jobs/{job_id}", created.json()["job"])
        replaced = fuzzer.send(put.Case(path_parameters={"name": "fz-slow"}, body=spec, media_type="application/json"))
        if replaced.status_code == 202:
            wait_job(fuzzer, "/admin/jobs/{job_id}", replaced.json()["job"])
        fuzzer.send(delete.Case(path_parameters={"name": "fz-slow"}))
    finally:
        settings_.admin_sync_wait_s = before
    findings.check()
