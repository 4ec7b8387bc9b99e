"""Prometheus metrics (vLLM-style names: anchorserve_* with _seconds / _total suffixes).

Each app gets its own registry, so tests can build several apps in one process. An engine core
behind HTTP frontends (server/supervisor.py) runs the client library's multiprocess mode: every
process writes its values under PROMETHEUS_MULTIPROC_DIR, and /metrics sums them, so request
counts from every frontend and batch figures from the core come out as one server's.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# 10 µs .. ~60 s, ×2 per bucket (TEI uses ×1.5 from 10 µs).
DURATION_BUCKETS = tuple(1e-5 * 2**i for i in range(23))
SIZE_BUCKETS = tuple(2**i for i in range(11))
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("anchorserve_requests", "HTTP requests", ["route", "task", "status"], registry=r)
        self.queue_seconds = Histogram(
            "anchorserve_request_queue_seconds", "Time from enqueue to batch start", buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.tokenize_seconds = Histogram(
            "anchorserve_request_tokenize_seconds", "Tokenisation time per request", buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "anchorserve_batch_inference_seconds", "Forward time per batch", buckets=DURATION_BUCKETS, registry=r
        )
        self.refill_seconds = Histogram(
            "anchorserve_batch_refill_seconds", "Wait of the next batch after a CPU forward for the senders it "
            "answered (refill_wait_fraction), by outcome: returned (or a batch's worth queued) or ran_out (the "
            "window ended first)", ["outcome"], buckets=DURATION_BUCKETS, registry=r,
        )
        # Only the core sets the gauges; "livesum" drops a dead core's value in multiprocess mode.
        self.queue_size = Gauge("anchorserve_queue_size", "Requests waiting for the worker", registry=r,
                                multiprocess_mode="livesum")
        self.torch_threads = Gauge("anchorserve_torch_threads", "Torch threads of the last forward on the CPU",
                                   registry=r, multiprocess_mode="livesum")
        self.batch_size = Histogram("anchorserve_batch_size", "Inputs per forward", buckets=SIZE_BUCKETS, registry=r)
        self.request_tokens = Histogram(
            "anchorserve_request_tokens", "Query tokens per input", buckets=SIZE_BUCKETS, registry=r
        )
        self.cache_bytes = Gauge("anchorserve_anchor_cache_bytes", "Anchor-cache bytes", ["task"], registry=r,
                                 multiprocess_mode="livesum")
        self.task_loads = Counter(
            "anchorserve_task_loads", "Task caches made ready, by source", ["task", "source"], registry=r
        )
        self.failures = Counter("anchorserve_request_failure", "Failed requests", ["reason"], registry=r)
        self.estimated_accuracy = Gauge(
            "anchorserve_task_estimated_accuracy", "A `method: auto` task's cross-validated accuracy on its pool, with "
            "the bounds of its 95% interval", ["task", "bound"], registry=r, multiprocess_mode="mostrecent")
        self.traffic_accuracy = Gauge(
            "anchorserve_task_traffic_accuracy", "A `method: auto` task's accuracy on its latest inputs, estimated "
            "without labels from its served probabilities, with the bounds of its 95% interval", ["task", "bound"],
            registry=r, multiprocess_mode="mostrecent")
        self._per_task = (self.requests, self.cache_bytes, self.task_loads, self.estimated_accuracy,
                          self.traffic_accuracy)

    def exposition(self) -> bytes:
        """The text /metrics serves: this app's registry, or every process's values in multiprocess mode."""
        if os.environ.get(MULTIPROCESS_ENV):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def forget_task(self, name: str) -> None:
        """Drop every series labelled with a deleted task, so label sets stay bounded by live tasks."""
        for metric in self._per_task:
            metric.remove_by_labels({"task": name})


class RequestCounter:
    """Pure ASGI middleware for anchorserve_requests_total{route, task, status}.

    Handlers name the task in `request.state.task` (kept in scope["state"]); it becomes a label only
    when `is_known(task)` says the task is served, so made-up names cannot grow the label set
    (a client could otherwise fill memory and /metrics with one series per name). Pure ASGI rather
    than BaseHTTPMiddleware, so the endpoint's own `receive` (used to notice disconnects) is untouched.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, is_known: Callable[[str], bool]) -> None:
        self.app = app
        self.metrics = metrics
        self.is_known = is_known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            task = scope.get("state", {}).get("task", "")
            task = task if task and self.is_known(task) else ""
            self.metrics.requests.labels(route, task, str(status)).inc()
