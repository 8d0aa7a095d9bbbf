"""The Open Inference Protocol over gRPC, checked with the real client (tritonclient[grpc]) against a live server,
and by hand (Triton's own protos, through grpc) for what the client hides: typed contents, trailers, bad messages.

One live server serves most of the module (an API key set, at most 512 images a request); the not-ready and
overloaded answers come from apps in this process, where the model's loading and queue can be held.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from conftest import LiveServer, free_port, spawn_server
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from repository_helpers import MODEL_NAME, add_version, committed_card, flat_repository
from service_helpers import accuracy
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.model import OnnxClassifier

ROOT = Path(__file__).resolve().parents[2]
KEY = "grpc-key-for-the-tests-0123456789"
AUTH = {"x-api-key": KEY}
MAX_IMAGES = 512
#: Allowed shortfall against the card's test accuracy on a 500-digit subset (sampling noise).
ACCURACY_TOLERANCE = 0.01
DIGITS = 500
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    repo = flat_repository(tmp_path_factory.mktemp("grpc-models"))
    add_version(repo, MODEL_NAME, "7.0.0")
    env = {
        "MNIST_SERVE_MODEL_DIR": str(repo),
        "MNIST_SERVE_API_KEY": KEY,
        "MNIST_SERVE_MAX_BATCH_ITEMS": str(MAX_IMAGES),
        "MNIST_SERVE_WORKERS": "1",
    }
    live = spawn_server(tmp_path_factory.mktemp("grpc-server") / "server.log", env)
    try:
        live.wait_ready()
        yield live
    finally:
        if live.process.poll() is None:
            assert live.stop() == 0, live.log()


@pytest.fixture
def client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    opened = triton.InferenceServerClient(url=server.grpc_url)
    yield opened
    opened.close()


@pytest.fixture
def stub(server: LiveServer) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """Triton's own generated stub: the messages exactly as a non-tritonclient gRPC client would build them."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def images_01(x: np.ndarray) -> np.ndarray:
    """uint8 N×28×28 → float32 N×28×28×1 in 0..1, what the model takes."""
    return (x.astype(np.float32) / 255.0)[..., None]


def infer_input(images: np.ndarray, name: str = "input", datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput(name, list(images.shape), datatype)
    tensor.set_data_from_numpy(images)
    return tensor


def client_error(call: Callable[[], Any]) -> tuple[str, str]:
    """The status code's name and the message of the error ``call`` raises."""
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()).removeprefix("StatusCode."), str(caught.value.message())


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def typed_request(images: np.ndarray, *outputs: str, request_id: str = "") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL_NAME, id=request_id)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(images.shape))
    tensor.contents.fp32_contents.extend(images.reshape(-1).tolist())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def raw_output(response: service_pb2.ModelInferResponse, name: str, dtype: str) -> np.ndarray:
    index = [o.name for o in response.outputs].index(name)
    return np.frombuffer(response.raw_output_contents[index], dtype=dtype)


def samples(metrics_text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def grpc_requests(server: LiveServer, method: str) -> dict[str, float]:
    """mnist_serve_requests_total for one RPC, by status."""
    text = httpx.get(f"{server.url}/metrics").text
    counts = samples(text, "mnist_serve_requests_total")
    route = f"/inference.GRPCInferenceService/{method}"
    return {
        dict(k)["status"]: v for k, v in counts.items() if dict(k)["route"] == route and dict(k)["method"] == "GRPC"
    }


# --- the real client ---------------------------------------------------------------------------------------


def test_logs_where_it_listens(server: LiveServer) -> None:
    assert f"gRPC (Open Inference Protocol) listening on 127.0.0.1:{server.grpc_port}" in server.log()


def test_health_metadata_config_and_index_as_rest_answers_them(
    client: triton.InferenceServerClient, server: LiveServer
) -> None:
    committed = committed_card()["version"]
    # No API key needed for any of these (as over REST).
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL_NAME)
    assert client.is_model_ready(MODEL_NAME, "7.0.0") and client.is_model_ready(MODEL_NAME, committed)
    assert not client.is_model_ready("nope") and not client.is_model_ready(MODEL_NAME, "9.9.9")

    rest = httpx.Client(base_url=server.url)
    assert client.get_server_metadata(as_json=True) == rest.get("/v2").json()

    metadata = client.get_model_metadata(MODEL_NAME)
    as_dict = {
        "name": metadata.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in metadata.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in metadata.outputs],
    }
    assert as_dict == rest.get(f"/v2/models/{MODEL_NAME}").json()
    assert [o.name for o in metadata.outputs] == ["probabilities", "digit", "verdict"]
    assert client.get_model_metadata(MODEL_NAME, "7.0.0") == metadata

    config = client.get_model_config(MODEL_NAME, committed).config
    rest_config = rest.get(f"/v2/models/{MODEL_NAME}/versions/{committed}/config").json()
    assert config.name == rest_config["name"] == MODEL_NAME and config.platform == rest_config["platform"]
    assert config.max_batch_size == rest_config["max_batch_size"] == MAX_IMAGES
    assert [o.name for o in config.output] == [o["name"] for o in rest_config["output"]]
    assert model_config_pb2.DataType.Name(config.output[2].data_type) == "TYPE_STRING"
    assert list(config.input[0].dims) == rest_config["input"][0]["dims"] == [28, 28, 1]
    assert config.parameters["version"].string_value == committed
    assert config.parameters["sha256"].string_value == rest_config["parameters"]["sha256"]["string_value"]
    assert list(config.dynamic_batching.preferred_batch_size) == rest_config["dynamic_batching"]["preferred_batch_size"]

    index = client.get_model_repository_index().models
    assert [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in index] == rest.post(
        "/v2/repository/index"
    ).json()

    assert client_error(lambda: client.get_model_metadata("nope"))[0] == "NOT_FOUND"
    assert client_error(lambda: client.get_model_config(MODEL_NAME, "9.9.9"))[0] == "NOT_FOUND"
    rest.close()


def test_infers_real_digits(
    client: triton.InferenceServerClient, mnist_test: tuple, classifier: OnnxClassifier
) -> None:
    x, y = mnist_test
    images = images_01(x[:DIGITS])
    expected = classifier.predict(images)
    floor = committed_card()["metrics"]["test_accuracy"] - ACCURACY_TOLERANCE

    # The client's defaults: raw little-endian input, every output, answered in raw_output_contents.
    result = client.infer(MODEL_NAME, [infer_input(images)], request_id="grpc-1", headers=AUTH)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL_NAME, "7.0.0", "grpc-1")
    assert [o.name for o in response.outputs] == ["probabilities", "digit", "verdict"]
    digits = result.as_numpy("digit")
    assert digits.dtype == np.int64 and digits.shape == (DIGITS,)
    assert accuracy(digits, y[:DIGITS]) >= floor
    verdicts = result.as_numpy("verdict")  # BYTES, decoded by the client from Triton's length-prefixed form
    assert verdicts.shape == (DIGITS,) and {v.decode() for v in verdicts} <= {"digit", "unsure", "not_a_digit"}
    assert sum(v == b"digit" for v in verdicts) > 0.9 * DIGITS
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)

    # Requested outputs only, in the order asked.
    wanted = [triton.InferRequestedOutput("verdict"), triton.InferRequestedOutput("digit")]
    result = client.infer(MODEL_NAME, [infer_input(images[:20])], outputs=wanted, headers=AUTH)
    assert [o.name for o in result.get_response().outputs] == ["verdict", "digit"]
    assert result.as_numpy("probabilities") is None and result.get_response().id == ""
    np.testing.assert_array_equal(result.as_numpy("digit"), expected[:20].argmax(1))

    # The other accepted shapes, a named version, the key as a bearer token.
    committed = committed_card()["version"]
    for shaped in (images.reshape(DIGITS, 784), images.reshape(DIGITS, 28, 28)):
        result = client.infer(
            MODEL_NAME, [infer_input(shaped[:50])], model_version=committed, headers={"authorization": f"Bearer {KEY}"}
        )
        assert result.get_response().model_version == committed
        np.testing.assert_array_equal(result.as_numpy("digit"), expected[:50].argmax(1))


def test_typed_fp32_contents_by_hand(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, mnist_test: tuple, classifier: OnnxClassifier
) -> None:
    x, _ = mnist_test
    images = images_01(x[:8]).reshape(8, 784)
    expected = classifier.predict(images.reshape(8, 28, 28, 1))
    response = stub.ModelInfer(typed_request(images, "digit", "probabilities", request_id="typed"), metadata=[
        ("x-api-key", KEY)])  # fmt: skip
    assert response.id == "typed" and [o.name for o in response.outputs] == ["digit", "probabilities"]
    assert [list(o.shape) for o in response.outputs] == [[8], [8, 10]]
    assert [o.datatype for o in response.outputs] == ["INT64", "FP32"]
    np.testing.assert_array_equal(raw_output(response, "digit", "<i8"), expected.argmax(1))
    np.testing.assert_allclose(raw_output(response, "probabilities", "<f4").reshape(8, 10), expected, atol=1e-6)

    def refused(request: service_pb2.ModelInferRequest, fragment: str) -> None:
        error = rpc_error(lambda: stub.ModelInfer(request, metadata=[("x-api-key", KEY)]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.details(), error.details()

    short = typed_request(images)
    del short.inputs[0].contents.fp32_contents[-1]
    refused(short, "6271 values")
    as_ints = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
    as_ints.inputs.add(name="input", datatype="FP32", shape=[1, 784]).contents.int_contents.extend([0] * 784)
    refused(as_ints, "fp32_contents")
    both = typed_request(images[:1])
    both.raw_input_contents.append(images[:1].astype("<f4").tobytes())
    refused(both, "both")
    cut = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
    cut.inputs.add(name="input", datatype="FP32", shape=[1, 784])
    cut.raw_input_contents.append(images[:1].astype("<f4").tobytes()[:-4])
    refused(cut, "3132 bytes")
    nameless = typed_request(images[:1])
    nameless.model_name = ""
    refused(nameless, "names no model")


def test_errors_and_their_codes(client: triton.InferenceServerClient, mnist_test: tuple) -> None:
    x, _ = mnist_test
    good = images_01(x[:4])

    def infer(*inputs: triton.InferInput, headers: dict[str, str] | None = AUTH, **kwargs: Any) -> Any:
        return client.infer(MODEL_NAME if "model_name" not in kwargs else kwargs.pop("model_name"), list(inputs),
                            headers=headers, **kwargs)  # fmt: skip

    status, message = client_error(lambda: infer(infer_input(good), headers=None))
    assert status == "UNAUTHENTICATED" and "API key" in message
    assert client_error(lambda: infer(infer_input(good), headers={"x-api-key": "not-the-key-0123456789"}))[0] == (
        "UNAUTHENTICATED"
    )
    assert client_error(lambda: infer(infer_input(good), headers={"authorization": "Basic " + KEY}))[0] == (
        "UNAUTHENTICATED"
    )

    status, message = client_error(lambda: infer(infer_input(good), model_name="nope"))
    assert status == "NOT_FOUND" and "'nope'" in message
    status, message = client_error(lambda: infer(infer_input(good), model_version="9"))
    assert status == "NOT_FOUND" and "'9'" in message

    cases = [
        (infer_input(x[:4, ..., None].astype(np.int64), datatype="INT64"), "FP32"),
        (infer_input(good[:, :27, :27]), "[4, 27, 27, 1]"),
        (infer_input(good * 255), "0..1"),
        (infer_input(np.full_like(good, np.nan)), "0..1"),
        (infer_input(good, name="pixels"), "'pixels'"),
        (infer_input(np.zeros((0, 784), np.float32)), "no image"),
    ]
    for tensor, fragment in cases:
        status, message = client_error(lambda tensor=tensor: infer(tensor))
        assert (status, fragment in message) == ("INVALID_ARGUMENT", True), (fragment, message)
    for outputs, fragment in (
        ([triton.InferRequestedOutput("logits")], "'logits'"),
        ([triton.InferRequestedOutput("probabilities", class_count=3)], "classification"),
    ):
        status, message = client_error(lambda outputs=outputs: infer(infer_input(good), outputs=outputs))
        assert (status, fragment in message) == ("INVALID_ARGUMENT", True), message

    too_many = np.zeros((MAX_IMAGES + 1, 784), np.float32)
    status, message = client_error(lambda: infer(infer_input(too_many)))
    assert status == "RESOURCE_EXHAUSTED" and f"more than the {MAX_IMAGES}" in message
    # Far more than a request may carry: refused by grpc's message limit before the message is read whole.
    status, message = client_error(lambda: infer(infer_input(np.zeros((4 * MAX_IMAGES, 784), np.float32))))
    assert status == "RESOURCE_EXHAUSTED" and "larger than max" in message


def test_a_message_that_is_not_protobuf_is_invalid_argument(server: LiveServer) -> None:
    with grpc.insecure_channel(server.grpc_url) as channel:
        error = rpc_error(lambda: channel.unary_unary(INFER)(b"\xff\xff\xff", metadata=[("x-api-key", KEY)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in error.details()


def test_concurrent_clients_share_the_batcher(server: LiveServer, mnist_test: tuple) -> None:
    x, y = mnist_test
    runs = "mnist_serve_batch_size_count"
    labels = (("model", MODEL_NAME), ("version", "7.0.0"))
    before = samples(httpx.get(f"{server.url}/metrics").text, runs).get(labels, 0.0)
    clients = [triton.InferenceServerClient(url=server.grpc_url) for _ in range(4)]
    answers: queue.Queue[tuple[int, Any, Any]] = queue.Queue()
    for i in range(64):
        clients[i % 4].async_infer(
            MODEL_NAME,
            [infer_input(images_01(x[i : i + 1]))],
            callback=lambda result, error, i=i: answers.put((i, result, error)),
            headers=AUTH,
        )
    got = [answers.get(timeout=30) for _ in range(64)]
    for c in clients:
        c.close()
    assert all(error is None for _, _, error in got), [e for _, _, e in got if e is not None][:1]
    digits = {i: int(result.as_numpy("digit")[0]) for i, result, _ in got}
    assert accuracy([digits[i] for i in range(64)], y[:64]) >= 62 / 64
    after = samples(httpx.get(f"{server.url}/metrics").text, runs)[labels]
    assert after - before < 64  # fewer model runs than requests: requests shared runs


def test_same_answers_as_rest(server: LiveServer, client: triton.InferenceServerClient, mnist_test: tuple) -> None:
    x, _ = mnist_test
    images = images_01(x[:100])
    over_grpc = client.infer(MODEL_NAME, [infer_input(images)], headers=AUTH)
    rest = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    tensor = triton_http.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    over_rest = rest.infer(MODEL_NAME, [tensor], headers={"X-API-Key": KEY})
    rest.close()
    assert over_grpc.get_response().model_version == over_rest.get_response()["model_version"]
    np.testing.assert_array_equal(over_grpc.as_numpy("digit"), over_rest.as_numpy("digit"))
    np.testing.assert_array_equal(over_grpc.as_numpy("verdict"), over_rest.as_numpy("verdict"))
    np.testing.assert_allclose(over_grpc.as_numpy("probabilities"), over_rest.as_numpy("probabilities"), atol=1e-6)


def test_rpcs_are_counted_like_http_requests(server: LiveServer, client: triton.InferenceServerClient) -> None:
    before = grpc_requests(server, "ModelInfer")
    ready_before = grpc_requests(server, "ServerReady").get("OK", 0.0)
    assert client.is_server_ready()
    client.infer(MODEL_NAME, [infer_input(np.zeros((1, 784), np.float32))], headers=AUTH)
    client_error(lambda: client.infer("nope", [infer_input(np.zeros((1, 784), np.float32))], headers=AUTH))
    after = grpc_requests(server, "ModelInfer")
    assert after["OK"] - before.get("OK", 0.0) == 1 and after["NOT_FOUND"] - before.get("NOT_FOUND", 0.0) == 1
    assert grpc_requests(server, "ServerReady")["OK"] - ready_before == 1
    text = httpx.get(f"{server.url}/metrics").text
    durations = samples(text, "mnist_serve_request_duration_seconds_count")
    assert durations[(("method", "GRPC"), ("route", INFER))] >= 2


def test_the_example_script_over_grpc(server: LiveServer) -> None:
    script = ROOT / "examples" / "triton_client.py"
    done = subprocess.run(
        [sys.executable, str(script), "--protocol", "grpc", "--url", server.grpc_url, "--count", "100"],
        env={**server.env, "MNIST_SERVE_API_KEY": KEY}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"1 request(s) of up to {MAX_IMAGES} digits over gRPC: accuracy 100.00%" in done.stdout
    assert "100 requests, one digit each, over gRPC: accuracy 100.00%" in done.stdout
    assert "both ways agree on every digit: True" in done.stdout


def test_the_load_generator(server: LiveServer) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.grpc_load", server.grpc_url, "2", "1"],
        cwd=ROOT, env={**server.env, "MNIST_SERVE_API_KEY": KEY}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["errors"] == 0 and figures["rps"] > 0 and 0 < figures["p50_ms"] <= figures["p99_ms"]


def test_workers_share_the_port_and_stop_cleanly(server: LiveServer, tmp_path: Path) -> None:
    """A second server binds the same gRPC port (SO_REUSEPORT, as every worker of one server does)."""
    other = spawn_server(
        tmp_path / "other.log", {"MNIST_SERVE_GRPC_PORT": str(server.grpc_port), "MNIST_SERVE_WORKERS": "1"}
    )
    try:
        other.wait_ready()
        seen = set()
        for _ in range(24):  # new connections, spread by the kernel across both servers
            fresh = triton.InferenceServerClient(url=server.grpc_url)
            seen.add(tuple(fresh.get_model_metadata(MODEL_NAME).versions))
            fresh.close()
        assert len(seen) == 2, seen  # one serves two versions, the other only the committed one
    finally:
        assert other.stop() == 0, other.log()
    assert "Traceback" not in other.log()
    with triton.InferenceServerClient(url=server.grpc_url) as after:
        assert after.is_server_ready()


# --- in-process: held loading, a full queue ------------------------------------------------------------------


def grpc_app(make_client: Callable[..., TestClient], **settings: Any) -> tuple[TestClient, str]:
    port = free_port()
    return make_client(grpc_port=port, **settings), f"127.0.0.1:{port}"


def test_unavailable_while_loading(make_client: Callable[..., TestClient], classifier: OnnxClassifier) -> None:
    release = threading.Event()

    def slow_loader(_settings: object) -> OnnxClassifier:
        release.wait(10)
        return classifier

    _, url = grpc_app(make_client, model=None, loader=slow_loader)
    with triton.InferenceServerClient(url=url) as client:
        assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready(MODEL_NAME)
        assert client_error(lambda: client.get_model_metadata(MODEL_NAME))[0] == "UNAVAILABLE"
        with grpc.insecure_channel(url) as channel:
            error = rpc_error(
                lambda: service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    typed_request(np.zeros((1, 784), np.float32))
                )
            )
        assert error.code() == grpc.StatusCode.UNAVAILABLE and ("retry-after", "1") in error.trailing_metadata()
        release.set()
        deadline = time.monotonic() + 10
        while not client.is_server_ready():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.infer(MODEL_NAME, [infer_input(np.zeros((1, 784), np.float32))]).as_numpy("digit").shape == (1,)


def test_overloaded_is_unavailable_with_retry_after(make_client: Callable[..., TestClient], mnist_test: tuple) -> None:
    _, url = grpc_app(make_client, max_queue_images=64, batching=False)
    images = images_01(mnist_test[0][:64]).reshape(64, 784)
    codes: queue.Queue[grpc.StatusCode] = queue.Queue()
    with grpc.insecure_channel(url) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        futures = [call.future(typed_request(images)) for _ in range(16)]
        for future in futures:
            try:
                future.result(timeout=30)
                codes.put(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                assert ("retry-after", "1") in error.trailing_metadata()
                codes.put(error.code())
    answered = [codes.get() for _ in range(16)]
    assert set(answered) == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, answered
