"""Prometheus collectors for one app instance, in their own registry (so tests and several apps never collide).

    metrics = ServiceMetrics()
    per_model = metrics.for_model("mnist-cnn", "1.2.0")   # children bound to {model, version}: no lookup per request
    per_model.observe_run(images=32, seconds=0.004)

Names carry their unit (``_seconds``, ``_total``). Everything about inference is labelled by ``model`` and
``version`` (Triton's nv_inference_* metrics are the reference): requests by outcome, images, the time a request
waits in the queue apart from the time the model computes, images per onnxruntime run, queue depth, readiness, and
the answers by verdict and digit with a confidence histogram (to see drift). HTTP requests are counted by route
template, method and status.

With several worker processes (``MNIST_SERVE_WORKERS``), :func:`enable_multiprocess` is called before any
collector exists: every process writes its samples to files in one directory, and /metrics in any worker answers
the sum over all of them (prometheus-client's multiprocess mode; gauges say how they combine).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client import values as prometheus_values

PREFIX = "mnist_serve"
#: prometheus-client's switch for multiprocess mode; read when prometheus_client is imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
MODEL_LABELS = ("model", "version")
VERDICTS = ("digit", "unsure", "not_a_digit")


#: This process's id, kept current across fork() (see below).
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


def _cached_pid() -> int:
    return _pid


if os.environ.get(MULTIPROC_ENV):
    # In multiprocess mode every counter increment and gauge set first asks for the process id, to notice a fork:
    # a getpid() system call each time, about 6 % of a worker's event loop at concurrency 64. The id only changes
    # across fork(), so it is read then and kept; prometheus-client takes such a function for exactly this.
    os.register_at_fork(after_in_child=_forked)
    prometheus_values.ValueClass = prometheus_values.MultiProcessValue(process_identifier=_cached_pid)  # type: ignore[no-untyped-call]


def multiprocess_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def enable_multiprocess(directory: Path) -> None:
    """Before the workers start (and before they create collectors): share samples through ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)


def mark_process_dead(pid: int) -> None:
    """A worker has exited: drop its live gauges (its counters and histograms stay in the sums)."""
    directory = multiprocess_dir()
    if directory is not None:
        prometheus_multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


class ModelMetrics:
    """The collectors of one model version, their label values bound once."""

    def __init__(self, metrics: ServiceMetrics, name: str, version: str) -> None:
        labels = {"model": name, "version": version}
        self._metrics = metrics
        self._labels = labels
        self.answered = metrics.inference_requests.labels(**labels, outcome="answered")
        self.refused = metrics.inference_requests.labels(**labels, outcome="overloaded")
        self.failed = metrics.inference_requests.labels(**labels, outcome="failed")
        self.images = metrics.inference_images.labels(**labels)
        self.queue_seconds = metrics.queue_duration.labels(**labels)
        self.compute_seconds = metrics.inference_duration.labels(**labels)
        self.run_size = metrics.batch_size.labels(**labels)
        self.queue_depth = metrics.queue_depth.labels(**labels)
        self.queue_images = metrics.queue_images.labels(**labels)
        self.ready = metrics.model_ready.labels(**labels)
        self.confidence = metrics.confidence.labels(**labels)
        self._predictions: dict[tuple[str, int], Counter] = {}

    def observe_run(self, images: int, seconds: float) -> None:
        """One onnxruntime run."""
        self.run_size.observe(images)
        self.compute_seconds.observe(seconds)

    def observe_overloaded(self) -> None:
        self.refused.inc()
        self._metrics.overloaded.inc()

    def observe_answers(
        self, digits: npt.NDArray[np.int64], confidence: npt.NDArray[np.float32], verdicts: Iterable[str]
    ) -> None:
        """One answered request: its images, counted by verdict and digit, and their confidence."""
        self.answered.inc()
        self.images.inc(len(digits))
        pairs: dict[tuple[str, int], int] = {}
        for verdict, digit in zip(verdicts, digits.tolist(), strict=True):
            pairs[verdict, digit] = pairs.get((verdict, digit), 0) + 1
        for pair, count in pairs.items():
            child = self._predictions.get(pair)
            if child is None:
                child = self._predictions[pair] = self._metrics.predictions.labels(
                    **self._labels, verdict=pair[0], digit=str(pair[1])
                )
            child.inc(count)
        for value in confidence.tolist():
            self.confidence.observe(value)


class ServiceMetrics:
    """The service's collectors; ``render()`` gives the text exposition for /metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests_total",
            "Requests answered, by route template (gRPC: the RPC's full name), method (gRPC: GRPC) and status code.",
            ("route", "method", "status"),
            registry=r,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from receiving a request to sending its response, by route template and method.",
            ("route", "method"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_requests = Counter(
            f"{PREFIX}_inference_requests_total",
            "Requests that reached a model (any protocol), by outcome: answered, overloaded (503) or failed.",
            (*MODEL_LABELS, "outcome"),
            registry=r,
        )
        self.inference_images = Counter(
            f"{PREFIX}_inference_images_total",
            "Images answered.",
            MODEL_LABELS,
            registry=r,
        )
        self.queue_duration = Histogram(
            f"{PREFIX}_queue_duration_seconds",
            "Time a request waited between admission and the start of its model run.",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            f"{PREFIX}_inference_duration_seconds",
            "Wall time of one onnxruntime run (compute only: queueing is mnist_serve_queue_duration_seconds).",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Images per onnxruntime run.",
            MODEL_LABELS,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Requests admitted and waiting for their model run.",
            MODEL_LABELS,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_images = Gauge(
            f"{PREFIX}_queue_images",
            "Images admitted and waiting for their model run.",
            MODEL_LABELS,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.overloaded = Counter(
            f"{PREFIX}_overloaded_total",
            "Requests refused with 503 because a queue or the body budget was full.",
            registry=r,
        )
        self.model_ready = Gauge(
            f"{PREFIX}_model_ready",
            "1 when the model version is loaded, warmed up and its batcher runs (in every worker), else 0.",
            MODEL_LABELS,
            registry=r,
            multiprocess_mode="livemin",
        )
        self.model_info = Gauge(
            f"{PREFIX}_model_info",
            "1 for each model version served, with its sha256 and whether it is the default model.",
            (*MODEL_LABELS, "sha256", "default"),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.predictions = Counter(
            f"{PREFIX}_predictions_total",
            "Images answered, by verdict (digit, unsure, not_a_digit) and the digit answered.",
            (*MODEL_LABELS, "verdict", "digit"),
            registry=r,
        )
        self.confidence = Histogram(
            f"{PREFIX}_prediction_confidence",
            "Calibrated probability of the digit answered, per image.",
            MODEL_LABELS,
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.reloads = Counter(
            f"{PREFIX}_reloads_total",
            "Model repository reloads (SIGHUP or POST /v1/admin/reload), by result: ok or failed.",
            ("result",),
            registry=r,
        )
        self.models_served = Gauge(
            f"{PREFIX}_models_served",
            "Model versions loaded and serving.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_problems = Gauge(
            f"{PREFIX}_model_problems",
            "Model versions (or cards) in the repository that could not be served at the last load.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.connections_closed = Counter(
            f"{PREFIX}_connections_closed_total",
            "Connections the server closed to hold a limit, before (or instead of) a request reaching the app, by "
            "reason: header_timeout (408, the request line and headers took too long), idle_timeout (silent past the "
            "header time: a new connection that sent nothing, or a kept-alive one), headers_too_large (431), "
            "body_timeout (408), evicted (an idle connection closed for a newcomer past the connection cap), "
            "over_capacity (the newcomer closed: every other connection was running a request).",
            ("reason",),
            registry=r,
        )
        self._request_children: dict[tuple[str, str, int | str], tuple[Counter, Histogram]] = {}

    def for_model(self, name: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, name, version)

    def set_models(self, served: Iterable[tuple[str, str, str, bool]], problems: int) -> None:
        """After a (re)load: every version served as (name, version, sha256, default), and problems left out."""
        served = list(served)
        if multiprocess_dir() is None:
            self.model_info.clear()  # versions no longer served disappear (multiprocess files cannot forget)
        for name, version, sha256, default in served:
            self.model_info.labels(model=name, version=version, sha256=sha256, default=str(default).lower()).set(1)
        self.models_served.set(len(served))
        self.model_problems.set(problems)

    def observe_request(self, route: str, method: str, status: int | str, seconds: float) -> None:
        """One answered request: an HTTP status code, or a gRPC status code's name (method ``GRPC``)."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:  # a route's children are looked up once, not on every request
            if len(self._request_children) > 10_000:
                self._request_children.clear()
            children = self._request_children[key] = (
                self.requests.labels(route=route, method=method, status=str(status)),
                self.request_duration.labels(route=route, method=method),
            )
        children[0].inc()
        children[1].observe(seconds)

    def observe_connection_closed(self, reason: str) -> None:
        self.connections_closed.labels(reason=reason).inc()

    def render(self) -> bytes:
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
        return generate_latest(registry)
