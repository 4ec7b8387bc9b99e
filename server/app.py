"""App assembly: settings → state → routers, handlers and middleware; lifespan starts and drains."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI

from server.api.admin import admin
from server.api.analyses import analyses
from server.api.public import public
from server.api.v1 import v1
from server.errors import install_handlers
from server.limits import PayloadLimitMiddleware
from server.metrics import RequestCounter
from server.settings import Settings
from server.state import ServerState

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def acceptable_request_id(value: str) -> bool:
    """A client's (or nginx's) id is kept when it is short and plain; otherwise a new one is made."""
    return _REQUEST_ID.fullmatch(value) is not None


def build_app(settings: Settings | None = None, on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """The ASGI app. `on_fatal` is called when the model cannot load (`python -m server` then exits
    non-zero, so Docker or Kubernetes restarts it); without it /ready reports the failure."""
    settings = settings or Settings()
    state = ServerState(settings)

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
    )
    app.state.anchor = state
    install_handlers(app)
    app.add_middleware(PayloadLimitMiddleware, max_bytes=settings.max_payload_bytes)
    app.add_middleware(RequestCounter, metrics=state.metrics, is_known=state.engine.knows)
    # Outermost: every response, errors included, carries the request id (the client's or a new one).
    app.add_middleware(CorrelationIdMiddleware, header_name=REQUEST_ID_HEADER, validator=acceptable_request_id)

    app.include_router(public)
    app.include_router(v1)
    app.include_router(admin)
    app.include_router(analyses)
    return app
