"""The server's only status table, and the one error envelope: {"error": message, "type": kind}.

The classify routes of the servers this one stands in for answer in their clients' conventions too:
TEI's routes add TEI's `error_type`; vLLM's (`/v1/classify`, `/classify`, and `/invocations` for a
vLLM-shaped body, as vLLM serves it) nest OpenAI's error object under `error` and answer 400 where
a request is invalid, as vLLM does. `type` stays beside them on every route.

Engine errors carry their kind (`anchor_cache.errors`); the server adds its own kinds for queueing,
auth and HTTP framing. FastAPI's and Starlette's own errors are rewritten into the same envelope,
and an unexpected exception becomes a JSON 500 that names the request id, never a traceback.
Client errors are logged in one line without a traceback, so a client cannot flood the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any, Literal

from asgi_correlation_id import correlation_id
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from anchor_cache.errors import AnchorServeError

log = logging.getLogger(__name__)

STATUS: dict[str, int] = {
    "malformed_json": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "cache_mismatch": 409,
    "cancelled": 409,
    "precondition_failed": 412,
    "empty_input": 400,  # TEI's and vLLM's 400 for an empty input
    "payload_too_large": 413,
    "input_limit": 413,  # more inputs or tokens than the limits allow (TEI's 413)
    "unsupported_media_type": 415,
    "model_not_found": 404,  # a request named a model this server does not serve (OpenAI's and vLLM's 404)
    "validation": 422,
    "model_unavailable": 424,  # the configured model is missing (TEI's Backend → 424); start-up ends on it
    "overloaded": 429,
    "client_closed": 499,  # nginx's code: the client left before its answer (logged and counted, never sent)
    "internal": 500,
    "unavailable": 503,
    "timeout": 504,
}


class ModelNotServed(AnchorServeError):
    kind = "model_not_found"


class ClientDisconnected(AnchorServeError):
    kind = "client_closed"


class EmptyInput(AnchorServeError):
    kind = "empty_input"


class InputLimit(AnchorServeError):
    kind = "input_limit"


class Unauthorized(AnchorServeError):
    kind = "unauthorized"


class UnsupportedMediaType(AnchorServeError):
    kind = "unsupported_media_type"


def status_of(kind: str) -> int:
    return STATUS.get(kind, 500)


def printable(message: str) -> str:
    """Messages can quote what a client sent; lone surrogates must not break the JSON encoder."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


# An error message quotes what it must to say what is wrong, never a whole request: a large invalid
# body must not come back several times larger.
MAX_MESSAGE_CHARS = 2000
MAX_FIELD_ERRORS = 10


# TEI's clients read `error_type` (TEI's ErrorType: unhealthy, backend, overloaded, validation,
# empty, ...) beside `error`.
TEI_PATHS = frozenset({"/predict", "/", "/invocations"})
TEI_TYPES = {"unavailable": "unhealthy", "model_unavailable": "backend", "internal": "backend", "timeout": "backend",
             "overloaded": "overloaded", "empty_input": "empty"}
# vLLM's clients read OpenAI's error object; vLLM answers 400 for any invalid request.
VLLM_PATHS = frozenset({"/v1/classify", "/classify"})
BAD_REQUEST_KINDS = frozenset({"validation", "malformed_json", "empty_input", "input_limit"})
# How soon a refused client may try again, in seconds: a full queue drains in moments; a loading or
# restarting server takes longer.
RETRY_AFTER = {429: "1", 503: "5"}

Dialect = Literal["tei", "vllm"] | None


def dialect_of(path: str, body: object = None) -> Dialect:
    """Whose error conventions `path` answers in; `/invocations` follows its body, as vLLM's and
    Hugging Face's clients both post there (vLLM's with `input`, Hugging Face's with `inputs`)."""
    if path in VLLM_PATHS or (path == "/invocations" and isinstance(body, dict) and "input" in body):
        return "vllm"
    return "tei" if path in TEI_PATHS else None


def status_in(kind: str, dialect: Dialect) -> int:
    return 400 if dialect == "vllm" and kind in BAD_REQUEST_KINDS else status_of(kind)


def openai_type(status: int) -> str:
    """OpenAI's error type for a status, as vLLM names them: BadRequestError, NotFoundError, ..."""
    name = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    return name if name.endswith("Error") else name + "Error"


def error_body(kind: str, message: str, dialect: Dialect = None, status: int | None = None) -> dict[str, Any]:
    """The envelope {"error", "type"} in `dialect`'s conventions (`status`: when not the kind's own)."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + f"… ({len(message) - MAX_MESSAGE_CHARS} more characters)"
    message = printable(message)
    if dialect == "vllm":
        status = status or status_in(kind, dialect)
        return {"error": {"message": message, "type": openai_type(status), "param": None, "code": status},
                "type": kind}
    body = {"error": message, "type": kind}
    if dialect == "tei":
        body["error_type"] = TEI_TYPES.get(kind, "validation")
    return body


def error_headers(status: int) -> dict[str, str]:
    """Retry-After on the statuses a client should retry."""
    return {"Retry-After": RETRY_AFTER[status]} if status in RETRY_AFTER else {}


def error_response(kind: str, message: str, status: int | None = None,
                   headers: dict[str, str] | None = None, dialect: Dialect = None) -> JSONResponse:
    status = status or status_in(kind, dialect)
    return JSONResponse(status_code=status, content=error_body(kind, message, dialect, status),
                        headers=error_headers(status) | (headers or {}))


def request_dialect(request: Request, body: object = None) -> Dialect:
    """A route that chose its dialect from the body says so in `request.state.dialect`."""
    return getattr(request.state, "dialect", None) or dialect_of(request.url.path, body)


# The tags of protocol.InvocationRequest's union: pydantic puts them in an error's loc, but they name no field.
BODY_TAGS = frozenset({"inference", "vllm"})


def invalid_body(errors: Sequence[Any]) -> tuple[str, str]:
    """The kind and message for pydantic's errors on a request body: "malformed_json" when it is
    not JSON at all, else "validation" naming each field."""
    parts = []
    for err in errors[:MAX_FIELD_ERRORS]:
        # Field names only: pydantic also names union members ("function-before[...]") in loc.
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body" and p not in BODY_TAGS and "[" not in str(p))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    if len(errors) > MAX_FIELD_ERRORS:
        parts.append(f"and {len(errors) - MAX_FIELD_ERRORS} more errors")
    types = {e.get("type") for e in errors}
    kind = ("malformed_json" if "json_invalid" in types else EmptyInput.kind if types == {EmptyInput.kind}
            else "validation")
    return kind, "; ".join(parts)


def allowed_methods(app: FastAPI, scope: dict[str, Any]) -> list[str]:
    """Every method some route answers on the request's path, found the way the router matches."""
    return [method for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
            if any(route.matches(scope | {"method": method})[0] == Match.FULL for route in app.router.routes)]


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(AnchorServeError)
    async def _engine(request: Request, exc: AnchorServeError) -> JSONResponse:
        kind = exc.kind
        response = error_response(kind, str(exc), dialect=request_dialect(request))
        level = logging.ERROR if response.status_code >= 500 else logging.INFO
        log.log(level, "%s %s -> %d %s: %s", request.method, request.url.path, response.status_code, kind,
                printable(str(exc)))
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(*invalid_body(exc.errors()), dialect=request_dialect(request, exc.body))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's only 400 is a body it could not parse.
        kinds = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed", 403: "forbidden"}
        headers = exc.headers
        if exc.status_code == 405:  # Starlette names the methods of the first route on the path only
            headers = (headers or {}) | {"Allow": ", ".join(allowed_methods(app, request.scope))}
        return error_response(kinds.get(exc.status_code, "http_error"), str(exc.detail), exc.status_code, headers,
                              request_dialect(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response("internal", f"internal error; quote request id {correlation_id.get()} to the operator",
                              dialect=request_dialect(request))
