"""The kustomize base in k8s/: it renders, validates against the Kubernetes schemas offline, and keeps its promises
(hardened pods, probes on the service's health endpoints, selectors that select, settings the service accepts).

    pytest tests/deploy/test_kubernetes.py
"""

from __future__ import annotations

import math
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import (
    K8S_DIR,
    kubernetes_bytes,
    kubernetes_cpus,
    peak_memory_bytes,
    rest_memory_bytes,
    setting_names,
    validate_settings,
    workers_under,
)

EXPECTED_KINDS = {
    "Namespace",
    "ServiceAccount",
    "ConfigMap",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "NetworkPolicy",
}
# The oldest Kubernetes minor still widely run, and the newest the schemas know.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def pod_spec(by_kind: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind["Deployment"]["spec"]["template"]["spec"]
    return spec


def container(by_kind: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(by_kind)["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def test_kustomize_renders_every_resource_into_one_namespace(manifests: list[dict[str, Any]]) -> None:
    assert {m["kind"] for m in manifests} == EXPECTED_KINDS
    for m in manifests:
        if m["kind"] != "Namespace":
            assert m["metadata"]["namespace"] == "mnist-serve", m["kind"]
        assert m["metadata"]["labels"]["app.kubernetes.io/name"] == "mnist-serve", m["kind"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("rendered", ["base", "example overlay"])
def test_manifests_match_the_kubernetes_schemas(
    manifests: list[dict[str, Any]], overlay: dict[str, dict[str, Any]], rendered: str, version: str
) -> None:
    # strict: an unknown or misspelt field fails, instead of being silently dropped by the API server.
    for m in manifests if rendered == "base" else overlay.values():
        try:
            kubernetes_validate.validate(m, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{m['kind']}/{m['metadata']['name']} against {version}: {error.message} at {error.path}")


def test_pods_run_unprivileged_on_a_read_only_root(by_kind: dict[str, dict[str, Any]]) -> None:
    pod = pod_spec(by_kind)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 10001  # the uid the Dockerfile creates
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    ctx = container(by_kind)["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert "add" not in ctx["capabilities"]
    assert pod_spec(by_kind)["automountServiceAccountToken"] is False
    # The only writable path is an in-memory /tmp.
    mounts = {m["mountPath"]: m["name"] for m in container(by_kind)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(by_kind)["volumes"]}
    assert volumes[mounts["/tmp"]]["emptyDir"]["medium"] == "Memory"


def test_namespace_enforces_the_restricted_pod_security_standard(by_kind: dict[str, dict[str, Any]]) -> None:
    assert by_kind["Namespace"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_probes_use_the_service_health_endpoints(by_kind: dict[str, dict[str, Any]]) -> None:
    c = container(by_kind)
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_names == {"http": 8000, "grpc": 8081}
    # Probes stay on HTTP: readiness there covers the models gRPC serves (one process serves both).
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # Liveness must not kill a pod that is still loading the model: the startup probe covers that window.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30


def test_resources_replicas_and_scaling(by_kind: dict[str, dict[str, Any]]) -> None:
    resources = container(by_kind)["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"cpu", "memory"}
    assert by_kind["Deployment"]["spec"]["replicas"] == 2
    hpa = by_kind["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mnist-serve"}
    assert hpa["minReplicas"] >= 2
    assert hpa["maxReplicas"] > hpa["minReplicas"]
    assert by_kind["PodDisruptionBudget"]["spec"]["minAvailable"] == 1


def test_selectors_select_the_pods(by_kind: dict[str, dict[str, Any]]) -> None:
    deployment = by_kind["Deployment"]["spec"]
    pod_labels = deployment["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["selector"]["matchLabels"])
    assert selects(by_kind["Service"]["spec"]["selector"])
    assert selects(by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"])
    assert selects(by_kind["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"])
    service_ports = {p["name"]: p for p in by_kind["Service"]["spec"]["ports"]}
    assert {name: p["targetPort"] for name, p in service_ports.items()} == {"http": "http", "grpc": "grpc"}


def test_grpc_is_served_declared_and_admitted(by_kind: dict[str, dict[str, Any]]) -> None:
    ports = {p["name"]: p["containerPort"] for p in container(by_kind)["ports"]}
    settings = by_kind["ConfigMap"]["data"]
    # The service listens where the container ports say.
    assert int(settings["MNIST_SERVE_PORT"]) == ports["http"]
    assert int(settings["MNIST_SERVE_GRPC_PORT"]) == ports["grpc"]
    # The Service tells ingress controllers and meshes that the port speaks HTTP/2 without TLS.
    grpc = next(p for p in by_kind["Service"]["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["appProtocol"] == "kubernetes.io/h2c"
    assert grpc["protocol"] == "TCP"
    assert "appProtocol" not in next(p for p in by_kind["Service"]["spec"]["ports"] if p["name"] == "http")
    # The NetworkPolicy lets both in (and nothing out).
    (rule,) = by_kind["NetworkPolicy"]["spec"]["ingress"]
    assert {(p["port"], p["protocol"]) for p in rule["ports"]} == {("http", "TCP"), ("grpc", "TCP")}
    assert by_kind["NetworkPolicy"]["spec"]["egress"] == []


def test_prometheus_scrape_annotations(by_kind: dict[str, dict[str, Any]]) -> None:
    annotations = by_kind["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"
    assert annotations["prometheus.io/path"] == "/metrics"


def pod_workers_and_limits(
    settings: dict[str, str], serving: dict[str, Any], pod: dict[str, Any]
) -> tuple[int, dict[str, Any], float]:
    """(the workers the pod starts, its container's resources, the bytes its in-memory volumes may hold)."""
    resources = serving["resources"]
    cpu_limit = kubernetes_cpus(resources["limits"]["cpu"])
    workers = workers_under(settings.get("MNIST_SERVE_WORKERS"), cpu_limit)
    tmp = sum(
        kubernetes_bytes(v["emptyDir"].get("sizeLimit", "0"))
        for v in pod["volumes"]
        if v.get("emptyDir", {}).get("medium") == "Memory"
    )
    return workers, resources, tmp


@pytest.mark.parametrize("rendered", ["base", "example overlay"])
def test_memory_limit_holds_the_workers_the_cpu_limit_pays_for(
    by_kind: dict[str, dict[str, Any]], overlay: dict[str, dict[str, Any]], rendered: str
) -> None:
    kinds = by_kind if rendered == "base" else overlay
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (serving,) = pod["containers"]
    workers, resources, tmp = pod_workers_and_limits(kinds["ConfigMap"]["data"], serving, pod)
    cpu_limit = kubernetes_cpus(resources["limits"]["cpu"])
    # The worker count is set, not left to the default: without a CPU limit the default counts the node's CPUs.
    assert "MNIST_SERVE_WORKERS" in kinds["ConfigMap"]["data"]
    assert 1 <= workers <= max(1, math.ceil(cpu_limit)), "more workers than the CPUs the limit pays for"
    needed = peak_memory_bytes(workers, tmp)
    assert kubernetes_bytes(resources["limits"]["memory"]) >= needed, (workers, needed / 1e6)
    assert kubernetes_bytes(resources["requests"]["memory"]) >= rest_memory_bytes(workers)


def test_configmap_holds_settings_the_service_accepts(by_kind: dict[str, dict[str, Any]]) -> None:
    data = by_kind["ConfigMap"]["data"]
    unknown = set(data) - setting_names()
    assert not unknown, f"the service reads no such settings: {sorted(unknown)}"
    assert data["MNIST_SERVE_HOST"] == "0.0.0.0"
    assert data["MNIST_SERVE_PORT"] == "8000"
    validate_settings(data)
    # The generated name (with its content hash) is what the Deployment refers to.
    refs = [e["configMapRef"]["name"] for e in container(by_kind)["envFrom"]]
    assert refs == [by_kind["ConfigMap"]["metadata"]["name"]]


def test_api_key_comes_from_an_optional_secret(by_kind: dict[str, dict[str, Any]]) -> None:
    env = {e["name"]: e for e in container(by_kind).get("env", [])}
    ref = env["MNIST_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True
    assert "MNIST_SERVE_API_KEY" not in by_kind["ConfigMap"]["data"]


def drain_seconds(configmap: dict[str, Any]) -> float:
    """MNIST_SERVE_SHUTDOWN_TIMEOUT_S as the pod gets it: the ConfigMap's value, else the service's default."""
    from service.settings import Settings

    value = configmap["data"].get("MNIST_SERVE_SHUTDOWN_TIMEOUT_S")
    return float(value) if value is not None else float(Settings.model_fields["shutdown_timeout_s"].default)


def test_shutdown_waits_for_the_endpoints_then_drains_within_the_grace_period(
    by_kind: dict[str, dict[str, Any]],
) -> None:
    # The preStop hook holds SIGTERM back while the pod leaves the Service's endpoints; then the service drains.
    pre_stop = container(by_kind)["lifecycle"]["preStop"]
    assert set(pre_stop) == {"sleep"}, "the built-in sleep needs no shell or binary in the image"
    wait = pre_stop["sleep"]["seconds"]
    assert 3 <= wait <= 15
    drain = drain_seconds(by_kind["ConfigMap"])
    grace = pod_spec(by_kind)["terminationGracePeriodSeconds"]
    # Matched to the drain: long enough for the wait, the drain and the exit, and not much longer (a stuck pod
    # should not hold a rollout for minutes).
    assert wait + drain + 2 <= grace <= wait + drain + 15, (wait, drain, grace)


def test_base_scales_on_cpu_only(by_kind: dict[str, dict[str, Any]]) -> None:
    # A metric the HPA cannot read blocks scaling down: the queue metric (which needs the Prometheus adapter)
    # comes with the queue-autoscaling component, not the base.
    metrics = by_kind["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource"]
    assert metrics[0]["resource"]["name"] == "cpu"


def adapter_rule() -> dict[str, Any]:
    rules = yaml.safe_load((K8S_DIR / "components" / "queue-autoscaling" / "prometheus-adapter-rules.yaml").read_text())
    custom = rules["rules"]["custom"]
    assert len(custom) == 1
    return dict(custom[0])


def test_queue_autoscaling_uses_the_metric_the_adapter_rule_serves(overlay: dict[str, dict[str, Any]]) -> None:
    metrics = overlay["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert {m["type"] for m in metrics} == {"Resource", "Pods"}, "the queue beside CPU"
    pods = next(m["pods"] for m in metrics if m["type"] == "Pods")
    rule = adapter_rule()
    assert pods["metric"]["name"] == rule["name"]["as"]
    assert pods["target"]["type"] == "AverageValue"
    assert float(pods["target"]["averageValue"]) > 0
    assert overlay["HorizontalPodAutoscaler"]["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60


def test_adapter_rule_reads_a_metric_the_service_exports_one_value_per_pod() -> None:
    from service.metrics import ServiceMetrics

    rule = adapter_rule()
    gauges = {family.name for family in ServiceMetrics().registry.collect() if family.type == "gauge"}
    series = rule["seriesQuery"].split("{")[0]
    assert series in gauges, f"{series} is not a gauge the service exports"
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    # Summed per pod, so labels the service adds (model, version) do not split the metric into several per pod.
    assert rule["metricsQuery"].startswith("sum by (<<.GroupBy>>)")


def test_models_volume_replaces_the_model_directory(overlay: dict[str, dict[str, Any]]) -> None:
    data = overlay["ConfigMap"]["data"]
    validate_settings(data)
    model_dir = data["MNIST_SERVE_MODEL_DIR"]
    assert model_dir == "/mnt/models"
    assert data["MNIST_SERVE_HOST"] == "0.0.0.0", "merged into the base's settings, not replacing them"
    pod = overlay["Deployment"]["spec"]["template"]["spec"]
    (serving,) = pod["containers"]
    mount = next(m for m in serving["volumeMounts"] if m["mountPath"] == model_dir)
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"] == {"claimName": "mnist-serve-models", "readOnly": True}
    # The Deployment refers to the merged ConfigMap (its name carries the new content hash).
    assert [e["configMapRef"]["name"] for e in serving["envFrom"]] == [overlay["ConfigMap"]["metadata"]["name"]]
