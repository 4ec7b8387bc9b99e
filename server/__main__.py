"""`python -m server`: validate settings, then serve with uvicorn (graceful shutdown on SIGTERM/SIGINT)."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError

from server.app import build_app
from server.settings import Settings


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
    except (ValidationError, ValueError) as exc:
        sys.stderr.write(f"anchorserve: invalid settings, not starting:\n{exc}\n")
        return 2
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
