"""docker-compose.yml, deploy/prometheus.yml and the Grafana provisioning: well-formed, hardened, consistent with
each other and with the service (setting names, scrape target, metric names). `docker compose config` checks the
file too wherever a compose CLI is installed.

    pytest tests/deploy/test_compose.py
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    COMPOSE_FILE,
    PROMETHEUS_CONFIG,
    ROOT,
    compose_bytes,
    find_tool,
    image_env,
    ordered_setting_names,
    peak_memory_bytes,
    run,
    setting_names,
    workers_under,
)

GRAFANA = ROOT / "deploy" / "grafana"


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def test_services_and_published_ports(compose: dict[str, Any]) -> None:
    assert set(services(compose)) == {"mnist-serve", "prometheus", "grafana"}
    serve = services(compose)["mnist-serve"]
    assert serve["build"]["context"] == "."
    assert serve["ports"] == [
        "${BIND_ADDRESS:-127.0.0.1}:${MNIST_SERVE_PUBLISHED_PORT:-8000}:8000",
        "${BIND_ADDRESS:-127.0.0.1}:${MNIST_SERVE_GRPC_PUBLISHED_PORT:-8081}:8081",
    ]
    prometheus = services(compose)["prometheus"]
    assert prometheus["ports"] == ["${BIND_ADDRESS:-127.0.0.1}:${PROMETHEUS_PUBLISHED_PORT:-9090}:9090"]
    assert services(compose)["grafana"]["ports"] == ["${BIND_ADDRESS:-127.0.0.1}:3000:3000"]


@pytest.mark.parametrize("name", ["mnist-serve", "prometheus", "grafana"])
def test_every_service_is_limited_checked_and_unprivileged(compose: dict[str, Any], name: str) -> None:
    service = services(compose)[name]
    limits = service["deploy"]["resources"]["limits"]
    assert set(limits) == {"cpus", "memory"}
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert service["restart"] == "unless-stopped"


def test_service_runs_on_a_read_only_root_and_reports_readiness(compose: dict[str, Any]) -> None:
    serve = services(compose)["mnist-serve"]
    assert serve["read_only"] is True
    assert any(t.startswith("/tmp:") for t in serve["tmpfs"])
    assert services(compose)["prometheus"]["read_only"] is True
    assert "/readyz" in " ".join(serve["healthcheck"]["test"])


def test_environment_passes_settings_through_without_restating_defaults(compose: dict[str, Any]) -> None:
    env = services(compose)["mnist-serve"]["environment"]
    # Bare names: set in the shell or .env they pass through, unset the service's own default applies, so a
    # default changed in service/settings.py is never shadowed by a stale copy here.
    assert isinstance(env, list) and all("=" not in name for name in env)
    unknown = set(env) - setting_names()
    assert not unknown, f"the service reads no such settings: {sorted(unknown)}"
    # Every setting, except where the image listens and keeps its models (fixed by the Dockerfile), the worker
    # count (one per CPU of the limit, which the memory limit is sized for: test_memory_limit_holds_the_workers)
    # and the bundled web page's path. The gRPC port passes through, so that 0 can turn gRPC off.
    fixed = {"HOST", "PORT", "MODEL_DIR", "WORKERS", "WEB_DIR"}
    assert set(env) == setting_names() - {f"MNIST_SERVE_{name}" for name in fixed}
    # In the order `mnist-serve --help` lists them, so a missing one is easy to spot.
    assert env == [name for name in ordered_setting_names() if name in env]


def test_published_ports_are_where_the_image_listens(compose: dict[str, Any]) -> None:
    env = image_env()
    container_ports = [port.rsplit(":", 1)[1] for port in services(compose)["mnist-serve"]["ports"]]
    assert container_ports == [env["MNIST_SERVE_PORT"], env["MNIST_SERVE_GRPC_PORT"]]
    healthcheck = " ".join(services(compose)["mnist-serve"]["healthcheck"]["test"])
    assert f"127.0.0.1:{env['MNIST_SERVE_PORT']}/" in healthcheck


def test_memory_limit_holds_the_workers_the_cpu_limit_starts(compose: dict[str, Any]) -> None:
    serve = services(compose)["mnist-serve"]
    limits = serve["deploy"]["resources"]["limits"]
    cpus = float(limits["cpus"])
    # WORKERS is not passed through: the default, one worker per usable CPU, reads the container's CPU quota.
    workers = workers_under(None, cpus)
    assert workers == 1
    tmp = next(t for t in serve["tmpfs"] if t.startswith("/tmp:"))
    size = re.search(r"size=(\w+)", tmp)
    assert size, "the in-memory /tmp counts against the limit: give it a size"
    needed = peak_memory_bytes(workers, compose_bytes(size[1]))
    assert compose_bytes(limits["memory"]) >= needed, (limits, workers, needed / 1e6)


def test_prometheus_scrapes_the_service_by_its_compose_name(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["mnist-serve"]
    assert job["metrics_path"] == "/metrics"
    assert [t for group in job["static_configs"] for t in group["targets"]] == ["mnist-serve:8000"]
    # Short enough that a fresh `docker compose up` shows the target within seconds.
    assert config["global"]["scrape_interval"] == "5s"
    mounts = services(compose)["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_bind_mounted_files_exist(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} is missing"


def test_grafana_is_an_optional_profile(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        assert service.get("profiles", []) == (["grafana"] if name == "grafana" else []), name
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "mnist-serve.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"


def test_every_pulled_image_is_pinned_by_version_tag(compose: dict[str, Any]) -> None:
    # Tags, not digests: a digest pin cannot be served by a build machine's local stand-in for an image. The image
    # is written out (no ${VAR:-default}) so the pin is what runs; a mirror goes in docker-compose.override.yml.
    for name, service in services(compose).items():
        if "build" in service:
            continue  # built here from the Dockerfile
        image = service["image"]
        assert "$" not in image, f"{name}: {image} (name a mirror in docker-compose.override.yml instead)"
        assert "@" not in image, f"{name}: pin by tag, not digest"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned to a version (x.y.z)"


def test_no_default_passwords_and_plain_up_needs_no_variables() -> None:
    text = COMPOSE_FILE.read_text()
    assert "change-me" not in text
    # ${VAR:?} fails the whole file, even for `docker compose up` without the profile that uses VAR.
    assert ":?" not in text and not re.search(r"\$\{[A-Z_]+\?", text)
    grafana = yaml.safe_load(text)["services"]["grafana"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana["environment"]
    assert grafana["environment"]["GRAFANA_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    mounted = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert grafana["entrypoint"][0] == "/bin/sh"
    assert mounted[grafana["entrypoint"][1]] == "./deploy/grafana/entrypoint.sh"
    assert grafana["command"] == ["/run.sh"]  # the image's own entrypoint, run once the password is settled
    assert mounted["/var/lib/grafana"] == "grafana-data"  # where the generated password is kept


def grafana_entrypoint(data: Path, **env: str) -> dict[str, str]:
    """Run deploy/grafana/entrypoint.sh as compose does, with `env` as the command; the environment it hands on."""
    base = {"PATH": os.environ["PATH"], "GF_PATHS_DATA": str(data)}
    result = subprocess.run(["/bin/sh", str(GRAFANA / "entrypoint.sh"), "env"], env=base | env, capture_output=True,
                            text=True, timeout=30, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("grafana: ")]
    handed_on = dict(line.split("=", 1) for line in lines if "=" in line)
    handed_on["_log"] = "\n".join(line for line in result.stdout.splitlines() if line.startswith("grafana: "))
    return handed_on


def test_grafana_gets_a_generated_admin_password_once(tmp_path: Path) -> None:
    first = grafana_entrypoint(tmp_path)
    secret = Path(first["GF_SECURITY_ADMIN_PASSWORD__FILE"])
    assert secret == tmp_path / "admin-password"
    password = secret.read_text().strip()
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600  # the grafana user's alone
    assert "GF_SECURITY_ADMIN_PASSWORD" not in first and password not in first["_log"]  # never logged
    assert "docker compose exec grafana cat" in first["_log"]
    # Kept across restarts (Grafana applies it only when it creates its database), and different per install.
    assert grafana_entrypoint(tmp_path)["GF_SECURITY_ADMIN_PASSWORD__FILE"] == str(secret)
    assert secret.read_text().strip() == password
    other = tmp_path / "other"
    other.mkdir()
    grafana_entrypoint(other)
    assert (other / "admin-password").read_text().strip() != password


def test_grafana_takes_the_admin_password_it_is_given(tmp_path: Path) -> None:
    env = grafana_entrypoint(tmp_path, GRAFANA_ADMIN_PASSWORD="a-password-of-my-own")
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "a-password-of-my-own"
    assert "GF_SECURITY_ADMIN_PASSWORD__FILE" not in env and "GRAFANA_ADMIN_PASSWORD" not in env
    assert not (tmp_path / "admin-password").exists()


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every query the dashboard runs: panel targets (rows' too), variables, annotations."""
    queries = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
        queries += [(panel["title"], target["expr"]) for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]
        queries.append((f"${variable['name']}", query["query"] if isinstance(query, dict) else query))
    queries += [(a["name"], a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]
    return queries


def exported_series() -> dict[str, set[str]]:
    """Every sample name the service exports → its label names (each collector exercised once)."""
    import numpy as np

    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    per_model = metrics.for_model("mnist-cnn", "1.0.0")
    per_model.observe_run(4, 0.001)
    per_model.observe_overloaded()
    per_model.failed.inc()
    per_model.queue_seconds.observe(0.001)
    per_model.queue_depth.set(1)
    per_model.queue_images.set(1)
    per_model.ready.set(1)
    per_model.observe_answers(np.array([7]), np.array([0.99], np.float32), ["digit"])
    metrics.set_models([("mnist-cnn", "1.0.0", "0" * 64, True)], problems=0)
    metrics.observe_request("/v1/predict", "POST", 200, 0.001)
    metrics.reloads.labels(result="ok").inc()
    metrics.observe_connection_closed("body_timeout")
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


#: A metric name and its label matchers: `name{a="x", b=~"y"}` (names without matchers have no braces).
SELECTOR = re.compile(r"\b(mnist_serve_[a-z_]+)(?:\{([^}]*)\})?")
#: Grafana's own variables.
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range", "__all"}


def test_dashboard_queries_metrics_the_service_exports() -> None:
    series = exported_series()
    dashboard = json.loads((GRAFANA / "dashboards" / "mnist-serve.json").read_text())
    titles = [panel["title"] for panel in dashboard["panels"]]
    for wanted in ("latency", "Throughput", "batch size", "Errors", "queue", "Readiness", "verdict", "digit",
                   "Confidence distribution"):  # fmt: skip
        assert any(wanted.lower() in t.lower() for t in titles), f"no panel about {wanted}: {titles}"
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"model", "version"} <= variables
    queries = dashboard_queries(dashboard)
    assert len(queries) > 20
    for where, query in queries:
        names = SELECTOR.findall(query)
        assert names, f"{where}: {query} names no metric of the service"
        for name, matchers in names:
            assert name in series, f"{where}: {name} is not a metric the service exports"
            for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers):
                assert label in series[name], f"{where}: {name} has no label {label!r} (it has {sorted(series[name])})"
        for variable in re.findall(r"\$(\w+)", query):
            assert variable in variables | GRAFANA_VARIABLES, f"{where}: ${variable} is not a dashboard variable"


def test_dashboard_shows_every_model_in_a_row_of_its_own() -> None:
    dashboard = json.loads((GRAFANA / "dashboards" / "mnist-serve.json").read_text())
    (per_model,) = [panel for panel in dashboard["panels"] if panel.get("repeat") == "model"]
    assert per_model["type"] == "row"
    below = [panel for panel in dashboard["panels"] if panel["gridPos"]["y"] > per_model["gridPos"]["y"]]
    assert below and all("$model" in target["expr"] for panel in below for target in panel["targets"])
    assert all('model=~"$model", version=~"$version"' in t["expr"] for panel in below for t in panel["targets"])
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def compose_cli() -> list[str] | None:
    """A working `docker compose` (Docker's plugin or the podman-compose forwarder), else podman-compose."""
    for docker in dict.fromkeys(filter(None, [find_tool("docker"), "/usr/local/sbin/docker"])):
        if Path(docker).exists() and run([docker, "compose", "version"], timeout=30).returncode == 0:
            return [docker, "compose"]
    podman_compose = find_tool("podman-compose")
    return [podman_compose] if podman_compose else None


@pytest.mark.parametrize("profile", [[], ["--profile", "grafana"]], ids=["default", "grafana"])
def test_docker_compose_config_accepts_the_file(profile: list[str]) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no `docker compose` or podman-compose on this machine (../shared/container/setup installs one)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MNIST_SERVE_", "BIND_ADDRESS", "GRAFANA_"))}
    result = run([*cli, "-f", str(COMPOSE_FILE), *profile, "config"], cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = yaml.safe_load(result.stdout)
    expected = {"mnist-serve", "prometheus"} | ({"grafana"} if profile else set())
    assert set(rendered["services"]) == expected
