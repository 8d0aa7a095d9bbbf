"""The HTTP API in-process (TestClient, lifespan included) with the committed model and real MNIST digits."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import (
    accuracy,
    b64,
    dark_on_light,
    jpeg_bytes,
    metric,
    pixels_payload,
    png_bytes,
    png_claiming_size,
)

from service.model import MAX_RUN_BATCH, ModelLoadError, OnnxClassifier

#: Allowed shortfall against the card's test accuracy on the 1,000-image subset (sampling noise of a subset).
ACCURACY_TOLERANCE = 0.005

ClientFactory = Callable[..., TestClient]


def error_of(response: Any, status: int) -> dict[str, Any]:
    """Assert the standard error shape and return its ``error`` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)
    return body["error"]


# --- health, readiness, models ---------------------------------------------------------------------------


def test_health_readiness_and_models(client: TestClient, model_card: dict) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["model"] == {"name": model_card["name"], "version": model_card["version"]}
    (model,) = client.get("/v1/models").json()["models"]
    assert model["name"] == model_card["name"] and model["version"] == model_card["version"]
    assert model["metrics"]["test_accuracy"] == model_card["metrics"]["test_accuracy"]
    assert model["input"] == {"name": "input", "shape": ["batch", 28, 28, 1], "dtype": "float32"}
    assert model["output"] == {"name": "probabilities", "shape": ["batch", 10], "dtype": "float32"}
    assert model["sha256"] == model_card["onnx"]["sha256"] and model["ready"] is True


def test_not_ready_until_the_model_is_loaded(make_client: ClientFactory, classifier: OnnxClassifier) -> None:
    release = threading.Event()

    def slow_loader(_settings: object) -> OnnxClassifier:
        release.wait(10)
        return classifier

    client = make_client(model=None, loader=slow_loader)
    assert client.get("/healthz").status_code == 200  # alive while loading
    error = error_of(client.get("/readyz"), 503)
    assert error["code"] == "model_not_ready"
    assert client.get("/readyz").headers["Retry-After"]
    predict = client.post("/v1/predict", json={"pixels": [[0] * 28] * 28})
    assert error_of(predict, 503)["code"] == "model_not_ready" and predict.headers["Retry-After"]
    assert client.get("/v1/models").json() == {"models": [], "problems": [], "last_reload_error": None}
    assert metric(client.get("/metrics").text, "mnist_serve_model_ready") == 0

    release.set()
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.post("/v1/predict", json={"pixels": [[0] * 28] * 28}).status_code == 200
    assert metric(client.get("/metrics").text, "mnist_serve_model_ready") == 1


def test_a_model_that_fails_to_load_is_reported(make_client: ClientFactory) -> None:
    def broken_loader(_settings: object) -> OnnxClassifier:
        raise ModelLoadError("mnist-cnn.onnx has sha256 0000 but its model card says 1111")

    client = make_client(model=None, loader=broken_loader)
    deadline = time.monotonic() + 5
    while client.get("/readyz").json()["error"]["code"] != "model_load_failed":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Not ready, but alive: restarting the process would not cure the files (under Kubernetes a failing liveness
    # probe would turn this into a restart loop); fix them and reload instead.
    assert client.get("/healthz").status_code == 200
    assert "sha256" in error_of(client.get("/readyz"), 503)["message"]
    assert error_of(client.post("/v1/predict", json={}), 503)["code"] == "model_load_failed"


# --- the input forms -------------------------------------------------------------------------------------


def test_pixels_0_255_and_0_1_give_the_same_answer(client: TestClient, mnist_test: tuple, model_card: dict) -> None:
    x, y = mnist_test
    for i in range(10):
        a = client.post("/v1/predict", json=pixels_payload(x[i], "0-255"))
        b = client.post("/v1/predict", json=pixels_payload(x[i], "0-1"))
        assert a.status_code == b.status_code == 200
        assert a.json()["digit"] == b.json()["digit"] == y[i]
        np.testing.assert_allclose(a.json()["probabilities"], b.json()["probabilities"], atol=1e-5)
    body = a.json()
    assert set(body) == {"digit", "confidence", "verdict", "probabilities", "model"}
    assert body["model"] == {"name": model_card["name"], "version": model_card["version"]}
    assert len(body["probabilities"]) == 10 and abs(sum(body["probabilities"]) - 1) < 1e-3
    assert body["confidence"] == max(body["probabilities"])


def test_base64_png_of_a_digit_drawn_dark_on_light_at_280(client: TestClient, mnist_test: tuple) -> None:
    x, y = mnist_test
    answers = []
    for i in range(20):
        data = b64(png_bytes(dark_on_light(x[i], size=280)))
        prefix = "data:image/png;base64," if i % 2 else ""
        response = client.post("/v1/predict", json={"image_base64": prefix + data})
        assert response.status_code == 200, response.text
        answers.append(response.json()["digit"])
    assert accuracy(answers, y[:20]) >= 0.95


@pytest.mark.parametrize("encode", [png_bytes, jpeg_bytes])
def test_multipart_upload(client: TestClient, mnist_test: tuple, encode: Callable[[np.ndarray], bytes]) -> None:
    x, y = mnist_test
    answers = []
    for i in range(10):
        files = {"file": ("digit.img", encode(dark_on_light(x[i])), "image/png")}
        response = client.post("/v1/predict", files=files)
        assert response.status_code == 200, response.text
        answers.append(response.json()["digit"])
    assert accuracy(answers, y[:10]) >= 0.9


def test_top_k_and_the_image_the_model_saw(client: TestClient, mnist_test: tuple) -> None:
    digit, label = mnist_test[0][0], int(mnist_test[1][0])
    by_query = client.post("/v1/predict?top_k=3&return_image=true", json=pixels_payload(digit)).json()
    by_body = client.post("/v1/predict", json={**pixels_payload(digit), "top_k": 3, "return_image": True}).json()
    assert by_query == by_body
    top = by_body["top_k"]
    assert top[0]["digit"] == label and len(top) == 3
    assert [c["probability"] for c in top] == sorted((c["probability"] for c in top), reverse=True)
    seen = by_body["image"]
    assert (seen["width"], seen["height"]) == (28, 28)
    np.testing.assert_array_equal(np.array(seen["pixels"]), digit)  # pixels go to the model as given
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(seen["png_base64"]))))
    np.testing.assert_array_equal(png, digit)
    # Body wins over the query; multipart takes them as form fields.
    assert len(client.post("/v1/predict?top_k=3", json={**pixels_payload(digit), "top_k": 1}).json()["top_k"]) == 1
    files = {"file": ("d.png", png_bytes(dark_on_light(digit)), "image/png")}
    uploaded = client.post("/v1/predict", files=files, data={"top_k": "2", "return_image": "true"}).json()
    assert len(uploaded["top_k"]) == 2 and len(uploaded["image"]["pixels"]) == 28


def test_normalize_option_centres_a_drawn_digit(client: TestClient, mnist_test: tuple) -> None:
    digit = mnist_test[0][0]
    shifted = np.zeros_like(digit)
    shifted[:, :20] = digit[:, 8:]  # pushed to the left edge
    seen = client.post("/v1/predict?return_image=true", json={**pixels_payload(shifted), "normalize": True})
    cols = np.flatnonzero(np.array(seen.json()["image"]["pixels"]).any(axis=0))
    assert cols[0] > 0  # moved back from the edge


# --- the batch endpoint ----------------------------------------------------------------------------------


def test_batch_of_1000_in_order_at_the_cards_accuracy_in_one_run(
    client: TestClient, mnist_test: tuple, model_card: dict, classifier: OnnxClassifier
) -> None:
    x, y = mnist_test[0][:1000], mnist_test[1][:1000]
    before = client.get("/metrics").text
    runs_before = metric(before, "mnist_serve_batch_size_count")
    waits_before = metric(before, "mnist_serve_queue_duration_seconds_count")
    response = client.post("/v1/predict/batch", json={"items": [pixels_payload(d) for d in x]})
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert body["model"]["version"] == model_card["version"]
    predicted = [p["digit"] for p in body["predictions"]]
    # In order: identical to the model's own answers, image by image.
    direct = classifier.predict(x[..., None].astype(np.float32) / 255.0)
    assert predicted == direct.argmax(axis=1).tolist()
    np.testing.assert_allclose([p["probabilities"] for p in body["predictions"]], direct, atol=2e-6)
    assert accuracy(predicted, y) >= model_card["metrics"]["test_accuracy"] - ACCURACY_TOLERANCE
    text = client.get("/metrics").text
    # One request, queued once, computed in onnxruntime runs of at most MAX_RUN_BATCH images (what the batch-size
    # histogram records: the runs themselves, never a client's batch).
    assert metric(text, "mnist_serve_queue_duration_seconds_count") - waits_before == 1
    assert metric(text, "mnist_serve_batch_size_count") - runs_before == -(-1000 // MAX_RUN_BATCH)
    assert metric(text, "mnist_serve_batch_size_bucket", le="+Inf") == metric(
        text, "mnist_serve_batch_size_bucket", le=f"{MAX_RUN_BATCH:.1f}"
    )


def test_batch_mixes_input_forms_and_keeps_order(client: TestClient, mnist_test: tuple) -> None:
    x, y = mnist_test
    items: list[dict[str, Any]] = []
    for i in range(12):
        if i % 3 == 0:
            items.append(pixels_payload(x[i]))
        elif i % 3 == 1:
            items.append(pixels_payload(x[i], "0-1"))
        else:
            items.append({"image_base64": b64(png_bytes(dark_on_light(x[i])))})
    body = client.post("/v1/predict/batch?top_k=2", json={"items": items}).json()
    assert accuracy((p["digit"] for p in body["predictions"]), y[:12]) >= 11 / 12
    assert all(len(p["top_k"]) == 2 for p in body["predictions"])


def test_batch_upload_of_several_files(client: TestClient, mnist_test: tuple) -> None:
    x, y = mnist_test
    files = [("file", (f"{i}.png", png_bytes(dark_on_light(x[i])), "image/png")) for i in range(6)]
    response = client.post("/v1/predict/batch", files=files)
    assert response.status_code == 200, response.text
    assert accuracy((p["digit"] for p in response.json()["predictions"]), y[:6]) >= 5 / 6


@pytest.mark.parametrize(
    ("bad_item", "code"),
    [
        ({"pixels": [[0] * 27] * 28}, "invalid_input"),
        ({"pixels": [[0] * 28] * 28, "image_base64": "AAAA"}, "invalid_input"),
        ({"image_base64": b64(b"definitely not a png")}, "undecodable_image"),
        ({"image_base64": "!!!"}, "invalid_input"),
        ({"image_base64": b64(png_claiming_size(50_000, 50_000))}, "image_too_large"),
        ({"pixels": [[300] * 28] * 28}, "invalid_input"),
        ({"image_base64": b64(png_bytes(np.full((40, 40), 255, np.uint8)))}, "empty_image"),
    ],
)
def test_one_bad_batch_item_is_named_by_index(client: TestClient, bad_item: dict, code: str) -> None:
    good = {"pixels": [[0] * 28] * 28}
    items = [good, good, good, bad_item, good]
    error = error_of(client.post("/v1/predict/batch", json={"items": items}), 422)
    assert error["index"] == 3 and "items[3]" in error["message"]
    assert error["code"] == code


def test_nan_in_a_batch_item_is_named_by_index(client: TestClient) -> None:
    row = ", ".join(["0"] * 28)
    good = "[" + ", ".join([f"[{row}]"] * 28) + "]"
    bad = good.replace("[0,", "[NaN,", 1)
    body = f'{{"items": [{{"pixels": {good}}}, {{"pixels": {bad}}}]}}'
    response = client.post("/v1/predict/batch", content=body, headers={"content-type": "application/json"})
    error = error_of(response, 422)
    assert error["index"] == 1 and "finite" in error["message"]


def test_too_many_batch_items(make_client: ClientFactory) -> None:
    client = make_client(max_batch_items=4)
    items = [{"pixels": [[0] * 28] * 28}] * 5
    error = error_of(client.post("/v1/predict/batch", json={"items": items}), 413)
    assert error["code"] == "too_many_items"
    assert client.post("/v1/predict/batch", json={"items": items[:4]}).status_code == 200
    assert error_of(client.post("/v1/predict/batch", json={"items": []}), 422)


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"pixels": [[0] * 28] * 27}, "pixels"),
        ({"pixels": [[0] * 28] * 28, "scale": "0-100"}, "scale"),
        ({"pixels": [[2.0] * 28] * 28, "scale": "0-1"}, "0..1"),
        ({}, "exactly one"),
        ({"pixels": [[0] * 28] * 28, "top_k": 11}, "top_k"),
        ({"pixels": [[0] * 28] * 28, "unknown": 1}, "unknown"),
        ({"image_base64": b64(b"\x89PNG\r\n\x1a\n truncated")}, "decoded"),
    ],
)
def test_invalid_json_inputs_are_422(client: TestClient, body: dict, fragment: str) -> None:
    error = error_of(client.post("/v1/predict", json=body), 422)
    assert fragment in error["message"]
    assert "index" not in error


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_422(client: TestClient, token: str) -> None:
    body = json.dumps({"pixels": [[0] * 28] * 28}).replace("0", token, 1)
    response = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert "finite" in error_of(response, 422)["message"]


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post("/v1/predict", content=b'{"pixels": [', headers={"content-type": "application/json"})
    assert error_of(response, 422)["code"] == "invalid_input"


def test_decompression_bomb_upload_is_422(client: TestClient) -> None:
    files = {"file": ("bomb.png", png_claiming_size(30_000, 30_000), "image/png")}
    error = error_of(client.post("/v1/predict", files=files), 422)
    assert error["code"] == "image_too_large"


def test_wrong_content_types_are_415(client: TestClient) -> None:
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/xml"}, {}):
        error = error_of(client.post("/v1/predict", content=b"7", headers=headers), 415)
        assert error["code"] == "unsupported_media_type"
    error_of(client.post("/v1/predict/batch", content=b"7", headers={"content-type": "text/csv"}), 415)
    files = {"file": ("digit.txt", b"seven", "text/plain")}
    error_of(client.post("/v1/predict", files=files), 415)
    error_of(client.post("/v1/predict", data={"x": "1"}), 415)  # urlencoded forms carry no image
    wrong_field = {"image": ("digit.png", b"\x89PNG", "image/png")}
    assert "'file'" in error_of(client.post("/v1/predict", files=wrong_field), 422)["message"]


def test_bodies_over_the_limit_are_413(make_client: ClientFactory, mnist_test: tuple) -> None:
    client = make_client(max_body_bytes=4096)
    big = {"image_base64": b64(png_bytes(dark_on_light(mnist_test[0][0], size=280))) + "A" * 8192}
    # Declared by Content-Length: refused before the body is read.
    error = error_of(client.post("/v1/predict", json=big), 413)
    assert error["code"] == "payload_too_large"

    # Streamed without a length (chunked): refused once the cap is passed.
    def chunks() -> Any:
        for _ in range(10):
            yield b" " * 1024

    streamed = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert error_of(streamed, 413)["code"] == "payload_too_large"
    files = {"file": ("big.png", b"\0" * 8192, "image/png")}
    assert error_of(client.post("/v1/predict", files=files), 413)
    # A small body still works.
    assert client.post("/v1/predict", json={"pixels": [[0] * 28] * 28}).status_code == 200
    text = client.get("/metrics").text
    assert metric(text, "mnist_serve_requests_total", route="/v1/predict", method="POST", status="413") == 3


def test_overloaded_is_503_with_retry_after(make_client: ClientFactory, classifier: OnnxClassifier) -> None:
    class Gated:
        """The real model behind a gate, so requests can be held while the queue fills."""

        def __init__(self) -> None:
            self.gate, self.entered = threading.Event(), threading.Event()

        def __getattr__(self, name: str) -> Any:
            return getattr(classifier, name)

        def run(self, images: np.ndarray, wide: bool = False) -> np.ndarray:
            self.entered.set()
            self.gate.wait(10)
            return classifier.run(images, wide)

    gated = Gated()
    client = make_client(model=gated, queue_size=1, max_batch_size=1, max_wait_ms=0)
    runner = client.app.state.service.models.default.runner  # type: ignore[attr-defined]
    body = {"pixels": [[0] * 28] * 28}
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(client.post("/v1/predict", json=body).status_code))]
    threads[0].start()
    assert gated.entered.wait(5)  # the first request holds the model
    threads.append(threading.Thread(target=lambda: statuses.append(client.post("/v1/predict", json=body).status_code)))
    threads[1].start()
    deadline = time.monotonic() + 5
    while runner.queue_depth < 1:  # the second one waits in the (full) queue
        assert time.monotonic() < deadline
        time.sleep(0.01)
    refused = client.post("/v1/predict", json=body)
    assert error_of(refused, 503)["code"] == "overloaded"
    assert int(refused.headers["Retry-After"]) >= 1
    gated.gate.set()
    for thread in threads:
        thread.join(10)
    assert statuses == [200, 200]
    assert metric(client.get("/metrics").text, "mnist_serve_overloaded_total") == 1


def test_unknown_routes_and_methods_use_the_error_shape(make_client: ClientFactory, tmp_path: Any) -> None:
    client = make_client(web_dir=tmp_path)  # no index.html there: no page mounted at /
    assert error_of(client.get("/v1/nope"), 404)["code"] == "not_found"
    assert error_of(client.get("/"), 404)["code"] == "not_found"
    assert error_of(client.get("/v1/predict"), 405)["code"] == "method_not_allowed"


# --- API key ---------------------------------------------------------------------------------------------


def test_api_key_guards_predict_only(make_client: ClientFactory) -> None:
    key = "s3cret-key-for-tests-0123456789"
    client = make_client(api_key=key)
    body = {"pixels": [[0] * 28] * 28}
    missing = client.post("/v1/predict", json=body)
    assert error_of(missing, 401)["code"] == "unauthorized"
    assert "WWW-Authenticate" in missing.headers
    error_of(client.post("/v1/predict", json=body, headers={"X-API-Key": "wrong" * 5}), 401)
    error_of(client.post("/v1/predict/batch", json={"items": [body]}), 401)
    error_of(client.post("/v1/predict", json=body, headers={"Authorization": f"Basic {key}"}), 401)
    assert client.post("/v1/predict", json=body, headers={"X-API-Key": key}).status_code == 200
    assert client.post("/v1/predict", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    batch = client.post("/v1/predict/batch", json={"items": [body]}, headers={"X-API-Key": key})
    assert batch.status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):
        assert client.get(path).status_code == 200, path


def test_without_a_key_no_credentials_are_needed(client: TestClient) -> None:
    body = {"pixels": [[0] * 28] * 28}
    assert client.post("/v1/predict", json=body, headers={"X-API-Key": "anything"}).status_code == 200


# --- metrics, docs, web hook -----------------------------------------------------------------------------


def test_metrics_content(client: TestClient, mnist_test: tuple, model_card: dict) -> None:
    for i in range(3):
        client.post("/v1/predict", json=pixels_payload(mnist_test[0][i]))
    client.post("/v1/predict", json={"pixels": []})
    client.get("/no/such/path/12345")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "mnist_serve_requests_total", route="/v1/predict", method="POST", status="200") == 3
    assert metric(text, "mnist_serve_requests_total", route="/v1/predict", method="POST", status="422") == 1
    assert metric(text, "mnist_serve_requests_total", route="unmatched", method="GET", status="404") == 1
    assert "/no/such/path" not in text  # raw paths never become label values
    assert metric(text, "mnist_serve_request_duration_seconds_count", route="/v1/predict", method="POST") == 4
    assert metric(text, "mnist_serve_inference_duration_seconds_count") == 3
    assert metric(text, "mnist_serve_batch_size_sum") == 3
    served = {"model": model_card["name"], "version": model_card["version"]}
    assert metric(text, "mnist_serve_queue_depth", **served) == 0
    assert metric(text, "mnist_serve_inference_requests_total", **served, outcome="answered") == 3
    assert metric(text, "mnist_serve_inference_images_total", **served) == 3
    assert metric(text, "mnist_serve_queue_duration_seconds_count", **served) == 3
    assert metric(text, "mnist_serve_predictions_total", **served) == 3
    assert metric(text, "mnist_serve_prediction_confidence_count", **served) == 3
    info = [line for line in text.splitlines() if line.startswith("mnist_serve_model_info{")]
    assert len(info) == 1 and info[0].endswith(" 1.0") and 'default="true"' in info[0]
    for value in (model_card["name"], model_card["version"], model_card["onnx"]["sha256"]):
        assert f'"{value}"' in info[0]
    assert metric(text, "mnist_serve_model_ready") == 1


def test_each_app_has_its_own_registry(make_client: ClientFactory) -> None:
    first, second = make_client(), make_client()
    first.get("/healthz")
    assert (
        metric(second.get("/metrics").text, "mnist_serve_requests_total", route="/healthz", method="GET", status="200")
        == 0
    )


def test_openapi_documents_both_bodies_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, schema in (("/v1/predict", "PredictRequest"), ("/v1/predict/batch", "BatchRequest")):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert content["application/json"]["schema"]["$ref"] == f"#/components/schemas/{schema}"
        assert "file" in content["multipart/form-data"]["schema"]["properties"]
        assert spec["components"]["schemas"][schema]["examples"]
    example = spec["components"]["schemas"]["PredictRequest"]["examples"][0]
    assert client.post("/v1/predict", json=example).json()["digit"] == 7  # the documented example is a real 7
    assert "422" in spec["paths"]["/v1/predict"]["post"]["responses"]
    assert client.get("/docs").status_code == 200


def test_web_page_hook_serves_static_files_after_the_api(make_client: ClientFactory, tmp_path: Any) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>digits</title>")
    client = make_client(web_dir=tmp_path)
    page = client.get("/")
    assert page.status_code == 200 and "digits" in page.text
    assert client.get("/healthz").json() == {"status": "ok"}  # API routes still win
    assert client.get("/v1/models").status_code == 200
    assert error_of(client.get("/v1/nope.js"), 404)["code"] == "not_found"


def test_the_web_page_does_not_hide_the_api_methods(make_client: ClientFactory) -> None:
    """With the page mounted at /, a GET on a POST route answered 404 and a PUT a 405 claiming Allow: GET, HEAD."""
    client = make_client(web_dir=None)  # the bundled page
    assert client.get("/").status_code == 200 and "text/html" in client.get("/").headers["content-type"]
    for method in ("GET", "PUT", "DELETE"):
        response = client.request(method, "/v1/predict")
        assert response.status_code == 405, (method, response.text)
        assert response.headers["allow"] == "POST" and response.json()["error"]["code"] == "method_not_allowed"
    assert client.get("/v2/models/mnist-cnn/infer").status_code == 405
    assert client.get("/app.js").status_code == 200
    assert client.get("/no-such-file.js").status_code == 404


def test_compressed_bodies_are_415_not_invalid_json(client: TestClient) -> None:
    import gzip
    import json as _json

    body = gzip.compress(_json.dumps({"pixels": [[0] * 28] * 28}).encode())
    for path in ("/v1/predict", "/v1/predict/batch"):
        response = client.post(
            path, content=body, headers={"content-type": "application/json", "content-encoding": "gzip"}
        )
        assert error_of(response, 415)["code"] == "unsupported_encoding", path
    v2 = client.post(
        "/v2/models/mnist-cnn/infer",
        content=body,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert v2.status_code == 415 and "Content-Encoding" in v2.json()["error"]


def test_the_json_fast_path_answers_like_the_route(client: TestClient) -> None:
    """Odd queries and repeated headers: the fast path (JSON /v1/predict) must answer exactly what the route does."""
    body = {"pixels": [[0] * 28] * 28}
    assert client.post("/v1/predict?top_k=%C2%B2", json=body).status_code == 422  # a Unicode digit, not a 500
    assert client.post("/v1/predict?top_k=%D9%A3", json=body).status_code == 422
    headers = [("content-type", "application/json"), ("content-encoding", "gzip"), ("content-encoding", "identity")]
    repeated = client.post("/v1/predict", content=json.dumps(body), headers=headers)
    assert error_of(repeated, 415)["code"] == "unsupported_encoding"  # the first value counts, as in the route


def test_a_repeated_api_key_header_counts_its_first_value(make_client: ClientFactory) -> None:
    key = "s3cret-key-for-tests-0123456789"
    client = make_client(api_key=key)
    body = json.dumps({"pixels": [[0] * 28] * 28})
    headers = [("content-type", "application/json"), ("x-api-key", "wrong" * 5), ("x-api-key", key)]
    assert error_of(client.post("/v1/predict", content=body, headers=headers), 401)["code"] == "unauthorized"
