"""Two small ASGI middlewares: the request-body size cap and per-request metrics (the request log and its id are
:mod:`service.logs`).

Pure ASGI (not BaseHTTPMiddleware) so that neither buffers bodies nor breaks streaming and cancellation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import BodyBudget
from service.errors import PayloadTooLarge, ServiceError, error_body, is_protocol_path
from service.metrics import ServiceMetrics


class BodyTooLarge(PayloadTooLarge):
    """Raised from ``receive`` once a streamed body passes the cap (a domain error: every handler answers it)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than the {limit} bytes allowed")

    @property
    def detail(self) -> str:
        return self.message


class BodySizeLimit:
    """The body limits, before the app reads a byte of it.

    - 413 when Content-Length says the body is too big (nothing read), or as soon as a streamed body passes it;
    - 503 (Retry-After) when this worker already holds ``max_inflight_bytes`` of request bodies: each chunk is
      taken from the shared :class:`~service.admission.BodyBudget` as it arrives and all of it given back when the
      request is answered.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_inflight_bytes: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.budget = BodyBudget(max_inflight_bytes if max_inflight_bytes is not None else 1 << 62)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        protocol = is_protocol_path(str(scope.get("path", "")))
        if declared is not None and declared > self.max_body_bytes:
            await _send_error(scope, send, 413, "payload_too_large", BodyTooLarge(self.max_body_bytes).detail, protocol)
            return
        if declared == -1:
            await _send_error(scope, send, 400, "bad_request", "the Content-Length header is not a number", protocol)
            return
        received = 0
        limit = self.max_body_bytes
        budget = self.budget

        async def limited_receive() -> Message:
            # Bytes are charged to the worker's budget as they arrive: what a request holds is what it has sent,
            # not what its Content-Length promises (a few slow clients promising 16 MB must not lock others out).
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                if received + chunk > limit:
                    raise BodyTooLarge(limit)
                budget.take(chunk)
                received += chunk
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            budget.give_back(received)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


async def _send_error(
    scope: Scope,
    send: Send,
    status: int,
    code: str,
    message: str,
    protocol: bool = False,
    extra: dict[str, str] | None = None,
    close: bool = True,
) -> None:
    # /v2 speaks the Open Inference Protocol, whose error body is {"error": "message"}.
    document = {"error": message} if protocol else error_body(ServiceError(message, code=code), scope)
    body = json.dumps(document).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *([(b"connection", b"close")] if close else []),
        *((k.lower().encode(), v.encode()) for k, v in (extra or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Counts every HTTP request by route template (never the raw path: unbounded label values) and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, known_paths: Collection[str] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = frozenset(known_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = route_template(scope, self.known_paths)
            self.metrics.observe_request(route, str(scope.get("method", "")), status, time.perf_counter() - start)


def route_template(scope: Scope, known_paths: Collection[str]) -> str:
    """The route that answered (``/v2/models/{name}/infer``), never the raw path: metric labels and log fields
    stay bounded. Requests answered before routing (e.g. an early 413) still name their endpoint when it is one of
    ours (``known_paths``); anything else is ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path or "/"
    raw = str(scope.get("path", ""))
    return raw if raw in known_paths else "unmatched"
