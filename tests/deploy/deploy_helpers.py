"""Helpers for the deployment tests: where the files are, how to find a tool, how to run one.

Importable from any test module in tests/deploy as ``from deploy_helpers import ...``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
K8S_DIR = ROOT / "k8s"
#: The example overlay: the base plus the components in k8s/components (outside k8s/: kustomize refuses an overlay
#: inside its own base).
K8S_EXAMPLE_OVERLAY = ROOT / "deploy" / "kustomize" / "example"
KSERVE_DIR = K8S_DIR / "kserve"
DOCS = ROOT / "docs" / "deployment.md"
CHECKOV_VENV = ROOT / ".venv-checkov"


def find_tool(name: str, *extra: Path) -> str | None:
    """The executable `name`: next to this interpreter (the venv's scripts), then in `extra`, then on PATH."""
    for candidate in (Path(sys.executable).parent / name, *extra):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def require_tool(name: str, *extra: Path, hint: str) -> str:
    """Like find_tool, but skips the test (with the reason) when the tool is missing."""
    tool = find_tool(name, *extra)
    if tool is None:
        pytest.skip(f"{name} not found ({hint})")
    return tool


def run(cmd: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; never raises on a non-zero exit."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def setting_names() -> set[str]:
    """Every MNIST_SERVE_* variable the service reads."""
    return set(ordered_setting_names())


def ordered_setting_names() -> list[str]:
    """Every MNIST_SERVE_* variable the service reads, in the order `mnist-serve --help` lists them."""
    from service.settings import ENV_PREFIX, Settings

    return [f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields]


def validate_settings(env: dict[str, str]) -> None:
    """Raise unless the service would accept these MNIST_SERVE_* values."""
    from service.settings import ENV_PREFIX, Settings

    Settings.model_validate({key.removeprefix(ENV_PREFIX).lower(): value for key, value in env.items()})


def default_of(name: str) -> str:
    """A setting's default as `mnist-serve --help` (and the README's table) shows it: ``unset`` for none."""
    from service.settings import ENV_PREFIX, Settings

    default = Settings.model_fields[name.removeprefix(ENV_PREFIX).lower()].default
    if default is None:
        return "unset"
    return str(default).lower() if isinstance(default, bool) else str(default)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def image_env() -> dict[str, str]:
    """The variables the final stage's ENV instructions set (``KEY=value`` pairs)."""
    steps = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    pairs = (pair for keyword, args in steps[last_from:] if keyword == "ENV" for pair in args.split())
    return dict(pair.split("=", 1) for pair in pairs)


# --- sizing: the memory a worker count needs (docs/deployment.md, Sizing) ------------------------------------------

#: One worker's memory at worst, in MB: models at rest (~125 MB) plus every per-worker budget full (docs/limits.md,
#: "Memory, worst case per worker"); the adversarial suite measured 236 MB at most.
WORKER_PEAK_MB = 340
#: One worker at rest: Python, FastAPI, onnxruntime and the shipped models loaded and warmed up.
WORKER_REST_MB = 125
#: The supervisor that runs when there is more than one worker (it imports neither FastAPI nor onnxruntime).
SUPERVISOR_MB = 40

_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def kubernetes_bytes(quantity: str) -> float:
    """A Kubernetes memory quantity (``512Mi``, ``768M``, ``1Gi``) in bytes."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity))
    assert match, f"not a memory quantity: {quantity!r}"
    return float(match[1]) * _UNITS[match[2]]


def compose_bytes(quantity: str) -> float:
    """A compose/Docker memory size (``512M``, ``64m``, ``1g``) in bytes: Docker's units are binary."""
    match = re.fullmatch(r"([0-9.]+)([bkmgBKMG]?)", str(quantity))
    assert match, f"not a memory size: {quantity!r}"
    return float(match[1]) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match[2].lower()]


def kubernetes_cpus(quantity: str) -> float:
    """A Kubernetes CPU quantity (``1``, ``"2"``, ``250m``) in CPUs."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def workers_under(workers_setting: str | None, cpu_limit: float) -> int:
    """The worker count the service starts with this MNIST_SERVE_WORKERS (None: its default) under a CPU quota."""
    workers = int(workers_setting) if workers_setting is not None else int(default_of("MNIST_SERVE_WORKERS"))
    return workers or max(1, math.ceil(cpu_limit))  # 0: one per usable CPU, which the quota caps (service/cpus.py)


def peak_memory_bytes(workers: int, tmp_bytes: float) -> float:
    """What ``workers`` workers may hold at worst, with the supervisor and a full in-memory /tmp (it counts too)."""
    return ((SUPERVISOR_MB if workers > 1 else 0) + workers * WORKER_PEAK_MB) * 1e6 + tmp_bytes


def rest_memory_bytes(workers: int) -> float:
    return ((SUPERVISOR_MB if workers > 1 else 0) + workers * WORKER_REST_MB) * 1e6
