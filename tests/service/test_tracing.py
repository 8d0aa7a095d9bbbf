"""Tracing (service/tracing.py, service/otel.py): the spans of a request exist, nest under the caller's
traceparent, carry the model, version and images; the request log carries the trace id; with no OTLP endpoint
opentelemetry is not even imported; with one, spans reach an OTLP/HTTP collector.

    pytest tests/service/test_tracing.py
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service.logs import REQUEST_LOGGER, JsonFormatter
from service.main import create_app
from service.model import OnnxClassifier
from service.otel import OtelTracing, traces_url
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"model_dir": MODEL_DIR, "model_name": "mnist-cnn", "access_log": True, "grpc_port": 0}
    return Settings(**{**values, **overrides})


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


class Lines(list[dict[str, Any]]):
    """The request log's lines, parsed as the test reads them."""

    def __init__(self, stream: io.StringIO) -> None:
        super().__init__()
        self.stream = stream

    def read(self) -> Lines:
        self[:] = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return self


@pytest.fixture
def request_lines() -> Iterator[Lines]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(REQUEST_LOGGER)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield Lines(stream)
    logger.removeHandler(handler)
    logger.setLevel(saved[0])
    logger.propagate = saved[1]


def traced_client(
    classifier: OnnxClassifier, exporter: InMemorySpanExporter, sample_ratio: float = 1.0, **overrides: Any
) -> TestClient:
    tracing = OtelTracing.with_processor(SimpleSpanProcessor(exporter), "mnist-serve-test", sample_ratio)
    return TestClient(create_app(settings(**overrides), classifier, tracing=tracing))


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [span.name for span in spans]
    return named


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


def pixels(image: np.ndarray) -> dict[str, Any]:
    return {"pixels": image.tolist(), "scale": "0-255"}


@pytest.mark.parametrize("batching", [True, False], ids=["micro-batched", "unbatched"])
def test_spans_nest_under_the_callers_traceparent_and_carry_the_model(
    classifier: OnnxClassifier,
    exporter: InMemorySpanExporter,
    request_lines: Lines,
    mnist_test: tuple,
    batching: bool,
) -> None:
    x, _ = mnist_test
    with traced_client(classifier, exporter, batching=batching) as client:
        items = [pixels(x[i]) for i in range(3)]
        response = client.post(
            "/v1/predict/batch", json={"items": items}, headers={"traceparent": TRACEPARENT, "X-Request-ID": "t-1"}
        )
        assert response.status_code == 200
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"POST /v1/predict/batch", "decode", "infer", "queue", "run", "answer"}
    server, infer = spans["POST /v1/predict/batch"], spans["infer"]
    assert all(f"{span.context.trace_id:032x}" == TRACE_ID for span in spans.values() if span.context)
    assert server.kind == SpanKind.SERVER and parent_of(server) == int(PARENT_ID, 16)
    assert parent_of(spans["decode"]) == parent_of(infer) == span_id(server)
    assert parent_of(spans["queue"]) == parent_of(spans["run"]) == parent_of(spans["answer"]) == span_id(infer)

    expected = {"mnist.model": classifier.name, "mnist.version": classifier.version, "mnist.images": 3}
    assert {k: infer.attributes[k] for k in expected} == expected  # type: ignore[index]
    assert {k: server.attributes[k] for k in expected} == expected  # type: ignore[index]
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/v1/predict/batch"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["mnist.request_id"] == "t-1"
    run = spans["run"]
    assert run.attributes is not None and run.attributes["mnist.batch.images"] >= 3  # type: ignore[operator]
    # The queue wait ends where the run starts (to the microsecond); the run lies inside the request.
    assert abs(spans["queue"].end_time - run.start_time) < 50_000  # type: ignore[operator]
    assert server.start_time <= run.start_time <= run.end_time <= server.end_time  # type: ignore[operator]
    assert server.resource.attributes["service.name"] == "mnist-serve-test"

    (line,) = request_lines.read()
    assert (line["trace_id"], line["request_id"]) == (TRACE_ID, "t-1")


def test_v2_inference_is_traced_and_errors_mark_the_server_span(
    classifier: OnnxClassifier, exporter: InMemorySpanExporter
) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784}]}
    with traced_client(classifier, exporter) as client:
        assert client.post(f"/v2/models/{classifier.name}/infer", json=body).status_code == 200
        assert client.post("/v2/models/nope/infer", json=body).status_code == 404
    spans = exporter.get_finished_spans()
    names = [span.name for span in spans]
    assert names.count("POST /v2/models/{name}/infer") == 2
    assert {"decode", "infer", "queue", "run", "answer"} <= set(names)
    # A fresh trace for a caller that sent no traceparent; a 4xx is the client's error, not the server span's.
    assert all(span.parent is None for span in spans if span.kind == SpanKind.SERVER)
    statuses = [span.status.status_code.name for span in spans if span.kind == SpanKind.SERVER]
    assert statuses == ["UNSET", "UNSET"]


def test_probes_are_not_traced(classifier: OnnxClassifier, exporter: InMemorySpanExporter) -> None:
    with traced_client(classifier, exporter) as client:
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready"):
            assert client.get(path, headers={"traceparent": TRACEPARENT}).status_code == 200
        assert client.get("/v1/models").status_code == 200
    assert [span.name for span in exporter.get_finished_spans()] == ["GET /v1/models"]


def test_the_callers_sampling_decision_is_followed(
    classifier: OnnxClassifier, exporter: InMemorySpanExporter, request_lines: Lines
) -> None:
    with traced_client(classifier, exporter, sample_ratio=0.0) as client:
        client.post("/v1/predict/batch", json={"items": [{"pixels": [[0] * 28] * 28}]})  # not sampled
        client.post(
            "/v1/predict/batch", json={"items": [{"pixels": [[0] * 28] * 28}]}, headers={"traceparent": TRACEPARENT}
        )
    assert {f"{span.context.trace_id:032x}" for span in exporter.get_finished_spans() if span.context} == {TRACE_ID}
    # Every line has a trace id to look for in other services' logs; the unsampled one just has no spans here.
    lines = request_lines.read()
    assert len(lines) == 2 and lines[1]["trace_id"] == TRACE_ID


def test_without_an_endpoint_no_tracing_code_is_loaded() -> None:
    """No SDK, no exporter, no span processor thread, no provider set. (FastAPI itself imports opentelemetry's API
    package, a dependency of its own since 0.165; the service turns FastAPI's telemetry off.)"""
    script = textwrap.dedent(
        f"""
        import sys
        from fastapi.testclient import TestClient
        from service.main import create_app
        from service.settings import Settings
        settings = Settings(model_dir={str(MODEL_DIR)!r}, model_name="mnist-cnn", grpc_port=0)
        with TestClient(create_app(settings)) as client:
            import time
            while client.get("/readyz").status_code != 200:
                time.sleep(0.05)
            answer = client.post("/v1/predict", json={{"pixels": [[0] * 28] * 28}},
                                 headers={{"traceparent": {TRACEPARENT!r}}})
            assert answer.status_code == 200, answer.text
        import threading
        loaded = [name for name in sys.modules if name.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))]
        threads = [t.name for t in threading.enumerate() if "Span" in t.name]
        print(sorted(loaded), "service.otel" in sys.modules, threads)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[] False []"


def test_the_traces_url() -> None:
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("https://otel.example/custom/path") == "https://otel.example/custom/path"


def test_settings_refuse_an_endpoint_that_is_not_a_url() -> None:
    with pytest.raises(ValueError, match="otlp_endpoint"):
        settings(otlp_endpoint="collector:4318")
    assert settings(otlp_endpoint="").otlp_endpoint is None  # an empty variable is unset


class Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Collector.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


def test_spans_reach_an_otlp_http_collector(classifier: OnnxClassifier) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Collector.received = []
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        app = create_app(settings(otlp_endpoint=endpoint, otel_service_name="digits-eu"), classifier)
        with TestClient(app) as client:
            assert client.post("/v1/predict/batch", json={"items": [{"pixels": [[0] * 28] * 28}]}).status_code == 200
        # Leaving the client ran the lifespan's shutdown, which sends what the batch processor still holds.
    finally:
        server.shutdown()
    assert Collector.received and {path for path, _ in Collector.received} == {"/v1/traces"}
    names, services = set(), set()
    for _, body in Collector.received:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            services |= {a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"}
            names |= {span.name for scope in resource_spans.scope_spans for span in scope.spans}
    assert services == {"digits-eu"}
    assert names == {"POST /v1/predict/batch", "decode", "infer", "queue", "run", "answer"}
