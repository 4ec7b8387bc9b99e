"""An HTTP frontend: one of N processes in front of the engine core (`--api-servers N`).

Each frontend is a lean pure-ASGI app under uvicorn, on its own socket of the public address's
SO_REUSEPORT group (server/serving.py).
It serves the classification routes itself: it checks the key and the media type, reads the body
within `max_payload_bytes`, validates it with the same pydantic models as the core's routes,
tokenises with its own tokenizer, sends token ids to the core over ZeroMQ (server/remote.py) and
shapes the answer with the same functions as the core's routes, encoded by orjson. Every other
route (admin, jobs, analyses, tasks, /ready, /metrics, /docs) is relayed to the core's own HTTP
server on a unix socket, so writes, jobs and replication keep one owner.

Both paths answer 503 `unavailable` at once while the core is down; the request id (the client's
X-Request-ID, or a new one) travels with a relayed request and comes back on every answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pydantic
from starlette.types import Message, Receive, Scope, Send

from anchor_cache.errors import AnchorServeError
from server.app import REQUEST_ID_HEADER, acceptable_request_id
from server.auth import is_json, key_matches
from server.classify import Classification, ClassifyService
from server.errors import dialect_of, error_body, error_headers, invalid_body, status_in, status_of
from server.heap import freeze_startup_heap
from server.metrics import Metrics
from server.protocol import ClassifyRequest, PredictRequest, classify_body, predict_body, timing_headers
from server.remote import RemoteEngine
from server.settings import Settings

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per relayed request otherwise

READY_WAIT_S = 3.0  # how long a starting frontend waits for the core to describe its model

# Not relayed: they describe one hop's connection, not the request.
HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
                         b"host", b"content-length", b"x-request-id"})
RELAY_TIMEOUT = httpx.Timeout(120.0, connect=2.0)


class Reply(Exception):
    """An answer decided before the service runs (an error, or a 413)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# A classification route: (body, scope, receive, request id) -> (answer, extra headers, task served).
Handler = Callable[[bytes, Scope, Receive, str], Awaitable[tuple[Any, dict[str, str], str]]]


class Frontend:
    def __init__(self, settings: Settings, engine_address: str, core_http: str) -> None:
        self.settings = settings
        self.engine = RemoteEngine(engine_address)
        self.metrics = Metrics()
        self.service = ClassifyService(self.engine, settings, self.metrics)
        self.core = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=core_http), base_url="http://core",
                                      timeout=RELAY_TIMEOUT)
        self.routes: dict[str, Handler] = {"/v1/classify": self._classify, "/classify": self._classify,
                                           "/predict": self._predict}
        self._heap: asyncio.Task | None = None  # freezes the heap once the core described its model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if acceptable_request_id(given) else secrets.token_hex(16)
        handler = self.routes.get(scope["path"]) if scope["method"] == "POST" else None
        if scope["path"] == "/ready" and not self.engine.ready:
            message = "this frontend is connecting to the engine core; retry shortly"
            await _respond(send, 503, orjson.dumps(error_body("unavailable", message)), request_id)
            return
        if handler is None:
            await self._relay(scope, receive, send, request_id)
            return
        task, extra = "", None
        try:
            self._check_key(headers.get(b"authorization"))
            if not is_json(headers.get(b"content-type", b"").decode("latin-1")):
                raise Reply("unsupported_media_type", "send the body as JSON with 'Content-Type: application/json'")
            body = await self._read_body(scope, receive)
            data, extra, task = await handler(body, scope, receive, request_id)
            status, answer = 200, orjson.dumps(data)
        except (Reply, AnchorServeError) as exc:
            kind = exc.kind
            dialect = dialect_of(scope["path"])
            status, answer = status_in(kind, dialect), orjson.dumps(error_body(kind, str(exc), dialect))
            if status >= 500:
                log.error("%s %s -> %s: %s", scope["method"], scope["path"], kind, exc)
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            message = f"internal error; quote request id {request_id} to the operator"
            status, answer = 500, orjson.dumps(error_body("internal", message, dialect_of(scope["path"])))
        # Counted before the answer leaves, so a client that reads /metrics next sees its request.
        # Labelled by task only once it answered: made-up names cannot grow the label set.
        self.metrics.requests.labels(scope["path"], task, str(status)).inc()
        await _respond(send, status, answer, request_id, extra)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.engine.start()
                self._heap = asyncio.create_task(self._freeze_heap_once_ready(), name="anchorserve-freeze-heap")
                # Beside a serving core (a frontend restarted) requests wait in this frontend's
                # socket until it can answer them, rather than get 503s a ready frontend would not give.
                if not (await asyncio.wait({self._heap}, timeout=READY_WAIT_S))[0]:
                    log.info("the engine core is not ready yet; answering 503 until it is")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._heap is not None:
                    self._heap.cancel()
                await self.engine.stop()
                self.service.close()
                await self.core.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _freeze_heap_once_ready(self) -> None:
        """The tokenizer loads once the core has described its model: its objects are start-up's too."""
        await self.engine.wait_ready(None)
        freeze_startup_heap()

    # --- classification ---------------------------------------------------------------------------

    def _check_key(self, header: bytes | None) -> None:
        key = self.settings.api_key
        if key is not None and not key_matches(header.decode("latin-1") if header else None, key):
            raise Reply("unauthorized", "missing or wrong API key: send 'Authorization: Bearer <API_KEY>'")

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The body, refused with 413 past max_payload_bytes (declared or as it arrives)."""
        limit = self.settings.max_payload_bytes
        too_large = Reply("payload_too_large", f"payload exceeds {limit} bytes (max_payload_bytes)")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise Reply("timeout", "the client went away before its body ended")
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                raise too_large
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _parse(model: type[pydantic.BaseModel], body: bytes) -> Any:
        try:
            return model.model_validate_json(body)
        except pydantic.ValidationError as exc:
            raise Reply(*invalid_body(exc.errors())) from None

    async def _classify(self, body: bytes, scope: Scope, receive: Receive, request_id: str
                        ) -> tuple[Any, dict[str, str], str]:
        request: ClassifyRequest = self._parse(ClassifyRequest, body)
        result = await self.service.answer(request, receive)
        return (classify_body(result, request_id, request.use_activation is not False), timing_headers(result.timing),
                result.task)

    async def _predict(self, body: bytes, scope: Scope, receive: Receive, request_id: str
                       ) -> tuple[Any, dict[str, str], str]:
        request: PredictRequest = self._parse(PredictRequest, body)
        result: Classification = await self.service.classify(
            request.task, request.texts, None, receive, truncate=request.truncate,
            direction=request.truncation_direction,
        )
        return predict_body(result, request.raw_scores, request.batched), timing_headers(result.timing), result.task

    # --- everything else: the core's own routes -----------------------------------------------------

    async def _relay(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        try:
            body = await self._read_body(scope, receive)
        except Reply as exc:
            await _respond(send, status_of(exc.kind), orjson.dumps(error_body(exc.kind, str(exc))), request_id)
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_HEADERS]
        headers.append((b"x-request-id", request_id.encode()))
        url = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        try:
            answer = await self.core.request(scope["method"], url, headers=headers, content=body)
        except httpx.TransportError:
            message = "the engine core is not running (starting or restarting); retry shortly"
            await _respond(send, 503, orjson.dumps(error_body("unavailable", message)), request_id)
            return
        kept = [(k, v) for k, v in answer.headers.raw if k.lower() not in HOP_HEADERS]
        kept += [(b"content-length", str(len(answer.content)).encode()), (b"x-request-id", request_id.encode())]
        await send({"type": "http.response.start", "status": answer.status_code, "headers": kept})
        await send({"type": "http.response.body", "body": answer.content})


async def _respond(send: Send, status: int, body: bytes, request_id: str, extra: dict[str, str] | None = None
                   ) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (REQUEST_ID_HEADER.lower().encode(), request_id.encode())]
    headers += [(k.encode(), v.encode()) for k, v in (error_headers(status) | (extra or {})).items()]
    start: Message = {"type": "http.response.start", "status": status, "headers": headers}
    with contextlib.suppress(OSError):  # the client left: nothing to answer
        await send(start)
        await send({"type": "http.response.body", "body": body})
