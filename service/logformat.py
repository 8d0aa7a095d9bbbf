"""The service's log lines: JSON (one object per line, the product) or readable text, and the logging config.

    logging.config.dictConfig(log_config("info", "json"))    # what uvicorn gets as its log_config

Kept apart from :mod:`service.logs` (the request-log middleware) so that the worker supervisor can configure its
own logging without importing the data plane: stdlib, msgspec and the request-id and trace-id lookups only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from service.requestid import request_id
from service.tracing import current_trace_id

_json = msgspec.json.Encoder()


@dataclass(slots=True)
class RequestLine:
    """One request's log fields (see the module docstring)."""

    request_id: str
    method: str
    route: str
    status: int
    latency_ms: float
    model: str | None = None
    version: str | None = None
    images: int = 0
    client: str | None = None
    trace_id: str | None = None


# --- formatters ------------------------------------------------------------------------------------------------


class _Clock:
    """ISO 8601 UTC with milliseconds; the part down to the second is formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def iso(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((created - second) * 1000):03d}Z"


def _context_ids(record: logging.LogRecord) -> tuple[str | None, str | None]:
    """The request and trace ids of a line that is not a request line: given to it, else of the request served."""
    rid = getattr(record, "request_id", None)
    return (rid if isinstance(rid, str) else request_id()), current_trace_id()


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self._clock.iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line = getattr(record, "request", None)
        if isinstance(line, RequestLine):
            doc["request_id"] = line.request_id
            if line.trace_id is not None:
                doc["trace_id"] = line.trace_id
            doc["method"] = line.method
            doc["route"] = line.route
            doc["status"] = line.status
            doc["latency_ms"] = line.latency_ms
            doc["model"] = line.model
            doc["version"] = line.version
            doc["images"] = line.images
            doc["client"] = line.client
        else:
            rid, trace_id = _context_ids(record)
            if rid is not None:
                doc["request_id"] = rid
            if trace_id is not None:
                doc["trace_id"] = trace_id
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            doc["exception"] = record.exc_text
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return _json.encode(doc).decode()


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``, one line (a traceback follows on its own lines)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self._clock.iso(record.created)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        line = getattr(record, "request", None)
        rid: str | None
        if isinstance(line, RequestLine):
            text += f" {line.latency_ms:.2f} ms"
            if line.model is not None:
                text += f" model={line.model} version={line.version} images={line.images}"
            if line.client is not None:
                text += f" client={line.client}"
            rid, trace_id = line.request_id, line.trace_id
        else:
            rid, trace_id = _context_ids(record)
        if rid is not None:
            text += f" request_id={rid}"
        if trace_id is not None:
            text += f" trace_id={trace_id}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


FORMATTERS: Final = {"json": JsonFormatter, "text": TextFormatter}


def log_config(level: str = "info", fmt: str = "json", stream: str = "ext://sys.stdout") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` document (uvicorn's ``log_config``): every line in ``fmt`` on ``stream``.

    The service's loggers and uvicorn's at ``level`` (``trace`` is debug here; uvicorn sets its own), anything else
    (libraries, asyncio) from warning. uvicorn's access log gets no handler, so uvicorn never even builds its line:
    :class:`RequestLog` writes the request log instead.
    """
    if fmt not in FORMATTERS:
        raise ValueError(f"log format must be one of {sorted(FORMATTERS)}, not {fmt!r}")
    formatter = FORMATTERS[fmt]
    upper = "DEBUG" if level.lower() == "trace" else level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"service": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {"service": {"class": "logging.StreamHandler", "formatter": "service", "stream": stream}},
        "loggers": {
            "service": {"handlers": ["service"], "level": upper, "propagate": False},
            "uvicorn": {"handlers": ["service"], "level": upper, "propagate": False},
            "uvicorn.error": {"level": upper},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
        "root": {"handlers": ["service"], "level": "WARNING"},
    }
