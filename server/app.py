"""App assembly: settings → state → routers, handlers and middleware; lifespan starts and drains."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from anchor_cache.cpus import ThreadFit
from server.api.admin import admin
from server.api.analyses import analyses
from server.api.public import public
from server.api.tei import tei
from server.api.v1 import v1, vllm
from server.errors import install_handlers
from server.limits import PayloadLimitMiddleware
from server.metrics import RequestCounter
from server.settings import Settings
from server.state import ServerState

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
# Swagger UI's files (swagger-ui-dist from npm, with its licence), served here so /docs works offline.
STATIC_DIR = Path(__file__).resolve().parent / "static"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def acceptable_request_id(value: str) -> bool:
    """A client's (or nginx's) id is kept when it is short and plain; otherwise a new one is made."""
    return _REQUEST_ID.fullmatch(value) is not None


def build_app(settings: Settings | None = None, on_fatal: Callable[[], None] | None = None,
              engine_address: str | None = None, thread_fit: ThreadFit | None = None) -> FastAPI:
    """The ASGI app. `on_fatal` is called when the model cannot load (`python -m server` then exits
    non-zero, so Docker or Kubernetes restarts it); without it /ready reports the failure.
    `engine_address`: serve HTTP frontends on this ZeroMQ address too (the engine-core process).
    `thread_fit`: the entry point's `fit_threads`, which the engine refits before each batch."""
    settings = settings or Settings()
    state = ServerState(settings, engine_address, thread_fit)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("starting with settings %s", settings.redacted())
        startup = asyncio.create_task(state.start(on_fatal), name="anchorserve-startup")
        try:
            yield
        finally:
            try:
                await startup  # a model load in its thread cannot be interrupted; wait for it
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("start-up failed")
            await state.stop()
            log.info("stopped")

    app = FastAPI(
        title="anchorserve",
        summary="ICL text classification over compressed label-word anchor caches",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served below from local files, not a CDN
        redoc_url=None,  # ReDoc has no local copy: it would be as blank offline as a CDN-loaded /docs
    )
    app.state.anchor = state
    install_handlers(app)
    app.add_middleware(PayloadLimitMiddleware, max_bytes=settings.max_payload_bytes)
    app.add_middleware(RequestCounter, metrics=state.metrics, is_known=state.engine.knows)
    # Outermost: every response, errors included, carries the request id (the client's or a new one).
    app.add_middleware(CorrelationIdMiddleware, header_name=REQUEST_ID_HEADER, validator=acceptable_request_id)

    app.include_router(public)
    app.include_router(v1)
    app.include_router(vllm)
    app.include_router(tei)
    app.include_router(admin)
    app.include_router(analyses)
    add_docs(app)
    return app


def add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from local files (FastAPI's "self-hosting JavaScript and CSS for docs"
    recipe), so the page renders without network access beyond this server."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    redirect = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{redirect}",
            swagger_js_url=f"{root}/static/swagger/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/static/swagger/swagger-ui.css",
            swagger_favicon_url=f"{root}/static/swagger/favicon-32x32.png",
        )

    @app.get(redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
