"""The service as users run it: ``python -m service`` (what ``mnist-serve`` runs) under uvicorn, over real HTTP."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from conftest import ROOT, LiveServer
from service_helpers import accuracy, b64, batches_larger_than_one, dark_on_light, metric, pixels_payload, png_bytes

StartServer = Callable[..., LiveServer]
CLIENTS = 64


def test_a_real_test_digit_from_another_directory(live_server: StartServer, mnist_test: tuple, tmp_path: Path) -> None:
    """Started outside the repository, the relative default model dir still finds the committed model."""
    server = live_server(cwd=tmp_path)
    x, y = mnist_test
    response = httpx.post(f"{server.url}/v1/predict", json=pixels_payload(x[0]), timeout=10)
    assert response.status_code == 200 and response.json()["digit"] == y[0]
    png = {"image_base64": b64(png_bytes(dark_on_light(x[1])))}
    assert httpx.post(f"{server.url}/v1/predict", json=png, timeout=10).json()["digit"] == y[1]
    assert server.stop() == 0


def test_concurrent_clients_are_micro_batched(live_server: StartServer, mnist_test: tuple) -> None:
    server = live_server()  # the shipped defaults: opportunistic batching, batches of up to 64
    x, y = mnist_test
    per_client = 4
    payloads = [pixels_payload(x[i]) for i in range(CLIENTS * per_client)]

    async def client(http: httpx.AsyncClient, worker: int) -> list[tuple[int, int, int]]:
        out = []
        for j in range(per_client):
            index = worker * per_client + j
            response = await http.post("/v1/predict", json=payloads[index])
            out.append((index, response.status_code, response.json().get("digit", -1)))
        return out

    async def run() -> list[tuple[int, int, int]]:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as http:
            results = await asyncio.gather(*(client(http, w) for w in range(CLIENTS)))
        return [r for batch in results for r in batch]

    results = asyncio.run(run())
    assert all(status == 200 for _, status, _ in results)
    order = sorted(results)
    assert accuracy((digit for _, _, digit in order), y[: len(order)]) > 0.97  # each client got its own answer
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert metric(text, "mnist_serve_batch_size_sum") == CLIENTS * per_client
    runs = metric(text, "mnist_serve_batch_size_count")
    assert batches_larger_than_one(text) > 0, text
    assert runs < CLIENTS * per_client  # fewer model runs than requests
    assert metric(text, "mnist_serve_requests_total", route="/v1/predict", method="POST", status="200") == len(results)
    assert server.stop() == 0


def test_sigterm_drains_in_flight_requests_and_exits_zero(live_server: StartServer, mnist_test: tuple) -> None:
    # A one-second gathering window keeps requests waiting inside the batcher when the signal arrives.
    server = live_server(env={"MNIST_SERVE_MAX_WAIT_MS": "1000", "MNIST_SERVE_MAX_BATCH_SIZE": "1024"})
    x, y = mnist_test
    in_flight = 16

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            requests = [
                asyncio.ensure_future(http.post("/v1/predict", json=pixels_payload(x[i]))) for i in range(in_flight)
            ]
            deadline = time.monotonic() + 10
            while metric((await http.get("/metrics")).text, "mnist_serve_queue_depth") < in_flight:
                assert time.monotonic() < deadline, "requests never queued"
                await asyncio.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*requests))

    started = time.monotonic()
    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * in_flight
    assert accuracy((r.json()["digit"] for r in responses), y[:in_flight]) >= 15 / 16
    assert server.process.wait(timeout=20) == 0, server.log()
    assert time.monotonic() - started < 15
    log = server.log()
    assert "drained the inference queue" in log and "Traceback" not in log


def test_console_script_refuses_to_start_without_a_model(tmp_path: Path) -> None:
    env = {"MNIST_SERVE_MODEL_DIR": str(tmp_path), "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "model files not found" in done.stderr


def test_batch_over_real_http_keeps_order(live_server: StartServer, mnist_test: tuple) -> None:
    server = live_server()
    x, y = mnist_test
    items = [pixels_payload(x[i]) for i in range(200)]
    response = httpx.post(f"{server.url}/v1/predict/batch", json={"items": items}, timeout=30)
    predicted = np.array([p["digit"] for p in response.json()["predictions"]])
    assert accuracy(predicted, y[:200]) > 0.97
    assert server.stop() == 0
