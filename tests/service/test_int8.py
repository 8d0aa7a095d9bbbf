"""The shipped int8 model (models/mnist-cnn-int8.*) served as the default model through MNIST_SERVE_MODEL_NAME."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from conftest import MODEL_DIR
from fastapi.testclient import TestClient
from service_helpers import accuracy, pixels_payload

INT8 = "mnist-cnn-int8"
pytestmark = pytest.mark.skipif(not (MODEL_DIR / f"{INT8}.onnx").exists(), reason="no int8 model shipped")


def test_int8_answers_at_its_cards_accuracy(make_client: Callable[..., TestClient], mnist_test: tuple) -> None:
    card = json.loads((MODEL_DIR / f"{INT8}.json").read_text())
    client = make_client(model=None, model_name=INT8)  # loaded from the model directory like in production
    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").text
        time.sleep(0.05)
    assert client.get("/readyz").json()["model"] == {"name": INT8, "version": card["version"]}
    x, y = mnist_test[0][:1000], mnist_test[1][:1000]
    response = client.post("/v1/predict/batch", json={"items": [pixels_payload(d) for d in x]})
    assert response.status_code == 200 and response.json()["model"]["name"] == INT8
    assert accuracy((p["digit"] for p in response.json()["predictions"]), y) >= card["metrics"]["test_accuracy"] - 0.005
