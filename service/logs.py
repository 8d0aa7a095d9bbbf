"""Structured logs: one line per request, and the service's own lines (and uvicorn's) in the same format.

    app.add_middleware(RequestLog, known_paths=paths, enabled=settings.access_log, probes=settings.log_probes)
    uvicorn.Config(..., log_config=log_config(settings.log_level, settings.log_format))   # or logging.config.dictConfig

A request line, ``MNIST_SERVE_LOG_FORMAT=json`` (the default; one object per line, keys always in this order,
``trace_id`` only when the request is traced, ``model``/``version`` null and ``images`` 0 when no model ran)::

    {"time":"2025-05-01T12:00:00.123Z","level":"info","logger":"service.requests","message":"POST /v1/predict 200",
     "request_id":"4bf92f3577b34da6a3ce929d0e0e4736","trace_id":"0af7651916cd43dd8448eb211c80319c","method":"POST",
     "route":"/v1/predict","status":200,"latency_ms":1.234,"model":"mnist-cnn","version":"1.2.0","images":1,
     "client":"10.0.0.7"}

and ``MNIST_SERVE_LOG_FORMAT=text`` (for development)::

    2025-05-01T12:00:00.123Z INFO    service.requests: POST /v1/predict 200 1.23 ms model=mnist-cnn version=1.2.0
        images=1 client=10.0.0.7 request_id=4bf92f35… (one line)

Every other line (startup, reloads, warnings, uvicorn's error log) has ``time``, ``level``, ``logger``,
``message``, and ``request_id`` / ``trace_id`` when it is written while a request is served (``exception`` holds
a traceback). ``route`` is the route's template (``/v2/models/{name}/infer``), never the raw path; the probes
(:data:`PROBES`) are left out unless ``MNIST_SERVE_LOG_PROBES=true``; ``latency_ms`` runs from the request reaching
the app to its last body byte handed to the server.

:class:`RequestLog` is also what gives every request its id (:mod:`service.requestid`), logged or not: it reads or
makes the id, echoes it in ``X-Request-ID``, and keeps it in the scope for error bodies.

gRPC calls get the same line from :class:`RpcLog` (``GrpcServer.start(..., on_rpc=RpcLog())``): ``method`` is
``GRPC``, ``route`` the RPC's full name, ``status`` the HTTP status that google.rpc.Code maps the gRPC status code
to (so ``status >= 500`` finds the server's failures whatever the protocol) and ``message`` names the code itself:
``GRPC /inference.GRPCInferenceService/ModelInfer UNAVAILABLE``. The id is the ``x-request-id`` metadata when it is
acceptable, else a new one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import Final, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core import REQUEST_INFO, RequestInfo
from service.logformat import FORMATTERS, JsonFormatter, RequestLine, TextFormatter, log_config
from service.middleware import route_template
from service.requestid import HEADER_KEY, accepted, bind, new_request_id, unbind
from service.tracing import current_trace_id

REQUEST_LOGGER: Final = "service.requests"
#: Requests left out of the request log unless MNIST_SERVE_LOG_PROBES=true: liveness, readiness, scrapes.
PROBES: Final = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
INFO: Final = logging.INFO


def is_probe(path: str) -> bool:
    return path in PROBES or path.startswith("/v2/health/")


def log_request(line: RequestLine, logger: logging.Logger | None = None, outcome: str | None = None) -> None:
    """Write one request's line (at info, on ``service.requests``); the caller has checked the logger is enabled.

    The message is ``method route status`` (``outcome`` in place of the status when given).

    The record is made directly, not through ``logger.info``: that would look up the caller's frame, a cost paid on
    every request for a file and line number that are always this one.
    """
    logger = logger if logger is not None else logging.getLogger(REQUEST_LOGGER)
    record = logging.LogRecord(
        logger.name,
        INFO,
        __file__,
        0,
        "%s %s %s",
        (line.method, line.route, outcome or line.status),
        None,
        "log_request",
    )
    record.__dict__["request"] = line
    logger.handle(record)


class RequestLog:
    """Pure ASGI middleware: the request's id (read or made, echoed, kept in the scope) and its log line.

    Register it outside every middleware that can answer (``add_middleware`` last, before tracing), so that their
    answers carry the id and are logged.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        known_paths: Collection[str] = (),
        enabled: bool = True,
        probes: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        self.app = app
        self.known_paths = frozenset(known_paths)
        self.enabled = enabled
        self.probes = probes
        self.logger = logger if logger is not None else logging.getLogger(REQUEST_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid, token = bind(scope)
        echo = (HEADER_KEY, rid.encode("ascii"))
        status = 500  # what the server answers when the app raises before it starts a response

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), echo]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            try:
                if (
                    self.enabled
                    and self.logger.isEnabledFor(INFO)
                    and (self.probes or not is_probe(scope.get("path", "")))
                ):
                    self._log(scope, rid, status, time.perf_counter() - start)
            finally:
                unbind(token)

    def _log(self, scope: Scope, rid: str, status: int, seconds: float) -> None:
        method = scope.get("method", "")
        line = RequestLine(rid, method, route_template(scope, self.known_paths), status, round(seconds * 1000, 3))
        info = scope.get(REQUEST_INFO)
        if isinstance(info, RequestInfo):
            line.model, line.version, line.images = info.model, info.version, info.images
        client = scope.get("client")
        if client:
            line.client = client[0]
        line.trace_id = current_trace_id()
        log_request(line, self.logger)


# --- gRPC -------------------------------------------------------------------------------------------------------

#: gRPC's probes, left out like HTTP's unless MNIST_SERVE_LOG_PROBES=true.
GRPC_PROBES: Final = frozenset(
    f"/inference.GRPCInferenceService/{name}" for name in ("ServerLive", "ServerReady", "ModelReady")
)
#: gRPC status code → HTTP status, as google.rpc.Code documents it (nginx's 499 for a cancelled call).
GRPC_HTTP_STATUS: Final = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400,
    "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}  # fmt: skip


class RpcRecord(Protocol):
    """What :class:`RpcLog` reads of a gRPC call (``service.grpc_server.RpcRecord`` has it)."""

    method: str
    peer: str
    request_id: str | None
    info: RequestInfo
    code: str
    seconds: float


def peer_host(peer: str) -> str | None:
    """The client address in a grpc peer string: ``ipv4:10.0.0.7:50312`` → ``10.0.0.7``, ``ipv6:[::1]:5`` → ``::1``."""
    kind, _, address = peer.partition(":")
    if kind == "ipv4":
        return address.rpartition(":")[0] or address
    if kind == "ipv6":
        return address.rpartition(":")[0].strip("[]") or address
    return address or None


class RpcLog:
    """The request log's line for each gRPC call (see the module docstring), given as the gRPC server's hook."""

    def __init__(self, *, enabled: bool = True, probes: bool = False, logger: logging.Logger | None = None) -> None:
        self.enabled = enabled
        self.probes = probes
        self.logger = logger if logger is not None else logging.getLogger(REQUEST_LOGGER)

    def __call__(self, record: RpcRecord) -> None:
        if not (self.enabled and self.logger.isEnabledFor(INFO)) or (not self.probes and record.method in GRPC_PROBES):
            return
        sent = record.request_id
        rid = (accepted(sent.encode("utf-8", "replace")) if sent else None) or new_request_id()
        info = record.info
        line = RequestLine(
            rid,
            "GRPC",
            record.method,
            GRPC_HTTP_STATUS.get(record.code, 500),
            round(record.seconds * 1000, 3),
            info.model,
            info.version,
            info.images,
            peer_host(record.peer),
            current_trace_id(),
        )
        log_request(line, self.logger, outcome=record.code)


__all__ = [  # the formatters and the config live in service.logformat (importable without the data plane)
    "FORMATTERS",
    "PROBES",
    "REQUEST_LOGGER",
    "JsonFormatter",
    "RequestLine",
    "RequestLog",
    "RpcLog",
    "TextFormatter",
    "is_probe",
    "log_config",
    "log_request",
]
