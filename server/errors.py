"""The server's only status table, and the one error envelope: {"error": message, "type": kind}.

Engine errors carry their kind (`anchor_cache.errors`); the server adds its own kinds for queueing,
auth and HTTP framing. FastAPI's and Starlette's own errors are rewritten into the same envelope,
and an unexpected exception becomes a JSON 500 that names the request id, never a traceback.
Client errors are logged in one line without a traceback, so a client cannot flood the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from asgi_correlation_id import correlation_id
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from anchor_cache.errors import AnchorServeError, ModelNotFoundError

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
    "payload_too_large": 413,
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


class Overloaded(AnchorServeError):
    kind = "overloaded"


class DeadlineExceeded(AnchorServeError):
    kind = "timeout"


class ClientDisconnected(AnchorServeError):
    kind = "client_closed"


class Unauthorized(AnchorServeError):
    kind = "unauthorized"


class UnsupportedMediaType(AnchorServeError):
    kind = "unsupported_media_type"


def status_of(kind: str) -> int:
    return STATUS.get(kind, 500)


def kind_of(exc: AnchorServeError) -> str:
    """The kind an error is answered with. The engine's ModelNotFoundError (the configured model
    folder or the default model's wheel is missing) is a failure of the server, not of a request:
    it must not share the 404 of a request naming a model this server does not serve."""
    return "model_unavailable" if isinstance(exc, ModelNotFoundError) else exc.kind


def printable(message: str) -> str:
    """Messages can quote what a client sent; lone surrogates must not break the JSON encoder."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


# An error message quotes what it must to say what is wrong, never a whole request: a large invalid
# body must not come back several times larger.
MAX_MESSAGE_CHARS = 2000
MAX_FIELD_ERRORS = 10


# TEI's routes answer errors in TEI's envelope too: its clients read `error_type` (TEI's ErrorType:
# unhealthy, backend, overloaded, validation, ...) beside `error`.
TEI_PATHS = frozenset({"/predict", "/", "/invocations"})
TEI_TYPES = {"unavailable": "unhealthy", "model_unavailable": "backend", "internal": "backend", "timeout": "backend",
             "overloaded": "overloaded"}
# How soon a refused client may try again, in seconds: a full queue drains in moments; a loading or
# restarting server takes longer.
RETRY_AFTER = {429: "1", 503: "5"}


def error_body(kind: str, message: str, path: str | None = None) -> dict[str, str]:
    """The envelope {"error", "type"}, with TEI's `error_type` on TEI's routes."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + f"… ({len(message) - MAX_MESSAGE_CHARS} more characters)"
    body = {"error": printable(message), "type": kind}
    if path in TEI_PATHS:
        body["error_type"] = TEI_TYPES.get(kind, "validation")
    return body


def error_headers(status: int) -> dict[str, str]:
    """Retry-After on the statuses a client should retry."""
    return {"Retry-After": RETRY_AFTER[status]} if status in RETRY_AFTER else {}


def error_response(kind: str, message: str, status: int | None = None,
                   headers: dict[str, str] | None = None, path: str | None = None) -> JSONResponse:
    status = status or status_of(kind)
    return JSONResponse(status_code=status, content=error_body(kind, message, path),
                        headers=error_headers(status) | (headers or {}))


def invalid_body(errors: Sequence[Any]) -> tuple[str, str]:
    """The kind and message for pydantic's errors on a request body: "malformed_json" when it is
    not JSON at all, else "validation" naming each field."""
    parts = []
    for err in errors[:MAX_FIELD_ERRORS]:
        # Field names only: pydantic also names union members ("function-before[...]") in loc.
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body" and "[" not in str(p))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    if len(errors) > MAX_FIELD_ERRORS:
        parts.append(f"and {len(errors) - MAX_FIELD_ERRORS} more errors")
    kind = "malformed_json" if any(e.get("type") == "json_invalid" for e in errors) else "validation"
    return kind, "; ".join(parts)


def allowed_methods(app: FastAPI, scope: dict[str, Any]) -> list[str]:
    """Every method some route answers on the request's path, found the way the router matches."""
    return [method for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
            if any(route.matches(scope | {"method": method})[0] == Match.FULL for route in app.router.routes)]


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(AnchorServeError)
    async def _engine(request: Request, exc: AnchorServeError) -> JSONResponse:
        kind = kind_of(exc)
        response = error_response(kind, str(exc), path=request.url.path)
        level = logging.ERROR if response.status_code >= 500 else logging.INFO
        log.log(level, "%s %s -> %d %s: %s", request.method, request.url.path, response.status_code, kind,
                printable(str(exc)))
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(*invalid_body(exc.errors()), path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's only 400 is a body it could not parse.
        kinds = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed", 403: "forbidden"}
        headers = exc.headers
        if exc.status_code == 405:  # Starlette names the methods of the first route on the path only
            headers = (headers or {}) | {"Allow": ", ".join(allowed_methods(app, request.scope))}
        return error_response(kinds.get(exc.status_code, "http_error"), str(exc.detail), exc.status_code, headers,
                              request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response("internal", f"internal error; quote request id {correlation_id.get()} to the operator")
