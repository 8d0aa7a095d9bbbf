"""End to end in containers: `docker compose up -d --build`, a real MNIST digit predicted through the published
port, Prometheus scraping the service, the image's size and user reported; then everything torn down.

    make test-containers        # pytest tests/deploy -m containers

Needs a container engine with `docker compose` (Docker, or podman + podman-compose behind a `docker` shim). When
none works and ../shared/container/setup exists (this project's machines, as root), the setup script installs one
first. The compose project is named mnist-serve-citest, so a stack you run yourself is left alone; the report
(image size, user, timings) is printed and written to test-artifacts/deploy/container-report.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from deploy_helpers import COMPOSE_FILE, ROOT, run

pytestmark = [pytest.mark.containers, pytest.mark.timeout(2400)]

PROJECT = "mnist-serve-citest"
IMAGE = "mnist-serve:citest"
SETUP = ROOT.parent / "shared" / "container" / "setup"
ARTIFACTS = ROOT / "test-artifacts" / "deploy"
# "425 MB" as `docker images` counts: 409 MB measured with the gRPC runtime (grpcio, protobuf: 21 MB) and the
# offline API docs (3 MB), on a 203 MB stand-in for python:3.11-slim.
MAX_IMAGE_BYTES = 425 * 1000 * 1000
SAMPLES = 10  # the first MNIST test images


def working_docker() -> str | None:
    """A `docker` whose engine answers and which has `docker compose` (a Docker CLI alone is not enough)."""
    candidates = [shutil.which("docker"), "/usr/local/sbin/docker", "/usr/local/bin/docker", "/usr/bin/docker"]
    for docker in dict.fromkeys(filter(None, candidates)):
        if not Path(docker).is_file():
            continue
        if run([docker, "info"], timeout=60).returncode == 0 and run([docker, "compose", "version"]).returncode == 0:
            return docker
    return None


@pytest.fixture(scope="module")
def docker() -> str:
    found = working_docker()
    if found:
        if SETUP.is_file() and os.geteuid() == 0:
            # Where the engine is the setup script's podman, --check also gives its local stand-ins the image names
            # the compose file pins (prom/prometheus:vX.Y.Z), which could not be pulled offline.
            run(["bash", str(SETUP), "--check"], timeout=120)
        return found
    if not SETUP.is_file():
        pytest.skip(f"no working `docker compose`, and no {SETUP} to install podman")
    if os.geteuid() != 0:
        pytest.skip(f"no working `docker compose`; {SETUP} would install podman but needs root")
    result = run(["bash", str(SETUP)], timeout=1200)
    print(result.stdout, result.stderr)
    # A failure in a late step (naming the stand-ins, say) leaves everything in place: --check says whether the
    # engine and the stand-in images are there, and names them again.
    ready = result.returncode == 0 or run(["bash", str(SETUP), "--check"], timeout=120).returncode == 0
    found = working_docker()
    if not (ready and found):
        failed = f"failed: {result.stderr.strip()[-500:]}" if result.returncode != 0 else "ran"
        pytest.skip(f"no working `docker compose`, and {SETUP} {failed}")
    return found


def free_port(preferred: int) -> int:
    """The preferred port when nothing listens on it (a developer's `make run` often holds 8000), else any free one."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port")


def poll(what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """Call check() until it returns something truthy; fail with its last error after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
            last = value
        except (httpx.HTTPError, KeyError, ValueError) as error:
            last = error
        time.sleep(interval)
    pytest.fail(f"{what} not within {timeout:.0f} s (last: {last!r})")


class Stack:
    def __init__(self, docker: str, env: dict[str, str], service_port: int, prometheus_port: int) -> None:
        self.docker = docker
        self.env = env
        self.service_url = f"http://127.0.0.1:{service_port}"
        self.prometheus_url = f"http://127.0.0.1:{prometheus_port}"
        self.report: dict[str, Any] = {"service_url": self.service_url, "prometheus_url": self.prometheus_url}

    def compose(self, *args: str, timeout: float = 300) -> Any:
        return run([self.docker, "compose", "-p", PROJECT, "-f", str(COMPOSE_FILE), *args], timeout, cwd=ROOT,
                   env=self.env)  # fmt: skip

    def container(self, service: str) -> str:
        result = run([self.docker, "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                      "--filter", f"label=com.docker.compose.service={service}"])  # fmt: skip
        ids = result.stdout.split()
        assert len(ids) == 1, f"expected one running {service} container, got {ids} {result.stderr}"
        return ids[0]

    def inspect(self, kind: str, name: str) -> dict[str, Any]:
        result = run([self.docker, kind, "inspect", name])
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)[0]
        return data

    @property
    def is_podman(self) -> bool:
        return "podman" in run([self.docker, "--version"]).stdout.lower()


@pytest.fixture(scope="module")
def stack(docker: str, request: pytest.FixtureRequest) -> Iterator[Stack]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_SERVE_")}
    env |= {
        "MNIST_SERVE_IMAGE": IMAGE,
        "MNIST_SERVE_PUBLISHED_PORT": str(free_port(8000)),
        "MNIST_SERVE_GRPC_PUBLISHED_PORT": str(free_port(8081)),
        "PROMETHEUS_PUBLISHED_PORT": str(free_port(9090)),
        # podman builds OCI images by default, which drop HEALTHCHECK; Docker ignores this variable.
        "BUILDAH_FORMAT": "docker",
    }
    s = Stack(docker, env, int(env["MNIST_SERVE_PUBLISHED_PORT"]), int(env["PROMETHEUS_PUBLISHED_PORT"]))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    s.compose("down", "-v", "--remove-orphans")  # leftovers of an interrupted run
    try:
        started = time.monotonic()
        up = s.compose("up", "-d", "--build", timeout=1500)
        (ARTIFACTS / "compose-up.log").write_text(up.stdout + up.stderr)
        assert up.returncode == 0, f"docker compose up failed ({ARTIFACTS / 'compose-up.log'}):\n{up.stderr[-3000:]}"
        s.report["build_and_up_s"] = round(time.monotonic() - started, 1)
        yield s
    finally:
        logs = s.compose("logs", timeout=120)
        (ARTIFACTS / "compose-logs.txt").write_text(logs.stdout + logs.stderr)
        down = s.compose("down", "-v", "--remove-orphans", timeout=300)
        s.report["torn_down"] = down.returncode == 0
        (ARTIFACTS / "container-report.json").write_text(json.dumps(s.report, indent=2) + "\n")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\ncontainer report ({ARTIFACTS / 'container-report.json'}):")
            for key, value in s.report.items():
                print(f"  {key}: {value}")
        assert down.returncode == 0, f"docker compose down failed:\n{down.stderr[-2000:]}"


@pytest.fixture(scope="module")
def ready(stack: Stack) -> Stack:
    started = time.monotonic()
    poll("the service answering 200 on /readyz",
         lambda: httpx.get(f"{stack.service_url}/readyz", timeout=5).status_code == 200, timeout=180)  # fmt: skip
    stack.report["ready_after_up_s"] = round(time.monotonic() - started, 1)
    return stack


def test_predicts_real_mnist_digits_through_the_published_port(ready: Stack) -> None:
    from training.data import load_test_set

    images, labels = load_test_set()
    correct = 0
    with httpx.Client(base_url=ready.service_url, timeout=10) as client:
        for image, label in zip(images[:SAMPLES], labels[:SAMPLES], strict=True):
            response = client.post("/v1/predict", json={"pixels": image.tolist(), "scale": "0-255"})
            assert response.status_code == 200, response.text
            body = response.json()
            assert set(body) >= {"digit", "confidence", "probabilities", "model"}
            assert len(body["probabilities"]) == 10
            assert body["model"]["name"] == "mnist-cnn"
            correct += body["digit"] == int(label)
        assert client.get("/healthz").status_code == 200
    ready.report["model"] = body["model"]
    ready.report["mnist_test_digits_correct"] = f"{correct}/{SAMPLES}"
    # The shipped model is ~99 % accurate; one miss in ten is already suspicious, two is a broken image.
    assert correct >= SAMPLES - 1


def test_grpc_answers_through_its_published_port(ready: Stack) -> None:
    import grpc

    from service.grpc_gen import grpc_predict_v2_pb2 as pb
    from service.grpc_gen import grpc_predict_v2_pb2_grpc as pb_grpc

    address = f"127.0.0.1:{ready.env['MNIST_SERVE_GRPC_PUBLISHED_PORT']}"
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist-cnn"), timeout=10)
    assert metadata.name == "mnist-cnn"
    ready.report["grpc"] = {"address": address, "ready": True}


def test_prometheus_scrapes_the_service_and_sees_it_up(ready: Stack) -> None:
    def service_target() -> dict[str, Any] | None:
        targets = httpx.get(f"{ready.prometheus_url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        up = [t for t in targets if t["labels"].get("job") == "mnist-serve" and t["health"] == "up"]
        return up[0] if up else None

    target = poll("Prometheus listing the mnist-serve target as up", service_target, timeout=120, interval=2)
    assert target["scrapeUrl"] == "http://mnist-serve:8000/metrics"
    ready.report["prometheus_target"] = {"scrapeUrl": target["scrapeUrl"], "health": target["health"]}

    # And the scraped series carry the predictions made through the published port.
    httpx.post(f"{ready.service_url}/v1/predict", json={"pixels": [[0] * 28] * 28, "scale": "0-255"}, timeout=10)

    def predictions_seen() -> float:
        query = 'sum(mnist_serve_requests_total{route="/v1/predict"})'
        result = httpx.get(f"{ready.prometheus_url}/api/v1/query", params={"query": query}, timeout=5).json()
        values = result["data"]["result"]
        return float(values[0]["value"][1]) if values else 0.0

    ready.report["predict_requests_seen_by_prometheus"] = poll(
        "Prometheus holding mnist_serve_requests_total", predictions_seen, timeout=60, interval=2
    )


def test_prometheus_evaluates_every_dashboard_query(ready: Stack) -> None:
    # Grafana cannot run here (no image), so the queries it would send go to the real Prometheus instead.
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "mnist-serve.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert queries
    for query in queries:
        # Grafana's variables as Grafana would fill them in: every model and version.
        expr = query.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$version", ".*")
        answer = httpx.get(f"{ready.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", f"{query}: {answer.get('error')}"
    ready.report["dashboard_queries_evaluated"] = len(queries)


def test_image_is_small_and_runs_as_non_root_on_a_read_only_root(ready: Stack) -> None:
    image = ready.inspect("image", IMAGE)
    size = int(image["Size"])
    ready.report["image"] = IMAGE
    ready.report["image_size_mb"] = round(size / 1e6, 1)
    ready.report["image_size_mib"] = round(size / 2**20, 1)
    assert size <= MAX_IMAGE_BYTES, f"image is {size / 1e6:.0f} MB, over {MAX_IMAGE_BYTES / 1e6:.0f} MB"

    assert image["Config"]["User"] == "10001:10001"
    cid = ready.container("mnist-serve")
    container = ready.inspect("container", cid)
    assert container["HostConfig"]["ReadonlyRootfs"] is True
    # The uid the process really runs as, from the engine's own view of the container.
    top = run([ready.docker, "top", cid, "huser"] if ready.is_podman else [ready.docker, "top", cid, "-o", "uid"])
    assert top.returncode == 0, top.stderr
    uids = top.stdout.split()[1:]
    ready.report["container_process_uids"] = sorted(set(uids))
    assert uids and set(uids) == {"10001"}


def test_image_healthcheck_passes_against_the_running_service(ready: Stack) -> None:
    image = ready.inspect("image", IMAGE)
    check = image.get("Healthcheck") or image["Config"].get("Healthcheck")
    assert check, "the image lost its HEALTHCHECK"
    assert check["Test"][0] == "CMD" and "/readyz" in check["Test"][-1]
    # Run the image's own probe beside the service, in its network namespace (what the engine does, minus exec,
    # which the sandboxed runtime on some hosts refuses).
    # podman-compose puts the stack in a pod (which refuses container: networking): join the namespace by path.
    cid = ready.container("mnist-serve")
    container = ready.inspect("container", cid)
    if container.get("Pod"):
        beside = ["--network", f"ns:/proc/{container['State']['Pid']}/ns/net"]
    else:
        beside = ["--network", f"container:{cid}"]
    probe = run([ready.docker, "run", "--rm", *beside, IMAGE, *check["Test"][1:]], timeout=120)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    ready.report["healthcheck"] = "passes"
