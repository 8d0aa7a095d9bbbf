"""Helpers for the deployment tests: where the files are, how to find a tool, how to run one.

Importable from any test module in tests/deploy as ``from deploy_helpers import ...``.
"""

from __future__ import annotations

import os
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
DOCS = ROOT / "README.md"
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
    from service.settings import ENV_PREFIX, Settings

    return {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def validate_settings(env: dict[str, str]) -> None:
    """Raise unless the service would accept these MNIST_SERVE_* values."""
    from service.settings import ENV_PREFIX, Settings

    Settings.model_validate({key.removeprefix(ENV_PREFIX).lower(): value for key, value in env.items()})
