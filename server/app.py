"""App assembly: settings → state → routes, handlers and middleware; lifespan starts and drains."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from server.admin import admin
from server.analyses import analyses
from server.errors import install_handlers
from server.limits import PayloadLimitMiddleware
from server.metrics import RequestCounter
from server.routes import public, v1
from server.settings import Settings
from server.state import ServerState

log = logging.getLogger(__name__)


def build_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("starting with settings %s", settings.redacted())
        startup = asyncio.create_task(state.start(), name="anchorserve-startup")
        try:
            yield
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await startup  # a model load in its thread cannot be interrupted; wait for it
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
    app.add_middleware(RequestCounter, metrics=state.metrics)

    app.include_router(public)
    app.include_router(v1)
    app.include_router(admin)
    app.include_router(analyses)
    return app
