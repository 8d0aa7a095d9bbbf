"""Prometheus collectors for one app instance, in their own registry (so tests and several apps never collide).

Names carry their unit (``_seconds``, ``_total``); the batch-size histogram counts images per model run, so
``mnist_serve_batch_size_count`` is the number of ORT runs and ``_sum`` the number of images classified.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

PREFIX = "mnist_serve"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    """The service's collectors; ``render()`` gives the text exposition for /metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            f"{PREFIX}_requests_total",
            "HTTP requests answered, by route template, method and status code.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from receiving a request to sending its response, by route template and method.",
            ("route", "method"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_duration = Histogram(
            f"{PREFIX}_inference_duration_seconds",
            "Wall time of one onnxruntime run (one batch).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Images per onnxruntime run.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Requests waiting for the model (queued, not yet running).",
            registry=self.registry,
        )
        self.overloaded = Counter(
            f"{PREFIX}_overloaded_total",
            "Requests refused with 503 because the inference queue was full.",
            registry=self.registry,
        )
        self.model_ready = Gauge(
            f"{PREFIX}_model_ready",
            "1 when the model is loaded and warmed up, else 0.",
            registry=self.registry,
        )
        self.reloads = Counter(
            f"{PREFIX}_reloads_total",
            "Model repository reloads (SIGHUP or POST /v1/admin/reload), by result: ok or failed.",
            ("result",),
            registry=self.registry,
        )
        self.models_served = Gauge(
            f"{PREFIX}_models_served",
            "Model versions loaded and serving.",
            registry=self.registry,
        )
        self.model_info = Info(
            f"{PREFIX}_model",
            "The default model: the one requests naming no model get.",
            registry=self.registry,
        )

    def set_model(self, info: Mapping[str, str]) -> None:
        self.model_info.info(dict(info))
        self.model_ready.set(1)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.request_duration.labels(route=route, method=method).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_duration.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
