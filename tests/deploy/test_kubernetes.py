"""The kustomize base in k8s/: it renders, validates against the Kubernetes schemas offline, and keeps its promises
(hardened pods, probes on the service's health endpoints, selectors that select, settings the service accepts).

    pytest tests/deploy/test_kubernetes.py
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from deploy_helpers import setting_names, validate_settings

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
def test_manifests_match_the_kubernetes_schemas(manifests: list[dict[str, Any]], version: str) -> None:
    # strict: an unknown or misspelt field fails, instead of being silently dropped by the API server.
    for m in manifests:
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
    assert port_names == {"http": 8000}
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
    service_port = by_kind["Service"]["spec"]["ports"][0]
    assert service_port["targetPort"] == "http"


def test_prometheus_scrape_annotations(by_kind: dict[str, dict[str, Any]]) -> None:
    annotations = by_kind["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"
    assert annotations["prometheus.io/path"] == "/metrics"


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
