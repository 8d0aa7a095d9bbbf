"""The Open Inference Protocol (KServe v2) endpoints, checked with the real client (tritonclient[http]) against a
live server, and in-process for the protocol details the client hides (error bodies, nested data, hand-built binary).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from conftest import LiveServer
from fastapi.testclient import TestClient
from repository_helpers import MODEL_NAME, add_version, committed_card, flat_repository
from service_helpers import accuracy
from tritonclient.utils import InferenceServerException

from service.model import OnnxClassifier

ClientFactory = Callable[..., TestClient]
StartServer = Callable[..., LiveServer]
KEY = "protocol-key-for-the-tests-0123456789"
#: Allowed shortfall against the card's test accuracy on a 500-digit subset (sampling noise).
ACCURACY_TOLERANCE = 0.01
DIGITS = 500


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = flat_repository(tmp_path / "models")
    add_version(root, MODEL_NAME, "7.0.0")
    return root


@pytest.fixture
def triton_client(live_server: StartServer, repo: Path) -> Iterator[triton.InferenceServerClient]:
    server = live_server(env={"MNIST_SERVE_MODEL_DIR": str(repo)})
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", concurrency=4)
    yield client
    client.close()
    assert server.stop() == 0


def images_01(x: np.ndarray) -> np.ndarray:
    """uint8 N×28×28 → float32 N×28×28×1 in 0..1, what the model takes."""
    return (x.astype(np.float32) / 255.0)[..., None]


def infer_input(images: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def client_error(call: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


# --- the real client ---------------------------------------------------------------------------------------


def test_health_metadata_config_and_index(triton_client: triton.InferenceServerClient) -> None:
    client = triton_client
    committed = committed_card()["version"]
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL_NAME)
    assert client.is_model_ready(MODEL_NAME, "7.0.0") and client.is_model_ready(MODEL_NAME, committed)
    assert not client.is_model_ready("nope") and not client.is_model_ready(MODEL_NAME, "9.9.9")

    server = client.get_server_metadata()
    assert server["name"] == "mnist-serve" and "binary_tensor_data" in server["extensions"]
    metadata = client.get_model_metadata(MODEL_NAME)
    assert metadata == {
        "name": MODEL_NAME,
        "versions": [committed, "7.0.0"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 28, 28, 1]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "digit", "datatype": "INT64", "shape": [-1]},
            {"name": "verdict", "datatype": "BYTES", "shape": [-1]},
        ],
    }
    assert client.get_model_metadata(MODEL_NAME, "7.0.0") == metadata
    config = client.get_model_config(MODEL_NAME, committed)
    assert [o["name"] for o in config["output"]] == ["probabilities", "digit", "verdict"]
    assert config["output"][2]["data_type"] == "TYPE_STRING"
    assert config["parameters"]["version"]["string_value"] == committed
    assert config["input"][0]["dims"] == [28, 28, 1] and config["max_batch_size"] >= 1
    assert client.get_model_repository_index() == [
        {"name": MODEL_NAME, "version": v, "state": "READY", "reason": ""} for v in (committed, "7.0.0")
    ]
    missing = client_error(lambda: client.get_model_metadata("nope"))
    assert missing.status() == "404" and "nope" in missing.message()


def test_infers_real_digits_with_binary_and_json_tensors(
    triton_client: triton.InferenceServerClient, mnist_test: tuple, classifier: OnnxClassifier
) -> None:
    client = triton_client
    x, y = mnist_test
    images = images_01(x[:DIGITS])
    expected = classifier.predict(images)
    floor = committed_card()["metrics"]["test_accuracy"] - ACCURACY_TOLERANCE

    # The client's defaults: binary input, every output in binary.
    result = client.infer(MODEL_NAME, [infer_input(images)], request_id="binary-1")
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (MODEL_NAME, "7.0.0", "binary-1")
    digits = result.as_numpy("digit")
    assert digits.dtype == np.int64 and digits.shape == (DIGITS,)
    assert accuracy(digits, y[:DIGITS]) >= floor
    verdicts = result.as_numpy("verdict")  # BYTES, decoded by the client from Triton's length-prefixed form
    assert verdicts.shape == (DIGITS,) and {v.decode() for v in verdicts} <= {"digit", "unsure", "not_a_digit"}
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)

    # JSON both ways, one named output.
    wanted = [triton.InferRequestedOutput("probabilities", binary_data=False)]
    result = client.infer(MODEL_NAME, [infer_input(images, binary=False)], outputs=wanted, model_version="7.0.0")
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]
    assert result.as_numpy("digit") is None
    probs = result.as_numpy("probabilities")
    assert probs.shape == (DIGITS, 10) and accuracy(probs.argmax(1), y[:DIGITS]) >= floor
    np.testing.assert_allclose(probs, expected, atol=1e-6)

    # The other accepted shapes, and a named version.
    committed = committed_card()["version"]
    for shaped in (images.reshape(DIGITS, 784), images.reshape(DIGITS, 28, 28)):
        result = client.infer(MODEL_NAME, [infer_input(shaped[:50])], model_version=committed)
        assert result.get_response()["model_version"] == committed
        np.testing.assert_array_equal(result.as_numpy("digit"), expected[:50].argmax(1))


def test_concurrent_clients_share_the_batcher(triton_client: triton.InferenceServerClient, mnist_test: tuple) -> None:
    x, y = mnist_test
    pending = [triton_client.async_infer(MODEL_NAME, [infer_input(images_01(x[i : i + 1]))]) for i in range(64)]
    digits = [int(p.get_result().as_numpy("digit")[0]) for p in pending]
    assert accuracy(digits, y[:64]) >= 62 / 64


def test_protocol_errors_reach_the_client(live_server: StartServer, mnist_test: tuple) -> None:
    server = live_server(env={"MNIST_SERVE_API_KEY": KEY})
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")

    def auth() -> dict[str, str]:
        return {"X-API-Key": KEY}  # a fresh dict each call: tritonclient writes its own headers into it

    x, y = mnist_test
    good = images_01(x[:4])

    unauthorized = client_error(lambda: client.infer(MODEL_NAME, [infer_input(good)]))
    assert unauthorized.status() == "401" and "API key" in unauthorized.message()
    assert client.is_server_ready() and client.get_model_metadata(MODEL_NAME)  # metadata needs no key
    digits = client.infer(MODEL_NAME, [infer_input(good)], headers=auth()).as_numpy("digit")
    assert accuracy(digits, y[:4]) >= 3 / 4

    unknown = client_error(lambda: client.infer("nope", [infer_input(good)], headers=auth()))
    assert unknown.status() == "404" and "nope" in unknown.message()
    version = client_error(lambda: client.infer(MODEL_NAME, [infer_input(good)], model_version="9", headers=auth()))
    assert version.status() == "404" and "'9'" in version.message()

    as_ints = triton.InferInput("input", [4, 28, 28, 1], "INT64")
    as_ints.set_data_from_numpy(x[:4, ..., None].astype(np.int64))
    wrong_type = client_error(lambda: client.infer(MODEL_NAME, [as_ints], headers=auth()))
    assert wrong_type.status() == "400" and "FP32" in wrong_type.message()
    cropped = client_error(lambda: client.infer(MODEL_NAME, [infer_input(good[:, :27, :27])], headers=auth()))
    assert cropped.status() == "400" and "[4, 27, 27, 1]" in cropped.message()
    unscaled = client_error(lambda: client.infer(MODEL_NAME, [infer_input(good * 255)], headers=auth()))
    assert unscaled.status() == "400" and "0..1" in unscaled.message()
    renamed = triton.InferInput("pixels", list(good.shape), "FP32")
    renamed.set_data_from_numpy(good)
    wrong_name = client_error(lambda: client.infer(MODEL_NAME, [renamed], headers=auth()))
    assert wrong_name.status() == "400" and "'pixels'" in wrong_name.message()
    outputs = [triton.InferRequestedOutput("logits")]
    unknown_output = client_error(
        lambda: client.infer(MODEL_NAME, [infer_input(good)], outputs=outputs, headers=auth())
    )
    assert unknown_output.status() == "400" and "'logits'" in unknown_output.message()
    client.close()
    assert server.stop() == 0


# --- the wire format, in-process ---------------------------------------------------------------------------


def infer_body(data: Any, shape: list[int], **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}], **extra}


def test_json_tensors_flat_or_nested(client: TestClient, mnist_test: tuple, classifier: OnnxClassifier) -> None:
    x, _ = mnist_test
    images = images_01(x[:3])
    expected = classifier.predict(images)
    url = f"/v2/models/{MODEL_NAME}/infer"
    for body in (
        infer_body(images.reshape(-1).tolist(), [3, 28, 28, 1], id="flat"),
        infer_body(images.tolist(), [3, 28, 28, 1], id="nested"),
        infer_body(images.reshape(3, 784).tolist(), [3, 784], id="rows"),
    ):
        response = client.post(url, json=body)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        answer = response.json()
        assert answer["id"] == body["id"] and answer["model_name"] == MODEL_NAME
        probabilities, digit, verdict = answer["outputs"]
        assert verdict["datatype"] == "BYTES" and verdict["shape"] == [3] and len(verdict["data"]) == 3
        assert probabilities == {**probabilities, "name": "probabilities", "datatype": "FP32", "shape": [3, 10]}
        np.testing.assert_allclose(np.array(probabilities["data"]).reshape(3, 10), expected, atol=1e-6)
        assert digit == {"name": "digit", "datatype": "INT64", "shape": [3], "data": expected.argmax(1).tolist()}


def test_binary_tensors_both_ways_by_hand(client: TestClient, mnist_test: tuple, classifier: OnnxClassifier) -> None:
    """The binary extension as the Triton docs spell it: JSON header, then little-endian tensors."""
    x, _ = mnist_test
    images = images_01(x[:5])
    header = {
        "inputs": [{"name": "input", "shape": [5, 28, 28, 1], "datatype": "FP32",
                    "parameters": {"binary_data_size": images.nbytes}}],
        "outputs": [{"name": "digit", "parameters": {"binary_data": False}}, {"name": "probabilities"}],
        "parameters": {"binary_data_output": True},
    }  # fmt: skip
    head = json.dumps(header).encode()
    response = client.post(
        f"/v2/models/{MODEL_NAME}/infer",
        content=head + images.astype("<f4").tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    answer = json.loads(response.content[:length])
    digit, probabilities = answer["outputs"]
    expected = classifier.predict(images)
    assert digit["data"] == expected.argmax(1).tolist() and "parameters" not in digit
    assert probabilities["parameters"] == {"binary_data_size": 5 * 10 * 4}
    binary = np.frombuffer(response.content[length:], dtype="<f4").reshape(5, 10)
    np.testing.assert_allclose(binary, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "too deeply"),
        (json.dumps({"inputs": []}).encode(), 400, "exactly one tensor"),
        (json.dumps(infer_body([0.0] * 10, [1, 784])).encode(), 400, "holds 10 values"),
        (json.dumps(infer_body([[0.0] * 784, [0.0]], [2, 784])).encode(), 400, "ragged"),
        (json.dumps(infer_body(["a"] * 784, [1, 784])).encode(), 400, "only numbers"),
        (json.dumps(infer_body([0.0] * 784, [0, 784])).encode(), 400, "no image"),
        (json.dumps(infer_body([0.0] * 784, [1, 784], id=7)).encode(), 400, "'id' must be a string"),
        (json.dumps(infer_body([0.0] * 784, [2000, 784])).encode(), 413, "more than"),
    ],
)
def test_bad_requests_get_protocol_errors(client: TestClient, body: bytes, status: int, fragment: str) -> None:
    response = client.post(f"/v2/models/{MODEL_NAME}/infer", content=body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and fragment in response.json()["error"]


def test_every_v2_error_has_the_protocol_shape(make_client: ClientFactory) -> None:
    client = make_client(max_body_bytes=4096)
    for method, path, status in (
        ("GET", "/v2/nope", 404),
        ("GET", "/v2/models/nope", 404),
        ("GET", "/v2/models/nope/ready", 404),
        ("GET", f"/v2/models/{MODEL_NAME}/versions/0/config", 404),
        ("DELETE", f"/v2/models/{MODEL_NAME}", 405),
    ):
        response = client.request(method, path)
        assert response.status_code == status, (path, response.text)
        assert isinstance(response.json()["error"], str), path
    too_big = client.post(f"/v2/models/{MODEL_NAME}/infer", content=b"0" * 8192)
    assert too_big.status_code == 413 and isinstance(too_big.json()["error"], str)
    # /v1 keeps its own envelope.
    assert client.get("/v1/nope").json()["error"]["code"] == "not_found"


def test_not_ready_while_loading(make_client: ClientFactory, classifier: OnnxClassifier) -> None:
    release = threading.Event()

    def slow_loader(_settings: object) -> OnnxClassifier:
        release.wait(10)
        return classifier

    client = make_client(model=None, loader=slow_loader)
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 400 and client.get("/v2/health/ready").content == b""
    assert client.get(f"/v2/models/{MODEL_NAME}/ready").status_code == 400
    busy = client.post(f"/v2/models/{MODEL_NAME}/infer", json=infer_body([0.0] * 784, [1, 784]))
    assert busy.status_code == 503 and busy.headers["Retry-After"] and isinstance(busy.json()["error"], str)
    release.set()
    deadline = time.monotonic() + 10
    while client.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.post(f"/v2/models/{MODEL_NAME}/infer", json=infer_body([0.0] * 784, [1, 784])).status_code == 200


def test_the_example_script_against_a_live_server(live_server: StartServer) -> None:
    server = live_server(env={"MNIST_SERVE_API_KEY": KEY})
    env = {**server.env, "MNIST_SERVE_API_KEY": KEY}
    script = Path(__file__).resolve().parents[2] / "examples" / "triton_client.py"
    done = subprocess.run(
        [sys.executable, str(script), "--url", f"127.0.0.1:{server.port}", "--count", "100"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 request(s) of up to 1024 digits, binary tensors: accuracy" in done.stdout
    assert "both ways agree on every digit: True" in done.stdout
    assert server.stop() == 0


@pytest.mark.parametrize("name", [[1], {}, None, 3])
def test_an_output_name_that_is_not_a_string_is_a_protocol_error(name: Any) -> None:
    from service.protocol import ProtocolError, _requested_output

    with pytest.raises(ProtocolError, match="unknown output"):
        _requested_output({"name": name}, False)
