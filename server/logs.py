"""The server's log lines, as text or as JSON (`log_format`), each with the request id it was written for."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from asgi_correlation_id import CorrelationIdFilter

from server.settings import LogFormat

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s]: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id (null outside
    a request) and, for a logged exception, its traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": record.correlation_id,  # set by the handler's CorrelationIdFilter
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def log_handler(log_format: LogFormat) -> logging.Handler:
    """A stderr handler that stamps each record with the request id (asgi-correlation-id's context)."""
    json_lines = log_format == "json"
    handler = logging.StreamHandler()
    handler.addFilter(CorrelationIdFilter(default_value=None if json_lines else "-"))
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(log_format: LogFormat = "text") -> None:
    """A server process's stderr is its log: INFO and above from every logger (uvicorn's too: it is
    given no config of its own) and Python's warnings, in `log_format`, and no progress bars."""
    from transformers.utils import logging as transformers_logging  # half a second, paid only by servers

    logging.basicConfig(level=logging.INFO, handlers=[log_handler(log_format)])
    logging.captureWarnings(True)
    # transformers writes through a stderr handler of its own that does not propagate: its lines would
    # miss the format (a reader of JSON logs would choke on them) and the request id.
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    transformers_logging.disable_progress_bar()
