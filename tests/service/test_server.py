"""The HTTP server around the app: connection limits, and several workers behind one port (service/server.py).

Every test talks to a real `python -m service` over real sockets on loopback, with limits set small so that each
one is reached in a second or two.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from conftest import LiveServer
from service_helpers import connect, metric, pixels_payload, read_all

StartServer = Callable[..., LiveServer]
KEY = "server-test-key-0123456789abcdef"


def _connect(server: LiveServer) -> socket.socket:
    return connect(server.port)


def _ready_in(server: LiveServer, seconds: float) -> bool:
    started = time.monotonic()
    response = httpx.get(f"{server.url}/readyz", timeout=seconds)
    return response.status_code == 200 and time.monotonic() - started < seconds


# --- connection limits ----------------------------------------------------------------------------------------


def test_oversized_headers_are_431_and_never_buffered(live_server: StartServer) -> None:
    server = live_server(env={"MNIST_SERVE_MAX_HEADER_BYTES": "8192"})
    for size in (20_000, 1_000_000):
        with _connect(server) as sock:
            head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
            try:
                sock.sendall(head)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed as soon as the limit was passed, while the rest was still being sent
            answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
        assert b"request_header_fields_too_large" in answer
    # Ordinary headers still pass.
    assert httpx.get(f"{server.url}/healthz", headers={"X-Fine": "a" * 2000}).status_code == 200
    assert _closed(server, "headers_too_large") == 2  # counted, though no request reached the app


def _closed(server: LiveServer, reason: str) -> float:
    return metric(httpx.get(f"{server.url}/metrics").text, "mnist_serve_connections_closed_total", reason=reason)


def test_silent_and_slow_header_connections_are_closed(live_server: StartServer) -> None:
    server = live_server(env={"MNIST_SERVE_HEADER_TIMEOUT_S": "1"})
    with _connect(server) as silent, _connect(server) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # …and never the blank line
        started = time.monotonic()
        assert read_all(silent, 5) == b""  # closed without a word: it never started a request
        assert time.monotonic() - started < 3
        answer = read_all(slow, 5)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert _closed(server, "header_timeout") == 1 and _closed(server, "idle_timeout") >= 1


def test_a_body_trickling_in_is_timed_out_with_408(live_server: StartServer, mnist_test: tuple) -> None:
    server = live_server(env={"MNIST_SERVE_BODY_TIMEOUT_S": "1"})
    with _connect(server) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"
        )
        started = time.monotonic()
        answer = b""
        sock.settimeout(0.2)
        while time.monotonic() - started < 5 and not answer:
            try:
                sock.sendall(b" ")  # one byte every 0.2 s: alive, but never done
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 0.8 < took < 3
    body = pixels_payload(mnist_test[0][0])
    assert httpx.post(f"{server.url}/v1/predict", json=body).json()["digit"] == mnist_test[1][0]
    assert _closed(server, "body_timeout") == 1


def test_the_connection_cap_closes_idle_ones_and_probes_still_answer(live_server: StartServer) -> None:
    server = live_server(env={"MNIST_SERVE_MAX_CONNECTIONS": "16", "MNIST_SERVE_HEADER_TIMEOUT_S": "60"})
    idle = [_connect(server) for _ in range(60)]
    try:
        time.sleep(0.3)
        for _ in range(5):
            assert _ready_in(server, 2.0)
        closed = 0
        for sock in idle:
            sock.setblocking(False)
            try:
                closed += sock.recv(1) == b""
            except BlockingIOError:
                pass
        assert closed >= 60 - 16, f"only {closed} of 60 idle connections were closed"
        assert _closed(server, "evicted") >= closed
    finally:
        for sock in idle:
            sock.close()


# --- several workers -----------------------------------------------------------------------------------------


def test_two_workers_share_the_port_reload_together_and_stop_cleanly(
    live_server: StartServer, mnist_test: tuple
) -> None:
    server = live_server(env={"MNIST_SERVE_WORKERS": "2", "MNIST_SERVE_API_KEY": KEY})
    x, y = mnist_test
    auth = {"X-API-Key": KEY}

    async def load() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=auth) as http:
            requests = [http.post("/v1/predict", json=pixels_payload(x[i % 50])) for i in range(200)]
            return [r.json()["digit"] for r in await asyncio.gather(*requests)]

    digits = asyncio.run(load())
    assert sum(d == y[i % 50] for i, d in enumerate(digits)) >= 196
    text = httpx.get(f"{server.url}/metrics").text
    # One /metrics for the whole server: the two workers' counts add up, whichever worker answered the scrape.
    assert metric(text, "mnist_serve_inference_requests_total", outcome="answered") == 200
    assert metric(text, "mnist_serve_model_ready", model="mnist-cnn") == 1

    reload = httpx.post(f"{server.url}/v1/admin/reload", headers=auth, timeout=60)
    assert reload.status_code == 200, reload.text
    deadline = time.monotonic() + 30
    while server.log().count("drained the previous model set") < 2:  # every worker reloaded, not only one
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    server.process.send_signal(signal.SIGHUP)
    while server.log().count("drained the previous model set") < 4:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    assert server.stop() == 0
    assert server.log().count("drained the inference queue") == 2 and "Traceback" not in server.log()


def test_workers_do_not_outlive_a_killed_supervisor(live_server: StartServer) -> None:
    server = live_server(env={"MNIST_SERVE_WORKERS": "2"})
    workers = [int(p) for p in os.popen(f"pgrep -P {server.process.pid}").read().split()]
    assert len(workers) >= 2
    server.process.kill()  # SIGKILL: the supervisor forwards nothing
    server.process.wait(10)
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in workers):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.1)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=2)


def _smaps(pid: int) -> dict[str, int]:
    """The process's memory totals from /proc/<pid>/smaps_rollup, in kB."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        return {line.split(":")[0]: int(line.split()[1]) for line in rollup if line.rstrip().endswith("kB")}


def test_workers_start_from_the_supervisors_imports_and_share_them(live_server: StartServer) -> None:
    """The workers are forked from a supervisor that imported the app once: the pages of those imports (FastAPI,
    numpy, onnxruntime...) are shared, not one private copy per worker."""
    server = live_server(env={"MNIST_SERVE_WORKERS": "2"})
    workers = [int(p) for p in os.popen(f"pgrep -P {server.process.pid}").read().split()]
    assert len(workers) == 2
    if "Pss_Anon" not in _smaps(workers[0]):
        pytest.skip("this kernel's smaps_rollup has no Pss_Anon")
    for pid in workers:
        memory = _smaps(pid)
        shared_anonymous = 2 * (memory["Anonymous"] - memory["Pss_Anon"])  # shared with one other process, or more
        assert shared_anonymous >= 20_000, f"worker {pid} shares only {shared_anonymous} kB of its heap: {memory}"
    with open(f"/proc/{server.process.pid}/maps") as maps:
        assert "onnxruntime" in maps.read()  # imported by the supervisor, before the fork
    assert _ready_in(server, 5)
    assert server.stop() == 0


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def test_a_drain_that_runs_out_of_time_answers_503_not_500(live_server: StartServer, mnist_test: tuple) -> None:
    """Requests still waiting for the model when the drain time is up get 503 (never uvicorn's cancellation, a 500)."""
    env = {
        "MNIST_SERVE_SHUTDOWN_TIMEOUT_S": "1",
        "MNIST_SERVE_LARGE_REQUEST_THREADS": "1",
        "MNIST_SERVE_MAX_QUEUE_WAIT_MS": "600000",
        "MNIST_SERVE_MAX_QUEUE_IMAGES": "100000",
    }
    server = live_server(env=env)
    body = {"items": [pixels_payload(d) for d in mnist_test[0][:1000]]}

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            requests = [asyncio.ensure_future(http.post("/v1/predict/batch", json=body)) for _ in range(12)]
            deadline = time.monotonic() + 30
            while metric((await http.get("/metrics")).text, "mnist_serve_queue_depth") < 3:
                assert time.monotonic() < deadline, "the requests never queued up"
                await asyncio.sleep(0.01)
            server.process.send_signal(signal.SIGTERM)
            return [r.status_code for r in await asyncio.gather(*requests)]

    statuses = asyncio.run(run())
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    assert server.process.wait(timeout=30) == 0
    assert "Traceback" not in server.log() and "drain ran out of time" in server.log()


def test_slow_bodies_hold_only_what_they_sent_of_the_body_budget(live_server: StartServer, mnist_test: tuple) -> None:
    """Four clients promising 16 MB and sending a byte used to take the whole 64 MiB budget: every POST got 503."""
    server = live_server(env={"MNIST_SERVE_MAX_INFLIGHT_BODY_BYTES": str(200_000)})
    with stalled_posts(server.port, 4, b"Content-Length: 16000000\r\n\r\n{"):
        time.sleep(0.3)
        answer = httpx.post(f"{server.url}/v1/predict", json=pixels_payload(mnist_test[0][0]), timeout=10)
        assert answer.status_code == 200 and answer.json()["digit"] == mnist_test[1][0]
        # Bodies that really hold the budget: past it, 503 with Retry-After, read by a client still sending.
        big = json.dumps({"items": [pixels_payload(d) for d in mnist_test[0][:120]]}).encode()  # ~320 KB
        refused = httpx.post(
            f"{server.url}/v1/predict/batch", content=big, headers={"content-type": "application/json"}, timeout=10
        )
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "too_many_bytes"
        assert refused.headers["Retry-After"]


def test_bodies_stalled_at_the_connection_cap_make_way_for_a_probe(live_server: StartServer) -> None:
    """Connections whose bodies stall are not idle, but when every slot is taken the most stalled one goes (408)."""
    server = live_server(env={"MNIST_SERVE_MAX_CONNECTIONS": "8"})
    with stalled_posts(server.port, 8, b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n") as stalled:
        time.sleep(0.3)
        for _ in range(3):
            assert _ready_in(server, 2.0)
        assert read_all(stalled[0], 5).startswith(b"HTTP/1.1 408")  # the longest stalled made way


@contextmanager
def stalled_posts(port: int, count: int, rest_of_head: bytes) -> Iterator[list[socket.socket]]:
    """``count`` connections that sent a POST /v1/predict's head (ending with ``rest_of_head``, which may start
    the body) and then nothing more; closed on the way out."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = connect(port)
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            sock.sendall(rest_of_head)
            sockets.append(sock)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def test_sighup_while_the_workers_start_reloads_instead_of_killing_them(live_server: StartServer) -> None:
    server = live_server(env={"MNIST_SERVE_WORKERS": "2"}, wait=False)
    time.sleep(1.0)  # the workers are importing and loading: the app's own SIGHUP handler is not there yet
    server.process.send_signal(signal.SIGHUP)
    server.wait_ready()
    deadline = time.monotonic() + 30
    while server.log().count("reloaded: now serving") < 2:  # each worker reloads once it serves
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    assert "starting another" not in server.log()
    assert server.stop() == 0


def test_a_worker_that_cannot_start_stops_the_server_instead_of_looping(live_server: StartServer) -> None:
    import socket as sockets

    with sockets.socket() as taken:  # the gRPC port is taken: no worker can start
        taken.setsockopt(sockets.SOL_SOCKET, sockets.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {"MNIST_SERVE_WORKERS": "2", "MNIST_SERVE_GRPC_PORT": str(taken.getsockname()[1])}
        server = live_server(env=env, wait=False)
        assert server.process.wait(timeout=60) == 1
    assert "giving up" in server.log()
