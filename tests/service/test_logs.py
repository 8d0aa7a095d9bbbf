"""The request log and request ids (service/logs.py, service/requestid.py): one JSON line per request with the
route template, the model and the id; the id echoed in X-Request-ID and in every error body; probes left out;
the same format for the service's own lines and uvicorn's.

    pytest tests/service/test_logs.py
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service.logs import REQUEST_LOGGER, JsonFormatter, RequestLine, TextFormatter, log_config, log_request
from service.model import OnnxClassifier

ClientFactory = Callable[..., TestClient]
ROOT_DIR = Path(__file__).resolve().parents[2]

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
REQUEST_KEYS = ["time", "level", "logger", "message", "request_id", "method", "route", "status", "latency_ms",
                "model", "version", "images", "client"]  # fmt: skip
BLANK = {"pixels": [[0] * 28] * 28}


class Captured:
    """Every line the service's loggers write while a test runs, parsed."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line.startswith("{")]

    def requests(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["logger"] == REQUEST_LOGGER]


@pytest.fixture
def logs() -> Iterator[Captured]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("service")
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield Captured(stream)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def pixels(image: np.ndarray) -> dict[str, Any]:
    return {"pixels": image.tolist(), "scale": "0-255"}


def test_one_json_line_per_request_with_route_model_and_id(
    make_client: ClientFactory, logs: Captured, classifier: OnnxClassifier, mnist_test: tuple
) -> None:
    client = make_client(access_log=True)
    x, _ = mnist_test
    response = client.post("/v1/predict", json=pixels(x[0]), headers={"X-Request-ID": "checkout-7f3a:1"})
    assert response.status_code == 200 and response.headers["X-Request-ID"] == "checkout-7f3a:1"
    (line,) = logs.requests()
    assert list(line) == REQUEST_KEYS
    assert ISO_UTC.match(line["time"]) and line["level"] == "info"
    assert line["message"] == "POST /v1/predict 200"
    assert line["request_id"] == "checkout-7f3a:1"
    assert (line["method"], line["route"], line["status"]) == ("POST", "/v1/predict", 200)
    assert 0 < line["latency_ms"] < 10_000
    assert (line["model"], line["version"], line["images"]) == (classifier.name, classifier.version, 1)
    assert line["client"] == "testclient"

    items = [pixels(x[i]) for i in range(3)]
    batch = client.post("/v1/predict/batch", json={"items": items})
    v2 = client.post(
        f"/v2/models/{classifier.name}/infer",
        json={"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784}]},
    )
    missing = client.get("/v1/no-such-route")
    lines = logs.requests()[1:]
    assert [(entry["route"], entry["status"], entry["images"]) for entry in lines] == [
        ("/v1/predict/batch", 200, 3),
        ("/v2/models/{name}/infer", 200, 1),  # the template, never the raw path
        ("unmatched", 404, 0),  # no route: never the raw path (unbounded values)
    ]
    generated = [entry["request_id"] for entry in lines]
    assert all(HEX32.match(rid) for rid in generated) and len(set(generated)) == 3
    assert generated == [r.headers["X-Request-ID"] for r in (batch, v2, missing)]
    assert lines[-1]["model"] is None and lines[-1]["version"] is None


@pytest.mark.parametrize(
    "sent",
    ["x" * 129, "has space", 'quote"d', "new\nline", "semi;colon", "ünïcode", ""],
    ids=["too-long", "space", "quote", "newline", "semicolon", "non-ascii", "empty"],
)
def test_an_unsafe_request_id_is_replaced_never_refused(make_client: ClientFactory, sent: str) -> None:
    client = make_client()
    # httpx refuses to send a newline or non-ASCII in a header: send those as raw bytes.
    headers = [(b"x-request-id", sent.encode("utf-8"))]
    response = client.post("/v1/predict", json=BLANK, headers=headers)
    assert response.status_code in (200, 422)
    assert HEX32.match(response.headers["X-Request-ID"])


def test_a_safe_request_id_is_kept(make_client: ClientFactory) -> None:
    client = make_client()
    for rid in ("a" * 128, "01HZX3V4K9Q7", "9b2f1c1e-3d4e-4f5a-8b6c-7d8e9f0a1b2c", "YWJj+/de=@x.y_z"):
        assert client.get("/healthz", headers={"X-Request-ID": rid}).headers["X-Request-ID"] == rid


def error_with_id(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    return dict(error)


def test_every_v1_error_body_carries_the_request_id(make_client: ClientFactory) -> None:
    client = make_client(max_body_bytes=4096)
    assert error_with_id(client.post("/v1/predict", json={"pixels": [[0]]}), 422)["code"] == "invalid_input"
    assert error_with_id(client.post("/v1/predict?model=nope", json=BLANK), 404)["code"] == "model_not_found"
    assert error_with_id(client.get("/v1/models/nothing-here"), 404)["code"] == "not_found"
    # Answered by the body-size middleware before any route runs.
    too_big = client.post("/v1/predict", content=b"0" * 5000, headers={"Content-Type": "application/json"})
    assert error_with_id(too_big, 413)["code"] == "payload_too_large"
    sent = client.post("/v1/predict", json={"pixels": [[0]]}, headers={"X-Request-ID": "mine-1"})
    assert error_with_id(sent, 422)["request_id"] == "mine-1"


def test_v2_errors_keep_the_protocol_body_and_carry_the_id_in_the_header(make_client: ClientFactory) -> None:
    client = make_client()
    response = client.post("/v2/models/nope/infer", json={"inputs": []}, headers={"X-Request-ID": "v2-req"})
    assert response.status_code == 404
    assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str)
    assert response.headers["X-Request-ID"] == "v2-req"


def test_readiness_errors_carry_the_request_id(make_client: ClientFactory, classifier: OnnxClassifier) -> None:
    import threading

    release = threading.Event()

    def slow_loader(_settings: object) -> OnnxClassifier:
        release.wait(10)
        return classifier

    client = make_client(model=None, loader=slow_loader)
    try:
        assert error_with_id(client.get("/readyz"), 503)["code"] == "model_not_ready"
    finally:
        release.set()


def test_an_unexpected_error_is_a_500_with_the_id_logged_with_its_traceback(
    make_client: ClientFactory, logs: Captured
) -> None:
    client = make_client(access_log=True)

    async def broken() -> None:
        raise RuntimeError("a bug")

    client.app.router.routes.insert(0, APIRoute("/v1/broken", broken))  # type: ignore[attr-defined]
    response = client.get("/v1/broken", headers={"X-Request-ID": "bug-report-42"})
    assert error_with_id(response, 500) == {
        "code": "internal_error",
        "message": "internal server error",
        "request_id": "bug-report-42",
    }
    (request,) = logs.requests()
    assert (request["route"], request["status"], request["request_id"]) == ("/v1/broken", 500, "bug-report-42")
    (error,) = [line for line in logs.lines() if line["message"] == "unhandled error"]
    assert error["level"] == "error" and error["request_id"] == "bug-report-42"
    assert "Traceback" in error["exception"] and "RuntimeError: a bug" in error["exception"]


def test_probes_are_left_out_unless_asked_for(make_client: ClientFactory, logs: Captured) -> None:
    probes = ["/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"]
    quiet = make_client(access_log=True)
    for path in probes:
        assert quiet.get(path).headers["X-Request-ID"]  # an id, even when not logged
    quiet.get("/v1/models")
    assert [line["route"] for line in logs.requests()] == ["/v1/models"]

    chatty = make_client(access_log=True, log_probes=True)
    for path in probes:
        chatty.get(path)
    assert [line["route"] for line in logs.requests()[1:]] == probes


def test_access_log_off_writes_no_line_but_still_gives_ids(make_client: ClientFactory, logs: Captured) -> None:
    client = make_client(access_log=False)
    response = client.post("/v1/predict", json={"pixels": [[0]]})
    assert error_with_id(response, 422)
    assert logs.requests() == []


def record_of(line: RequestLine) -> logging.LogRecord:
    stream = io.StringIO()
    logger = logging.getLogger("test.requests")
    handler = logging.StreamHandler(stream)
    records: list[logging.LogRecord] = []
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.propagate = False
    try:
        log_request(line, logger)
    finally:
        logger.removeHandler(handler)
    return records[0]


def test_text_format_is_one_readable_line() -> None:
    line = RequestLine("abc123", "POST", "/v1/predict", 200, 1.2345, "mnist-cnn", "1.2.0", 1, "10.0.0.7", "0af7" * 8)
    text = TextFormatter().format(record_of(line))
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO    test\.requests: POST /v1/predict 200 1\.23 ms "
        r"model=mnist-cnn version=1\.2\.0 images=1 client=10\.0\.0\.7 request_id=abc123 trace_id=(0af7){8}",
        text,
    ), text
    assert "trace_id" in JsonFormatter().format(record_of(line))


def run_logging(fmt: str, body: str) -> list[str]:
    """Configure logging as the server does (uvicorn's Config with log_config) in a fresh interpreter; run body."""
    script = textwrap.dedent(
        f"""
        import logging, uvicorn
        from service.logs import log_config
        uvicorn.Config("x:y", log_config=log_config("info", {fmt!r}), log_level="info").configure_logging()
        """
    ) + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT_DIR)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # everything goes to stdout
    return done.stdout.splitlines()


def test_uvicorn_and_service_lines_share_the_json_format_and_uvicorns_access_log_is_off() -> None:
    lines = run_logging(
        "json",
        """
        logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
        logging.getLogger("service").warning("reload failed, still serving %s", "mnist-cnn 1.2.0")
        logging.getLogger("asyncio").error("Task exception was never retrieved")
        logging.getLogger("uvicorn.access").info("this must not appear")
        print("uvicorn access handlers:", logging.getLogger("uvicorn.access").hasHandlers())
        """,
    )
    assert lines[-1] == "uvicorn access handlers: False"
    parsed = [json.loads(line) for line in lines[:-1]]
    assert [(p["level"], p["logger"], p["message"]) for p in parsed] == [
        ("info", "uvicorn.error", "Started server process [42]"),
        ("warning", "service", "reload failed, still serving mnist-cnn 1.2.0"),
        ("error", "asyncio", "Task exception was never retrieved"),
    ]
    assert all(list(p) == ["time", "level", "logger", "message"] and ISO_UTC.match(p["time"]) for p in parsed)


def test_text_format_for_development() -> None:
    (line,) = run_logging("text", 'logging.getLogger("service").info("serving %s", "mnist-cnn")')
    assert re.fullmatch(r"\S+Z INFO    service: serving mnist-cnn", line), line


def test_log_config_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="json"):
        log_config("info", "yaml")


def test_grpc_calls_get_the_same_line(make_client: ClientFactory, logs: Captured, classifier: OnnxClassifier) -> None:
    import socket

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    make_client(access_log=True, grpc_port=port)
    infer = "/inference.GRPCInferenceService/ModelInfer"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ServerLive(service_pb2.ServerLiveRequest())  # a probe: not logged
        request = service_pb2.ModelInferRequest(model_name=classifier.name)
        tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 784])
        tensor.contents.fp32_contents.extend([0.0] * 2 * 784)
        stub.ModelInfer(request, metadata=[("x-request-id", "grpc-call-1")])
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(service_pb2.ModelInferRequest(model_name="nope"), metadata=[("x-request-id", "bad id")])
    # A failed call's line is written once its status is sent: the client can see the error first.
    deadline = time.monotonic() + 5
    while len(logs.requests()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    ok, missing = logs.requests()
    assert list(ok) == REQUEST_KEYS
    assert (ok["message"], ok["method"], ok["route"], ok["status"]) == (f"GRPC {infer} OK", "GRPC", infer, 200)
    assert (ok["request_id"], ok["model"], ok["version"], ok["images"]) == (
        "grpc-call-1",
        classifier.name,
        classifier.version,
        2,
    )
    assert ok["client"] == "127.0.0.1" and ok["latency_ms"] > 0
    assert (missing["message"], missing["status"]) == (f"GRPC {infer} NOT_FOUND", 404)
    assert HEX32.match(missing["request_id"])  # an unsafe id is replaced, as over HTTP


def test_the_server_writes_json_lines_only(live_server: Callable[..., Any]) -> None:
    """The real server: its startup lines, the request line and its shutdown lines are all JSON objects."""
    server = live_server(env={"MNIST_SERVE_ACCESS_LOG": "true"})
    response = httpx.post(f"{server.url}/v1/predict", json=BLANK, headers={"X-Request-ID": "live-1"}, timeout=10)
    assert response.headers["X-Request-ID"] == "live-1"
    assert server.stop() == 0
    lines = [line for line in server.log().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line (the server's log config is not service.logformat.log_config): {line!r}")
    requests = [p for p in parsed if p["logger"] == REQUEST_LOGGER]
    assert [(p["route"], p["status"], p["request_id"]) for p in requests] == [("/v1/predict", 200, "live-1")]
    assert any(p["logger"].startswith("uvicorn") for p in parsed)  # uvicorn's own lines, same format
