"""Faults over real HTTP: overload, clients that go away, SIGTERM with a backlog of real inference, form limits.

    pytest tests/reliability/test_faults.py

The service tests already drain SIGTERM with requests held in a one-second batching window
(tests/service/test_live.py::test_sigterm_drains_in_flight_requests_and_exits_zero); here the backlog is real
model work queued behind a busy model, with the shipped settings.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
from fastapi.testclient import TestClient
from service_helpers import accuracy, metric, pixels_payload, png_bytes

StartServer = Callable[..., Any]


def batch_body(x: np.ndarray) -> dict[str, Any]:
    return {"items": [pixels_payload(d) for d in x]}


async def post_all(url: str, path: str, bodies: list[dict[str, Any]], timeout_s: float) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        return list(await asyncio.gather(*(http.post(path, json=body) for body in bodies)))


def test_a_full_queue_answers_503_with_retry_after_and_never_hangs(live_server: StartServer, mnist_test: tuple) -> None:
    server = live_server(env={"MNIST_SERVE_QUEUE_SIZE": "2"})
    x, y = mnist_test
    bodies = [batch_body(x[i * 400 : (i + 1) * 400]) for i in range(20)]  # ~0.1 s of model time each
    started = time.monotonic()
    responses = asyncio.run(post_all(server.url, "/v1/predict/batch", bodies, timeout_s=60))
    assert time.monotonic() - started < 60
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    for index, response in enumerate(responses):
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "overloaded"
            assert int(response.headers["Retry-After"]) >= 1
        else:  # the admitted ones are answered in full, in order
            digits = [p["digit"] for p in response.json()["predictions"]]
            assert accuracy(digits, y[index * 400 : (index + 1) * 400]) > 0.98
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert metric(text, "mnist_serve_overloaded_total") == statuses.count(503)
    # Overload passes: the next request is served.
    assert httpx.post(f"{server.url}/v1/predict", json=pixels_payload(x[0]), timeout=10).json()["digit"] == y[0]
    assert server.stop() == 0


def _half_request(port: int, body: bytes, declared: int) -> None:
    """Send a request whose Content-Length says ``declared`` bytes with ``body``, then hang up."""
    head = f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)


def test_clients_that_go_away_leave_no_traceback(live_server: StartServer, mnist_test: tuple) -> None:
    server = live_server()
    full = httpx.Request("POST", "http://x/", json=pixels_payload(mnist_test[0][0])).content
    for _ in range(3):
        _half_request(server.port, full[: len(full) // 2], len(full))  # hangs up halfway through the body
        _half_request(server.port, full, len(full))  # hangs up before its answer

    def gone() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        return metric(text, "mnist_serve_requests_total", route="/v1/predict", method="POST", status="499")

    deadline = time.monotonic() + 10
    while gone() < 3:  # the three that hung up mid-body
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert httpx.post(f"{server.url}/v1/predict", json=pixels_payload(mnist_test[0][1]), timeout=10).status_code == 200
    assert server.stop() == 0
    assert "Traceback" not in server.log(), server.log()


def test_sigterm_with_real_inference_queued_answers_every_request(live_server: StartServer, mnist_test: tuple) -> None:
    # The shipped settings (no batching window holds anything back), but a queue-wait budget long enough to admit
    # all ten: several seconds of model time queued behind a busy model.
    # One onnxruntime thread, so that the model stays the bottleneck while the bodies are parsed.
    env = {"MNIST_SERVE_MAX_QUEUE_WAIT_MS": "120000", "MNIST_SERVE_MAX_QUEUE_IMAGES": "20000"}
    env["MNIST_SERVE_SHUTDOWN_TIMEOUT_S"] = "120"  # completeness is the point here, however slow the machine
    server = live_server(env={**env, "MNIST_SERVE_LARGE_REQUEST_THREADS": "1"})
    x, y = mnist_test
    count, size = 10, 1000

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            requests = [
                asyncio.ensure_future(http.post("/v1/predict/batch", json=batch_body(x[:size]))) for _ in range(count)
            ]
            deadline = time.monotonic() + 30
            while metric((await http.get("/metrics")).text, "mnist_serve_queue_depth") < 3:
                assert time.monotonic() < deadline, "the requests never queued up"
                await asyncio.sleep(0.01)
            server.process.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*requests))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * count, [
        r.text[:200] for r in responses if r.status_code != 200
    ]
    for response in responses:
        assert accuracy((p["digit"] for p in response.json()["predictions"]), y[:size]) > 0.98
    assert server.process.wait(timeout=30) == 0, server.log()
    log = server.log()
    assert "drained the inference queue" in log and "Traceback" not in log


def test_multipart_bodies_over_the_form_limits(make_client: Callable[..., TestClient], mnist_test: tuple) -> None:
    client = make_client(max_batch_items=2)
    png = png_bytes(mnist_test[0][0])
    three = [("file", (f"{i}.png", png, "image/png")) for i in range(3)]
    too_many = client.post("/v1/predict/batch", files=three)
    assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "too_many_items"
    two = client.post("/v1/predict", files=three[:2])
    assert two.status_code == 422 and "one image" in two.json()["error"]["message"]
    fields = {f"field{i}": "x" for i in range(20)}
    crowded = client.post("/v1/predict", files=three[:1], data=fields)
    assert crowded.status_code == 422 and crowded.json()["error"]["code"] == "invalid_input"
    assert client.post("/v1/predict/batch", files=three[:2]).status_code == 200
