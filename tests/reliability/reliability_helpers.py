"""Helpers for the reliability tests: module-wide live servers and process memory.

from reliability_helpers import running_server, rss_mb
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

_service = sys.modules["service_tests_conftest"]  # tests/service/conftest.py, loaded by this folder's conftest
ROOT: Path = _service.ROOT
LiveServer = _service.LiveServer
spawn_server = _service.spawn_server


def rss_mb(pid: int) -> float:
    """Resident memory of a process now, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@contextlib.contextmanager
def running_server(log_dir: Path, env: dict[str, str] | None = None) -> Iterator[LiveServer]:
    """``python -m service`` on a free port, ready; SIGTERM (then kill) on the way out. For module-wide servers."""
    server = spawn_server(log_dir / "server.log", env)
    try:
        server.wait_ready()
        yield server
    finally:
        if server.process.poll() is None:
            try:
                server.stop(timeout_s=20)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(timeout=10)
