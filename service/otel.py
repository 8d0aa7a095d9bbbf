"""OpenTelemetry tracing, imported only when ``MNIST_SERVE_OTLP_ENDPOINT`` is set (see :mod:`service.tracing`).

    tracing = OtelTracing.exporting("http://collector:4318", "mnist-serve", sample_ratio=0.1)  # OTLP/HTTP, batched
    tracing = OtelTracing.with_processor(SimpleSpanProcessor(InMemorySpanExporter()))          # tests
    app = create_app(settings, tracing=tracing)

Each app has its own ``TracerProvider`` (nothing is set globally, so tests and several apps never collide); the
context, and so the parent of each span, is OpenTelemetry's usual one. :class:`TraceRequests` opens a server span
per HTTP request (probes left out), named ``{method} {route}`` once the route is known, its parent taken from the
caller's ``traceparent`` (the propagators in ``OTEL_PROPAGATORS``, W3C trace context by default); the request log
writes its trace id. The exporter also reads the standard ``OTEL_EXPORTER_OTLP_*`` variables (headers, timeout,
certificates).
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Collection
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core import REQUEST_INFO, RequestInfo
from service.logs import is_probe
from service.middleware import route_template
from service.requestid import SCOPE_KEY as REQUEST_ID_KEY
from service.tracing import Attributes, SpanLike, Tracing

if TYPE_CHECKING:
    from fastapi import FastAPI

INSTRUMENTATION = "mnist-serve"


def _version() -> str:
    try:
        return importlib.metadata.version("mnist-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: ``endpoint`` itself when it names a path, else ``endpoint/v1/traces``."""
    return endpoint if urlsplit(endpoint).path not in ("", "/") else endpoint.rstrip("/") + "/v1/traces"


class OtelTracing(Tracing):
    """Spans through one ``TracerProvider`` (see the module docstring)."""

    enabled = True

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(INSTRUMENTATION)

    @classmethod
    def with_processor(
        cls, processor: SpanProcessor, service_name: str = "mnist-serve", sample_ratio: float = 1.0
    ) -> OtelTracing:
        """Spans sampled at ``sample_ratio`` (a caller's sampled flag wins) and handed to ``processor``."""
        resource = Resource.create({"service.name": service_name, "service.version": _version()})
        provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
        provider.add_span_processor(processor)
        return cls(provider)

    @classmethod
    def exporting(cls, endpoint: str, service_name: str, sample_ratio: float = 1.0) -> OtelTracing:
        """Spans batched (in a background thread) and sent to ``endpoint`` over OTLP/HTTP."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint))
        return cls.with_processor(BatchSpanProcessor(exporter), service_name, sample_ratio)

    def span(self, name: str, attributes: Attributes | None = None) -> AbstractContextManager[SpanLike]:
        return self.tracer.start_as_current_span(name, attributes=attributes)

    def capture(self) -> object | None:
        return otel_context.get_current() if trace.get_current_span().is_recording() else None

    def record(
        self,
        name: str,
        parent: object | None,
        start: float,
        end: float,
        attributes: Attributes | None = None,
        error: BaseException | None = None,
    ) -> None:
        if not isinstance(parent, otel_context.Context):
            return
        # perf_counter() times to the wall-clock nanoseconds spans carry.
        now_ns, now = time.time_ns(), time.perf_counter()
        span = self.tracer.start_span(
            name, context=parent, attributes=attributes, start_time=now_ns - round((now - start) * 1e9)
        )
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end(end_time=now_ns - round((now - end) * 1e9))

    def install(self, app: FastAPI, known_paths: Collection[str]) -> None:
        app.add_middleware(TraceRequests, tracing=self, known_paths=known_paths)

    def shutdown(self) -> None:
        self.provider.shutdown()


class TraceRequests:
    """The server span of each HTTP request (pure ASGI: nothing buffered), current while the app answers it."""

    def __init__(self, app: ASGIApp, tracing: OtelTracing, known_paths: Collection[str] = ()) -> None:
        self.app = app
        self.tracer = tracing.tracer
        self.known_paths = frozenset(known_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_probe(scope.get("path", "")):  # probes: noise every few seconds, no trace
            await self.app(scope, receive, send)
            return
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", ())}
        method = str(scope.get("method", ""))
        client = scope.get("client")
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": str(scope.get("path", "")),
            "url.scheme": str(scope.get("scheme", "http")),
        }
        if client:
            attributes["client.address"] = str(client[0])
        span = self.tracer.start_span(
            method, context=propagate.extract(carrier), kind=SpanKind.SERVER, attributes=attributes
        )
        status = 500

        async def traced_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        with trace.use_span(span, end_on_exit=True):
            try:
                await self.app(scope, receive, traced_send)
            finally:
                self._finish(span, scope, method, status)

    def _finish(self, span: trace.Span, scope: Scope, method: str, status: int) -> None:
        route = route_template(scope, self.known_paths)
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        rid = scope.get(REQUEST_ID_KEY)
        if isinstance(rid, str):
            span.set_attribute("mnist.request_id", rid)
        info = scope.get(REQUEST_INFO)
        if isinstance(info, RequestInfo) and info.model is not None:
            span.set_attribute("mnist.model", info.model)
            span.set_attribute("mnist.version", info.version or "")
            span.set_attribute("mnist.images", info.images)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
