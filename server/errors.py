"""The server's only status table, and the one error envelope: {"error": message, "type": kind}.

Engine errors carry their kind (anchor_cache.errors); the server adds its own for queueing and
auth. FastAPI's and Starlette's own errors are rewritten into the same envelope.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from anchor_cache.errors import AnchorServeError


class ServerError(AnchorServeError):
    status = 500


class Overloaded(ServerError):
    kind, status = "overloaded", 429


class DeadlineExceeded(ServerError):
    kind, status = "timeout", 504


class Unavailable(ServerError):
    kind, status = "unavailable", 503


class Unauthorized(ServerError):
    kind, status = "unauthorized", 401


class Conflict(ServerError):
    kind, status = "conflict", 409


class UnsupportedMediaType(ServerError):
    kind, status = "unsupported_media_type", 415


STATUS = {
    "validation": 422,
    "not_found": 404,
    "unauthorized": 401,
    "conflict": 409,
    "cache_mismatch": 409,
    "model_not_found": 424,
    "internal": 500,
}


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "type": kind})


def status_of(exc: AnchorServeError) -> int:
    return exc.status if isinstance(exc, ServerError) else status_of_kind(exc.kind)


def status_of_kind(kind: str) -> int:
    return STATUS.get(kind, 500)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(AnchorServeError)
    async def _engine(_: Request, exc: AnchorServeError) -> JSONResponse:
        return error_response(status_of(exc), str(exc), exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        kind = "malformed_json" if any(e.get("type") == "json_invalid" for e in exc.errors()) else "validation"
        return error_response(400 if kind == "malformed_json" else 422, "; ".join(parts), kind)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 403: "forbidden"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), kind)
