"""Optional tracing: what the data plane and the batchers call, doing nothing unless an OTLP endpoint is set.

    MNIST_SERVE_OTLP_ENDPOINT=http://collector:4318 mnist-serve     # needs the otel extra: pip install '.[otel]'

    tracing = from_settings(settings)          # NO_TRACING when the endpoint is unset: opentelemetry is never imported
    with tracing.span("decode"):               # a child of the current span
        ...
    parent = tracing.capture()                 # in the request's task (None when off or not sampled) ...
    tracing.record("queue", parent, t0, t1)    # ... a finished span from perf_counter() times, from any thread

With tracing on, :mod:`service.otel` supplies the real thing: a server span per HTTP request (a W3C
``traceparent`` from the caller is its parent), and under it ``decode`` (body to images, in the routes),
``infer`` (the data plane, with the model, version and images), ``queue`` and ``run`` (the wait for and the
onnxruntime run of the request's batch, from the batcher), ``answer`` (verdicts and metrics). Off, each call is a
method that returns at once: no ``if`` needed at the call sites, and no cost worth measuring.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.settings import Settings

AttributeValue = str | int | float | bool
Attributes = Mapping[str, AttributeValue]


class SpanLike(Protocol):
    """What callers may do with the span :meth:`Tracing.span` gives them."""

    def set_attribute(self, key: str, value: AttributeValue) -> Any: ...


class _NoSpan:
    def set_attribute(self, key: str, value: AttributeValue) -> None:
        return None

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SPAN = _NoSpan()


class Tracing:
    """Tracing that is off: every method returns at once. :class:`service.otel.OtelTracing` is the one that is on."""

    enabled = False

    def span(self, name: str, attributes: Attributes | None = None) -> AbstractContextManager[SpanLike]:
        """A span named ``name``, current inside the ``with`` block, a child of the span current before it."""
        return _NO_SPAN

    def capture(self) -> object | None:
        """The current trace context, to parent spans recorded later elsewhere; None when nothing is traced."""
        return None

    def record(
        self,
        name: str,
        parent: object | None,
        start: float,
        end: float,
        attributes: Attributes | None = None,
        error: BaseException | None = None,
    ) -> None:
        """A finished span under ``parent`` (from :meth:`capture`), ``start`` and ``end`` from ``perf_counter()``."""
        return None

    def install(self, app: FastAPI, known_paths: Collection[str]) -> None:
        """Add the server-span middleware to ``app`` (outermost: call it after every other ``add_middleware``)."""
        return None

    def shutdown(self) -> None:
        """Send what is buffered and stop (the app's lifespan calls it on the way out)."""
        return None


NO_TRACING = Tracing()


def from_settings(settings: Settings) -> Tracing:
    """OTLP tracing when ``settings.otlp_endpoint`` is set (imports opentelemetry only then), else NO_TRACING."""
    if settings.otlp_endpoint is None:
        return NO_TRACING
    from service.otel import OtelTracing

    return OtelTracing.exporting(settings.otlp_endpoint, settings.otel_service_name, settings.trace_sample_ratio)


def current_trace_id() -> str | None:
    """The trace id (32 hex digits) of the current span, for log lines; None when nothing is traced.

    Never imports opentelemetry: when it has not been imported, nothing can be traced.
    """
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None
