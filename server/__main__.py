"""`python -m server`: validate settings and the model setting, then serve with uvicorn.

A bad setting, or a model that cannot be found or loaded, ends the process with one clear line on
stderr and a non-zero exit, so Docker or Kubernetes restarts it instead of leaving a replica that
is never ready. SIGTERM/SIGINT shut down gracefully: queued requests finish first.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

import uvicorn
from asgi_correlation_id import CorrelationIdFilter
from pydantic import ValidationError

from anchor_cache.errors import AnchorServeError
from anchor_cache.models import DEFAULT_MODEL, default_gguf_path, resolve_device, resolve_dtype, resolve_model_dir
from server.app import build_app
from server.settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s]: %(message)s"


def check_model_settings(settings: Settings) -> None:
    """Cheap checks of model, device and dtype before serving (the load itself comes later)."""
    if settings.model == DEFAULT_MODEL:
        default_gguf_path()
    else:
        resolve_model_dir(settings.model)
    resolve_dtype(settings.dtype, resolve_device(settings.device))


def event_loop_and_parser() -> tuple[str, str]:
    """uvloop and httptools (dependencies) where importable, else the standard library's asyncio and
    the pure-Python h11."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def configure_logging() -> None:
    """Every log line carries the request id it was written for ("-" outside requests)."""
    handler = logging.StreamHandler()
    handler.addFilter(CorrelationIdFilter(default_value="-"))
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def main() -> int:
    configure_logging()
    try:
        settings = Settings()
        check_model_settings(settings)
    except (ValidationError, ValueError, AnchorServeError) as exc:
        sys.stderr.write(f"anchorserve: not starting: {exc}\n")
        return 2
    server: uvicorn.Server | None = None

    def fatal() -> None:
        if server is not None:
            server.should_exit = True

    app = build_app(settings, on_fatal=fatal)
    loop, http = event_loop_and_parser()
    logging.getLogger("server").info("serving with the %s event loop and the %s HTTP parser", loop, http)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                           timeout_graceful_shutdown=30, log_config=None, loop=loop, http=http))
    server.run()
    error = app.state.anchor.engine.startup_error
    if error:
        sys.stderr.write(f"anchorserve: {error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
