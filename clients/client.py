"""Typed Python clients for anchorserve (sync and async), with retries on 429/503.

    from clients import AnchorServeClient
    with AnchorServeClient("http://127.0.0.1:8000", api_key=None) as c:
        item = c.classify("sentiment", ["a wonderful film"]).data[0]
        item.label, item.label_probs  # 'Positive', {'Negative': 0.16, 'Positive': 0.84}

`classify` returns the server's response in vLLM's classify shape (`clients.protocol.ClassifyResponse`):
each `data[i]` has `index` (the input's position), `label`, `probs` (a list in label order) and
`num_classes`, and the same numbers keyed by label word in `label_probs`, `label_logprobs` and, for a
calibrated task, `raw_label_probs`. `predict` is TEI's /predict: `[LabelScore(label, score)]`, highest first.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import httpx

from clients.protocol import ClassifyResponse, LabelScore, ModelList, TaskInfo, TaskList

RETRY_STATUSES = frozenset({429, 503})


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


def _backoff(attempt: int, base: float) -> float:
    """Exponential with jitter, capped at 10 s."""
    return min(10.0, base * 2**attempt) * (0.5 + random.random() / 2)


class _Base:
    def __init__(
        self, base_url: str, api_key: str | None = None, admin_key: str | None = None, timeout: float = 60.0,
        retries: int = 5, backoff_s: float = 0.2,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key, self.admin_key = api_key, admin_key
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s

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

    def __enter__(self) -> AnchorServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> Any:
        for attempt in range(self.retries + 1):
            response = self._http.request(method, path, headers=self._headers(admin), **kwargs)
            if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                return _raise_for(response)
            time.sleep(_backoff(attempt, self.backoff_s))
        raise AssertionError("unreachable")

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

    async def __aenter__(self) -> AsyncAnchorServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> Any:
        for attempt in range(self.retries + 1):
            response = await self._http.request(method, path, headers=self._headers(admin), **kwargs)
            if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                return _raise_for(response)
            await asyncio.sleep(_backoff(attempt, self.backoff_s))
        raise AssertionError("unreachable")

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
