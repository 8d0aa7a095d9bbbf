"""Helpers for the reliability tests: module-wide live servers and process memory.

    from reliability_helpers import running_server, rss_mb
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

_service = sys.modules["service_tests_conftest"]  # tests/service/conftest.py, loaded by this folder's conftest
ROOT: Path = _service.ROOT
LiveServer = _service.LiveServer
free_port = _service.free_port


def rss_mb(pid: int) -> float:
    """Resident memory of a process now, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@contextlib.contextmanager
def running_server(log_dir: Path, env: dict[str, str] | None = None) -> Iterator[LiveServer]:
    """``python -m service`` on a free port, ready; SIGTERM (then kill) on the way out. For module-wide servers."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_SERVE_")}
    server_env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "MNIST_SERVE_PORT": str(port)})
    server_env.update({"MNIST_SERVE_ACCESS_LOG": "false"})
    server_env.update(env or {})
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=server_env, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = LiveServer(process=process, port=port, log_path=log_path, env=server_env)
    try:
        server.wait_ready()
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
