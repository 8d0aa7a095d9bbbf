"""k8s/kserve/: the mnist-serve ServingRuntime and an InferenceService on it, validated offline against KServe's
own CRD schemas (vendored in tests/deploy/kserve/, see its README) and checked for what the service needs: the
Open Inference Protocol on 8080 (REST) and 8081 (gRPC, port name h2c), models from /mnt/models, settings the
service accepts, and a shutdown that fits the grace period.

    pytest tests/deploy/test_kserve.py
"""

from __future__ import annotations

import copy
import gzip
import json
import math
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_helpers import (
    KSERVE_DIR,
    ROOT,
    kubernetes_bytes,
    kubernetes_cpus,
    peak_memory_bytes,
    rest_memory_bytes,
    run,
    setting_names,
    validate_settings,
    workers_under,
)

SCHEMAS = ROOT / "tests" / "deploy" / "kserve" / "kserve-crd-schemas.json.gz"


@cache
def crd_schemas() -> dict[str, dict[str, Any]]:
    schemas: dict[str, dict[str, Any]] = json.loads(gzip.decompress(SCHEMAS.read_bytes()))
    return schemas


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused, as `kubectl apply` (strict field validation) does; the API server
    would otherwise drop a misspelt field silently. Objects that keep unknown fields on purpose stay open."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate(resource: dict[str, Any]) -> None:
    group_version, kind = resource["apiVersion"], resource["kind"]
    key = f"{group_version}/{kind}"
    assert key in crd_schemas(), f"no KServe schema for {key}: {sorted(crd_schemas())}"
    body = {k: v for k, v in resource.items() if k != "metadata"}  # metadata is Kubernetes', checked below
    jsonschema.Draft7Validator(strict(crd_schemas()[key])).validate(body)


@pytest.fixture(scope="module")
def kserve(kubectl: str) -> dict[str, dict[str, Any]]:
    result = run([kubectl, "kustomize", str(KSERVE_DIR)])
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert sorted(by_kind) == ["InferenceService", "ServingRuntime"] and len(docs) == 2
    return by_kind


def runtime_container(kserve: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = kserve["ServingRuntime"]["spec"]["containers"]
    assert container["name"] == "kserve-container"  # the name KServe gives the model server's container
    return dict(container)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


@pytest.mark.parametrize("kind", ["ServingRuntime", "InferenceService"])
def test_matches_kserves_crd_schema(kserve: dict[str, dict[str, Any]], kind: str) -> None:
    try:
        validate(kserve[kind])
    except jsonschema.ValidationError as error:
        pytest.fail(f"{kind}: {error.message} at {'/'.join(map(str, error.absolute_path))}")


def test_the_schema_check_catches_a_misspelt_or_mistyped_field(kserve: dict[str, dict[str, Any]]) -> None:
    misspelt = copy.deepcopy(kserve["InferenceService"])
    misspelt["spec"]["predictor"]["model"]["storageURI"] = misspelt["spec"]["predictor"]["model"].pop("storageUri")
    with pytest.raises(jsonschema.ValidationError, match="storageURI"):
        validate(misspelt)
    mistyped = copy.deepcopy(kserve["ServingRuntime"])
    mistyped["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    with pytest.raises(jsonschema.ValidationError):
        validate(mistyped)


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_runtime_pod_parts_match_the_kubernetes_schemas(kserve: dict[str, dict[str, Any]], version: str) -> None:
    # The runtime's containers and volumes become a pod: check them as one, strictly, like the base.
    spec = kserve["ServingRuntime"]["spec"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "mnist-serve-runtime"},
           "spec": {"containers": spec["containers"], "volumes": spec["volumes"]}}  # fmt: skip
    kubernetes_validate.validate(pod, version, strict=True)
    for resource in kserve.values():
        assert resource["metadata"]["name"] and "namespace" not in resource["metadata"]  # applied with -n


def test_runtime_serves_the_open_inference_protocol_from_mnt_models(kserve: dict[str, dict[str, Any]]) -> None:
    spec = kserve["ServingRuntime"]["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    container = runtime_container(kserve)
    env = env_of(container)
    assert env["MNIST_SERVE_MODEL_DIR"] == "/mnt/models"  # where KServe's storage initializer puts storageUri
    assert env["MNIST_SERVE_HOST"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http1": int(env["MNIST_SERVE_PORT"]), "h2c": int(env["MNIST_SERVE_GRPC_PORT"])}
    assert ports == {"http1": 8080, "h2c": 8081}  # KServe's REST convention; h2c is how it knows the gRPC port
    assert spec["annotations"]["prometheus.kserve.io/port"] == env["MNIST_SERVE_PORT"]
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert container["image"].startswith("mnist-serve:")


def test_runtime_settings_are_ones_the_service_accepts(kserve: dict[str, dict[str, Any]]) -> None:
    env = env_of(runtime_container(kserve))
    unknown = set(env) - setting_names()
    assert not unknown, f"the service reads no such settings: {sorted(unknown)}"
    validate_settings(env)


def test_runtime_memory_limit_holds_its_workers(kserve: dict[str, dict[str, Any]]) -> None:
    container = runtime_container(kserve)
    resources = container["resources"]
    cpu_limit = kubernetes_cpus(resources["limits"]["cpu"])
    env = env_of(container)
    assert "MNIST_SERVE_WORKERS" in env, "set, so that the memory limit holds without a CPU limit too"
    workers = workers_under(env["MNIST_SERVE_WORKERS"], cpu_limit)
    assert 1 <= workers <= max(1, math.ceil(cpu_limit))
    tmp = sum(
        kubernetes_bytes(v["emptyDir"].get("sizeLimit", "0"))
        for v in kserve["ServingRuntime"]["spec"]["volumes"]
        if v.get("emptyDir", {}).get("medium") == "Memory"
    )
    assert kubernetes_bytes(resources["limits"]["memory"]) >= peak_memory_bytes(workers, tmp)
    assert kubernetes_bytes(resources["requests"]["memory"]) >= rest_memory_bytes(workers)


def test_runtime_container_is_hardened(kserve: dict[str, dict[str, Any]]) -> None:
    ctx = runtime_container(kserve)["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in runtime_container(kserve)["volumeMounts"]}
    volumes = {v["name"]: v for v in kserve["ServingRuntime"]["spec"]["volumes"]}
    assert volumes[mounts["/tmp"]]["emptyDir"]["medium"] == "Memory"
    resources = runtime_container(kserve)["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


def test_inference_service_uses_the_runtime(kserve: dict[str, dict[str, Any]]) -> None:
    runtime = kserve["ServingRuntime"]
    predictor = kserve["InferenceService"]["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
    assert model["storageUri"].split("://")[0] in {"pvc", "s3", "gs", "https", "oci", "hf"}
    # Not picked for every ONNX InferenceService in the namespace: it needs mnist-serve's model cards.
    assert not any(f.get("autoSelect") for f in runtime["spec"]["supportedModelFormats"])
    # Both ports need KServe's RawDeployment mode (Knative serves one port per container).
    annotations = kserve["InferenceService"]["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert predictor["minReplicas"] >= 2 and predictor["maxReplicas"] > predictor["minReplicas"]
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert predictor["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_shutdown_fits_the_grace_period(kserve: dict[str, dict[str, Any]]) -> None:
    container = runtime_container(kserve)
    wait = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env_of(container)["MNIST_SERVE_SHUTDOWN_TIMEOUT_S"])
    grace = kserve["InferenceService"]["spec"]["predictor"]["terminationGracePeriodSeconds"]
    assert 3 <= wait <= 15
    assert wait + drain + 2 <= grace <= wait + drain + 15, (wait, drain, grace)
