"""Typed Python clients for anchorserve (sync and async).

    from clients import AnchorServeClient
    with AnchorServeClient("http://127.0.0.1:8000", api_key=None) as c:
        item = c.classify("sentiment", ["a wonderful film"]).data[0]
        item.label, item.label_probs  # 'Positive', {'Negative': 0.16, 'Positive': 0.84}

`classify` returns the server's response in vLLM's classify shape (`clients.protocol.ClassifyResponse`):
each `data[i]` has `index` (the input's position), `label`, `probs` (a list in label order) and
`num_classes`, and the same numbers keyed by label word in `label_probs`, `label_logprobs` and, for a
calibrated task, `raw_label_probs`. `predict` is TEI's /predict: `[LabelScore(label, score)]`, highest first.

Idempotent requests (GET, PUT, DELETE, and the classification POSTs, which change nothing on the
server) are retried on a dropped or refused connection, 429 and 503: after the server's
`Retry-After` when it sends one, else after an exponential backoff with full jitter, at most
`retries` times and never starting later than `max_retry_s` after the first try. Other POSTs (a task
creation, a β training, an analysis) go once: their first try may have been stored before the error,
and a second would answer 409 or start a second job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from clients.protocol import ClassifyResponse, LabelScore, ModelList, TaskInfo, TaskList

RETRY_STATUSES = frozenset({429, 503})
IDEMPOTENT_METHODS = frozenset({"GET", "PUT", "DELETE"})
# The POST routes the client sends that only compute an answer: classify (vLLM's shape) and predict (TEI's).
PURE_POSTS = frozenset({"/v1/classify", "/predict"})
# The request never reached the server, or its connection dropped before an answer. Timeouts are
# left out: the request may still be running, and a retry would multiply the caller's timeout.
RETRY_ERRORS = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout)
MAX_BACKOFF_S = 10.0


class AnchorServeError(Exception):
    """An error answer from the server: its status, message and type."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status, self.message, self.kind = status, message, kind


def _raise_for(response: httpx.Response) -> Any:
    """The JSON body of a success (raw bytes for anything else, e.g. a PNG), or AnchorServeError."""
    if response.is_success:
        is_json = response.headers.get("content-type", "").startswith("application/json")
        return response.json() if is_json else response.content
    try:
        body = response.json()
        error = body.get("error", response.text)
        message = error.get("message", str(error)) if isinstance(error, dict) else error  # vLLM's routes nest it
        raise AnchorServeError(response.status_code, message, body.get("type", "unknown"))
    except (ValueError, AttributeError):
        raise AnchorServeError(response.status_code, response.text, "unknown") from None


def idempotent(method: str, path: str) -> bool:
    """Whether sending the request twice leaves the server as sending it once: only those are retried."""
    return method in IDEMPOTENT_METHODS or (method == "POST" and path in PURE_POSTS)


def _retry_after(response: httpx.Response) -> float | None:
    """The server's Retry-After in seconds (the server sends no HTTP-date form)."""
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


class _WaitRetryAfter(wait_base):
    """The server's Retry-After when the answer has one, else exponential backoff with full jitter."""

    def __init__(self, backoff_s: float) -> None:
        self.backoff = wait_random_exponential(multiplier=backoff_s, max=MAX_BACKOFF_S)

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed:
            after = _retry_after(outcome.result())
            if after is not None:
                return after
        return self.backoff(retry_state)


def _last_outcome(retry_state: RetryCallState) -> httpx.Response:
    """Out of tries: the last answer (an error answer is raised by _raise_for) or the last exception."""
    assert retry_state.outcome is not None
    return retry_state.outcome.result()


class _Base:
    def __init__(
        self, base_url: str, api_key: str | None = None, admin_key: str | None = None, timeout: float = 60.0,
        retries: int = 5, backoff_s: float = 0.2, max_retry_s: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key, self.admin_key = api_key, admin_key
        self.timeout = timeout
        # tenacity's arguments for an idempotent request, fixed for the client's life: up to `retries`
        # more tries. Other requests are sent once, without tenacity.
        self._retry_policy: dict[str, Any] = {
            "stop": stop_after_attempt(retries + 1) | stop_before_delay(max_retry_s),
            "wait": _WaitRetryAfter(backoff_s),
            "retry": retry_if_exception_type(RETRY_ERRORS)
            | retry_if_result(lambda response: response.status_code in RETRY_STATUSES),
            "retry_error_callback": _last_outcome,
        }

    def _headers(self, admin: bool) -> dict[str, str]:
        key = self.admin_key if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    @staticmethod
    def _classify_body(task: str | None, inputs: str | list[str], method: str | None, **options: Any
                       ) -> dict[str, Any]:
        """The JSON body; options left at None are left out, so the server's defaults apply."""
        fields = {"task": task, "input": inputs, "method": method} | options
        return {k: v for k, v in fields.items() if v is not None}

    @staticmethod
    def _predict_body(inputs: str | list[str], raw_scores: bool, task: str | None, **options: Any) -> dict[str, Any]:
        """TEI's /predict body: a list of texts goes as a batch [[text], ...]."""
        sent: str | list[list[str]] = inputs if isinstance(inputs, str) else [[text] for text in inputs]
        fields = {"inputs": sent, "raw_scores": raw_scores, "task": task} | options
        return {k: v for k, v in fields.items() if v is not None}

    @staticmethod
    def _predictions(data: Any, batch: bool) -> list[LabelScore] | list[list[LabelScore]]:
        if batch:
            return [[LabelScore.model_validate(s) for s in row] for row in data]
        return [LabelScore.model_validate(s) for s in data]


class AnchorServeClient(_Base):
    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout)
        # The policy's objects are built once; tenacity's wrapper runs each call on a shallow copy that holds
        # that call's attempt state (state a Retrying keeps per thread, not per call).
        self._retried_request = Retrying(**self._retry_policy).wraps(self._http.request)

    def __enter__(self) -> AnchorServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> Any:
        send = self._retried_request if idempotent(method, path) else self._http.request
        return _raise_for(send(method, path, headers=self._headers(admin), **kwargs))

    def ready(self) -> bool:
        return self._http.get("/ready").status_code == 200

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.ready():
                    return
            except httpx.TransportError:
                pass
            time.sleep(interval)
        raise TimeoutError(f"{self.base_url} not ready after {timeout}s")

    def classify(
        self, task: str | None, inputs: str | list[str], method: str | None = None, *, model: str | None = None,
        truncate: bool | None = None, truncation_direction: str | None = None,
    ) -> ClassifyResponse:
        """POST /v1/classify. `task` None: the server's default task; `truncate` None: the server's setting;
        `truncation_direction` "right" (cut the end) or "left" (cut the start)."""
        body = self._classify_body(task, inputs, method, model=model, truncate=truncate,
                                   truncation_direction=truncation_direction)
        return ClassifyResponse.model_validate(self._request("POST", "/v1/classify", json=body))

    def predict(
        self, inputs: str | list[str], raw_scores: bool = False, task: str | None = None, *,
        truncate: bool | None = None, truncation_direction: str | None = None,
    ) -> list[LabelScore] | list[list[LabelScore]]:
        """POST /predict (TEI's shape): one text gives [LabelScore], a list of texts one such list per text."""
        body = self._predict_body(inputs, raw_scores, task, truncate=truncate,
                                  truncation_direction=truncation_direction)
        return self._predictions(self._request("POST", "/predict", json=body), not isinstance(inputs, str))

    def models(self) -> ModelList:
        """GET /v1/models: the served model's name, for `model=`."""
        return ModelList.model_validate(self._request("GET", "/v1/models"))

    def tasks(self) -> list[TaskInfo]:
        return TaskList.model_validate(self._request("GET", "/v1/tasks")).data

    def task(self, name: str) -> TaskInfo:
        return TaskInfo.model_validate(self._request("GET", f"/v1/tasks/{name}"))

    def create_task(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/admin/tasks", admin=True, json=spec)

    def replace_task(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._request("PUT", f"/admin/tasks/{spec['name']}", admin=True, json=spec)

    def delete_task(self, name: str) -> dict[str, Any]:
        return self._request("DELETE", f"/admin/tasks/{name}", admin=True)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/admin/jobs/{job_id}", admin=True)

    def start_analysis(
        self, kind: str, task: str, examples: list[dict[str, str]] | None = None, path: str | None = None,
        params: dict[str, Any] | None = None, demonstrations: str = "task",
    ) -> dict[str, Any]:
        """Start saliency | isolation | deep_layers | error_diagnosis on inline rows or a data_root path."""
        data = {"examples": examples} if examples is not None else {"path": path}
        body = {"kind": kind, "task": task, "data": data, "params": params or {}, "demonstrations": demonstrations}
        return self._request("POST", "/admin/analyses", admin=True, json=body)

    def analysis(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/admin/analyses/{job_id}", admin=True)

    def analysis_plot(self, job_id: str, name: str) -> bytes:
        return self._request("GET", f"/admin/analyses/{job_id}/plots/{name}.png", admin=True)

    def cancel_analysis(self, job_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/admin/analyses/{job_id}", admin=True)

    def wait_analysis(
        self, job_id: str, timeout: float = 3600.0, interval: float = 0.5,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job ends; returns its final status (check `status` and `error`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.analysis(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] not in ("pending", "running"):
                return job
            time.sleep(interval)
        raise TimeoutError(f"analysis {job_id} still running after {timeout}s")


class AsyncAnchorServeClient(_Base):
    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout)
        # As in AnchorServeClient; here the per-call copy matters more, as concurrent requests share a thread.
        self._retried_request = AsyncRetrying(**self._retry_policy).wraps(self._http.request)

    async def __aenter__(self) -> AsyncAnchorServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> Any:
        send = self._retried_request if idempotent(method, path) else self._http.request
        return _raise_for(await send(method, path, headers=self._headers(admin), **kwargs))

    async def classify(
        self, task: str | None, inputs: str | list[str], method: str | None = None, *, model: str | None = None,
        truncate: bool | None = None, truncation_direction: str | None = None,
    ) -> ClassifyResponse:
        """As AnchorServeClient.classify."""
        body = self._classify_body(task, inputs, method, model=model, truncate=truncate,
                                   truncation_direction=truncation_direction)
        return ClassifyResponse.model_validate(await self._request("POST", "/v1/classify", json=body))

    async def predict(
        self, inputs: str | list[str], raw_scores: bool = False, task: str | None = None, *,
        truncate: bool | None = None, truncation_direction: str | None = None,
    ) -> list[LabelScore] | list[list[LabelScore]]:
        """As AnchorServeClient.predict."""
        body = self._predict_body(inputs, raw_scores, task, truncate=truncate,
                                  truncation_direction=truncation_direction)
        return self._predictions(await self._request("POST", "/predict", json=body), not isinstance(inputs, str))

    async def models(self) -> ModelList:
        return ModelList.model_validate(await self._request("GET", "/v1/models"))

    async def tasks(self) -> list[TaskInfo]:
        return TaskList.model_validate(await self._request("GET", "/v1/tasks")).data
