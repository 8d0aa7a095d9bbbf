"""The Makefile: every target says what it does in `make help`, and `make run` listens where it is told.

pytest tests/deploy/test_makefile.py
"""

from __future__ import annotations

import os
import re

import pytest
from deploy_helpers import ROOT, require_tool, run

MAKEFILE = ROOT / "Makefile"


def phony_targets() -> list[str]:
    line = re.search(r"^\.PHONY:(.*)$", MAKEFILE.read_text(), re.MULTILINE)
    assert line
    return line.group(1).split()


def make(*args: str, **env: str) -> str:
    tool = require_tool("make", hint="GNU make")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_SERVE_") and k not in ("HOST", "PORT")}
    result = run([tool, "--no-print-directory", *args], cwd=ROOT, env=clean | env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_help_lists_every_target_with_one_line() -> None:
    listed = {line.split()[0]: line for line in make("help").splitlines() if line.startswith("  ") and line.split()}
    for target in phony_targets():
        assert target in listed, f"`make help` does not list {target}: give it a `## {target}: ...` line"
        assert len(listed[target].split()) > 2, f"{target} has no description"


@pytest.mark.parametrize(
    ("args", "env", "host", "port"),
    [
        ([], {}, "127.0.0.1", "8000"),
        ([], {"MNIST_SERVE_PORT": "9000", "MNIST_SERVE_HOST": "0.0.0.0"}, "0.0.0.0", "9000"),
        (["PORT=9001", "HOST=::1"], {}, "::1", "9001"),
        (["PORT=9002"], {"MNIST_SERVE_PORT": "9000"}, "127.0.0.1", "9002"),  # the command line wins
        ([], {"PORT": "7", "HOST": "somewhere"}, "127.0.0.1", "8000"),  # generic shell variables do not leak in
    ],
)
def test_run_listens_where_it_is_told(args: list[str], env: dict[str, str], host: str, port: str) -> None:
    # -n prints the commands without running them (nor the installs they depend on).
    command = make("-n", "run", *args, **env).strip().splitlines()[-1]
    assert command.endswith("mnist-serve")
    assert f"MNIST_SERVE_HOST={host} " in command and f"MNIST_SERVE_PORT={port} " in command
