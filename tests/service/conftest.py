"""Shared fixtures for the service tests: the committed model and its card, in-process clients, live servers.

- ``classifier``: the committed ONNX model, loaded once per session.
- ``model_card``: models/mnist-cnn.json as a dict (never hard-code accuracy: read it from here).
- ``make_client(**settings)``: a started TestClient (lifespan run) on a fresh app; ``client``: the default one.
- ``live_server(env=..., cwd=...)``: uvicorn in a subprocess on a free port (and gRPC on another), ready to serve;
  stopped at teardown.
- ``mnist_test`` (from tests/conftest.py): the real MNIST test images and labels.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

with warnings.catch_warnings():
    # Starlette nudges towards httpx2 for its test client; httpx (what the project pins) still works.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

from service.main import create_app
from service.model import OnnxClassifier, load_model
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
# Lets test modules here `import service_helpers` (this folder is not a package: it would shadow `service`).
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))
MODEL_DIR = ROOT / "models"
MODEL_NAME = "mnist-cnn"


@pytest.fixture(autouse=True)
def _no_service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own MNIST_SERVE_* variables must not change what the tests see."""
    for name in list(os.environ):
        if name.startswith("MNIST_SERVE_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def model_card() -> dict[str, Any]:
    return json.loads((MODEL_DIR / f"{MODEL_NAME}.json").read_text())


@pytest.fixture(scope="session")
def classifier() -> OnnxClassifier:
    return load_model(MODEL_DIR, MODEL_NAME)


def make_settings(**overrides: Any) -> Settings:
    """Settings for tests: the committed model by absolute path, no web page unless asked for."""
    # No gRPC server in the test process unless a test asks for one (a port of its own, then).
    values: dict[str, Any] = {"model_dir": MODEL_DIR, "model_name": MODEL_NAME, "access_log": False, "grpc_port": 0}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_client(classifier: OnnxClassifier) -> Iterator[Callable[..., TestClient]]:
    """``make_client(model=..., loader=..., **settings)`` → a TestClient whose app has started.

    ``model`` defaults to the session's classifier; pass ``model=None`` (with a ``loader``) to load at startup.
    """
    opened: list[TestClient] = []
    default = object()

    def factory(*, model: Any = default, loader: Any = None, **overrides: Any) -> TestClient:
        kwargs: dict[str, Any] = {}
        if loader is not None:
            kwargs["loader"] = loader
        served = classifier if model is default else model
        client = TestClient(create_app(make_settings(**overrides), served, **kwargs), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        return client

    yield factory
    for client in reversed(opened):
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    """A ``python -m service`` process (what ``mnist-serve`` runs) listening on 127.0.0.1:port."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_port(self) -> int:
        """Where its gRPC server listens (0: off)."""
        return int(self.env.get("MNIST_SERVE_GRPC_PORT", "0"))

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout_s)


def spawn_server(log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> LiveServer:
    """Start ``python -m service`` on a free port, gRPC on another (the caller's MNIST_SERVE_* variables removed,
    ``env`` added), its output in ``log_path``; not yet waited for."""
    port = free_port()
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_SERVE_")}
    server_env.update(
        {
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "MNIST_SERVE_PORT": str(port),
            # Never the shared default (8081): servers of parallel tests would share it through SO_REUSEPORT.
            "MNIST_SERVE_GRPC_PORT": str(free_port()),
            "MNIST_SERVE_ACCESS_LOG": "false",
            # One worker unless a test asks for more (tests/service/test_server.py): batching, queue-depth and
            # reload tests look at one process's batcher.
            "MNIST_SERVE_WORKERS": "1",
        }
    )
    server_env.update(env or {})
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=cwd or ROOT,
            env=server_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return LiveServer(process=process, port=port, log_path=log_path, env=server_env)


@pytest.fixture
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LiveServer]]:
    """``live_server(env={...}, cwd=None, wait=True)`` → a started LiveServer; all are stopped at teardown."""
    started: list[LiveServer] = []

    def start(env: dict[str, str] | None = None, cwd: Path | None = None, wait: bool = True) -> LiveServer:
        server = spawn_server(tmp_path_factory.mktemp("live-server") / "server.log", env, cwd)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)


# ---------------------------------------------------------------------------------------------------------
# Web page tests (tests/service/test_web.py) — added by the web-page work; reuses LiveServer and free_port.
# A browser session's tests all talk to one server, so this one lives for the whole module (``live_server``
# above is per test). Its log goes to test-artifacts/web/ next to the screenshots.


@pytest.fixture(scope="module")
def module_live_server() -> Iterator[LiveServer]:
    """One ``python -m service`` serving the committed model, ready, for every test of the module."""
    log_dir = ROOT / "test-artifacts" / "web"
    log_dir.mkdir(parents=True, exist_ok=True)
    server = spawn_server(log_dir / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        if server.process.poll() is None:
            server.stop(timeout_s=15)
