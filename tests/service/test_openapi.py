"""The OpenAPI document says what each route answers, no more and no less, with readable operationIds.

    pytest tests/service/test_openapi.py

``OPERATIONS`` is the table: every operation's operationId and the statuses it answers. The document must list
exactly those, each with the body its API uses (/v1 and health: ``{"error": {"code", "message"}}``; /v2: the
protocol's ``{"error": "message"}``, or an empty body for its health and readiness), and ``REQUESTS`` provokes each
of them on an app in-process and checks the answer against the document (status, media type, body schema,
headers). tests/reliability/test_schema.py then fuzzes the same document against a live server.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.model import ModelLoadError, OnnxClassifier
from service.settings import Settings

MODEL_DIR = Path(__file__).resolve().parents[2] / "models"
MODEL = "mnist-cnn"
#: The shipped model's version, from its card: the document's examples must name it (test below).
VERSION = json.loads((MODEL_DIR / f"{MODEL}.json").read_text())["version"]
KEY = "a-test-key-of-at-least-16-characters"

#: (method, path) → (operationId, the statuses the route answers). Statuses the server answers before any route
#: (431, 408, a body over the size limit on a route that reads none, 404/405 for unknown paths) are in the API's
#: description instead.
OPERATIONS: dict[tuple[str, str], tuple[str, set[int]]] = {
    ("GET", "/healthz"): ("healthz", {200}),
    ("GET", "/readyz"): ("readyz", {200, 503}),
    ("GET", "/v1/models"): ("listModels", {200}),
    ("GET", "/metrics"): ("metrics", {200}),
    ("POST", "/v1/predict"): ("predict", {200, 401, 404, 413, 415, 422, 503}),
    ("POST", "/v1/predict/batch"): ("predictBatch", {200, 401, 404, 413, 415, 422, 503}),
    ("POST", "/v1/admin/reload"): ("reloadModels", {200, 401, 403, 500, 503}),
    ("GET", "/v2"): ("v2ServerMetadata", {200}),
    ("GET", "/v2/health/live"): ("v2ServerLive", {200}),
    ("GET", "/v2/health/ready"): ("v2ServerReady", {200, 400}),
    ("GET", "/v2/models/{name}/ready"): ("v2ModelReady", {200, 400, 404}),
    ("GET", "/v2/models/{name}/versions/{version}/ready"): ("v2ModelVersionReady", {200, 400, 404}),
    ("GET", "/v2/models/{name}"): ("v2ModelMetadata", {200, 404, 503}),
    ("GET", "/v2/models/{name}/versions/{version}"): ("v2ModelVersionMetadata", {200, 404, 503}),
    ("GET", "/v2/models/{name}/config"): ("v2ModelConfig", {200, 404, 503}),
    ("GET", "/v2/models/{name}/versions/{version}/config"): ("v2ModelVersionConfig", {200, 404, 503}),
    ("POST", "/v2/repository/index"): ("v2RepositoryIndex", {200}),
    ("POST", "/v2/models/{name}/infer"): ("v2ModelInfer", {200, 400, 401, 404, 413, 415, 503}),
    ("POST", "/v2/models/{name}/versions/{version}/infer"): (
        "v2ModelVersionInfer",
        {200, 400, 401, 404, 413, 415, 503},
    ),
}

#: Routes whose 400 (not ready) and 200 are empty bodies, as the protocol says.
EMPTY_BODIES = {"v2ServerLive", "v2ServerReady", "v2ModelReady", "v2ModelVersionReady"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return create_app(Settings(model_dir=MODEL_DIR, grpc_port=0)).openapi()


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in {"get", "post", "put", "delete", "patch"}
    }


def test_every_operation_has_a_readable_stable_operation_id(document: dict[str, Any]) -> None:
    documented = {key: op["operationId"] for key, op in operations(document).items()}
    assert documented == {key: operation_id for key, (operation_id, _) in OPERATIONS.items()}
    ids = list(documented.values())
    assert len(ids) == len(set(ids))
    for operation_id in ids:
        # lowerCamelCase words, never FastAPI's generated `predict_v1_predict_post`.
        assert operation_id.isalnum() and operation_id[0].islower(), operation_id


def test_each_route_documents_exactly_what_it_answers_with_its_apis_body(document: dict[str, Any]) -> None:
    for (method, path), operation in operations(document).items():
        operation_id, answers = OPERATIONS[(method, path)]
        responses = operation["responses"]
        assert {int(status) for status in responses} == answers, f"{operation_id}: {sorted(responses)}"
        for status, response in responses.items():
            content = response.get("content", {})
            if operation_id in EMPTY_BODIES and status in ("200", "400"):
                assert not content, f"{operation_id} {status} answers an empty body"
                continue
            if status.startswith("2"):
                assert content, f"{operation_id} {status} documents no body"
                continue
            expected = "ProtocolErrorBody" if path.startswith("/v2") else "ErrorBody"
            assert content == {"application/json": {"schema": {"$ref": f"#/components/schemas/{expected}"}}}, (
                f"{operation_id} {status}"
            )
            if status == "503":
                assert "Retry-After" in response["headers"], operation_id
            if status == "401":
                assert "WWW-Authenticate" in response["headers"], operation_id
    # FastAPI's own 422 body is answered by no route: it is gone, with its schemas.
    assert "HTTPValidationError" not in str(document) and "ValidationError" not in document["components"]["schemas"]


def test_the_description_names_what_the_server_answers_before_any_route(document: dict[str, Any]) -> None:
    description = document["info"]["description"]
    for answer in ("431", "408", "413", "503", "Retry-After", "MNIST_SERVE_MAX_HEADER_BYTES", '{"error": "message"}'):
        assert answer in description, answer


def test_inference_bodies_are_documented(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    infer = operations(document)[("POST", "/v2/models/{name}/infer")]
    assert infer["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InferRequest"
    }
    assert set(infer["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
    assert {"model_name", "model_version", "outputs"} <= set(schemas["InferResponse"]["required"])
    parameters = {p["name"]: p for p in infer["parameters"]}
    assert parameters["Inference-Header-Content-Length"]["in"] == "header"


# --- every documented status, provoked ------------------------------------------------------------------------


@dataclass
class Apps:
    """Three running apps: ready, ready with an API key (and a reload that can be made to fail), still loading."""

    ready: TestClient
    keyed: TestClient
    loading: TestClient
    reload_fails: list[bool] = field(default_factory=lambda: [False])


@pytest.fixture(scope="module")
def apps(classifier: OnnxClassifier) -> Iterator[Apps]:
    release = threading.Event()

    def slow_loader(_settings: object) -> Any:
        release.wait(30)
        raise ModelLoadError("released at teardown")

    base: dict[str, Any] = {"model_dir": MODEL_DIR, "model_name": MODEL, "access_log": False, "grpc_port": 0}
    base["max_batch_items"] = 4  # small, so that a batch over it is cheap to send
    reload_fails = [False]

    def keyed_loader(settings: Settings) -> Any:
        from service.main import default_loader

        if reload_fails[0]:
            raise ModelLoadError("this reload was made to fail")
        return default_loader(settings)

    clients = [
        TestClient(create_app(Settings(**base), classifier), raise_server_exceptions=False),
        TestClient(
            create_app(Settings(**base, api_key=KEY), classifier, loader=keyed_loader), raise_server_exceptions=False
        ),
        TestClient(create_app(Settings(**base), None, loader=slow_loader), raise_server_exceptions=False),
    ]
    for client in clients:
        client.__enter__()
    try:
        yield Apps(*clients, reload_fails=reload_fails)
    finally:
        release.set()
        for client in reversed(clients):
            client.__exit__(None, None, None)


PIXELS = [[0] * 28] * 28
DIGIT = {"pixels": [[0] * 12 + [255] * 4 + [0] * 12] * 28}
TENSOR = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}]}
AUTH = {"X-API-Key": KEY}


@dataclass(frozen=True)
class Provoke:
    app: str  # "ready", "keyed" or "loading"
    path: str  # the concrete path
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    before: Callable[[Apps], None] | None = None


def _fail_next_reload(apps: Apps) -> None:
    apps.reload_fails[0] = True


def _reload_works(apps: Apps) -> None:
    apps.reload_fails[0] = False


def _infer(version: str | None) -> dict[int, Provoke]:
    path = f"/v2/models/{MODEL}" + (f"/versions/{VERSION}" if version else "") + "/infer"
    unknown = "/v2/models/nope/infer" if not version else f"/v2/models/{MODEL}/versions/0.0.0/infer"
    return {
        200: Provoke("ready", path, TENSOR),
        400: Provoke(
            "ready", path, {"inputs": [{"name": "input", "shape": [1, 5], "datatype": "FP32", "data": [0] * 5}]}
        ),
        401: Provoke("keyed", path, TENSOR),
        404: Provoke("ready", unknown, TENSOR),
        413: Provoke("ready", path, {"inputs": [{**TENSOR["inputs"][0], "shape": [5, 784], "data": [0.5] * 3920}]}),
        415: Provoke("ready", path, content=b"{}", headers={"content-encoding": "gzip"}),
        503: Provoke("loading", path, TENSOR),
    }


def _metadata(suffix: str) -> dict[str, dict[int, Provoke]]:
    return {
        f"/v2/models/{{name}}{suffix}": {
            200: Provoke("ready", f"/v2/models/{MODEL}{suffix}"),
            404: Provoke("ready", f"/v2/models/nope{suffix}"),
            503: Provoke("loading", f"/v2/models/{MODEL}{suffix}"),
        },
        f"/v2/models/{{name}}/versions/{{version}}{suffix}": {
            200: Provoke("ready", f"/v2/models/{MODEL}/versions/{VERSION}{suffix}"),
            404: Provoke("ready", f"/v2/models/{MODEL}/versions/0.0.0{suffix}"),
            503: Provoke("loading", f"/v2/models/{MODEL}/versions/{VERSION}{suffix}"),
        },
    }


def _predict(path: str, body: dict[str, Any], too_large: dict[str, Any]) -> dict[int, Provoke]:
    return {
        200: Provoke("ready", path, body),
        401: Provoke("keyed", path, body),
        404: Provoke("ready", f"{path}?model=nope", body),
        413: Provoke("ready", path, too_large),
        415: Provoke("ready", path, content=b"pixels", headers={"content-type": "text/plain"}),
        422: Provoke("ready", path, {"pixels": [[0] * 27] * 28}),
        503: Provoke("loading", path, body),
    }


#: How to make each route give each status it documents; a status left out says why in NOT_PROVOKED.
REQUESTS: dict[str, dict[int, Provoke]] = {
    "/healthz": {200: Provoke("ready", "/healthz")},
    "/readyz": {200: Provoke("ready", "/readyz"), 503: Provoke("loading", "/readyz")},
    "/v1/models": {200: Provoke("ready", "/v1/models")},
    "/metrics": {200: Provoke("ready", "/metrics")},
    "/v1/predict": _predict("/v1/predict", DIGIT, {"pixels": [[] for _ in range(200)]}),
    "/v1/predict/batch": _predict("/v1/predict/batch", {"items": [DIGIT]}, {"items": [DIGIT] * 5}),
    "/v1/admin/reload": {
        200: Provoke("keyed", "/v1/admin/reload", headers=AUTH, before=_reload_works),
        401: Provoke("keyed", "/v1/admin/reload"),
        403: Provoke("ready", "/v1/admin/reload"),
        500: Provoke("keyed", "/v1/admin/reload", headers=AUTH, before=_fail_next_reload),
    },
    "/v2": {200: Provoke("ready", "/v2")},
    "/v2/health/live": {200: Provoke("ready", "/v2/health/live")},
    "/v2/health/ready": {200: Provoke("ready", "/v2/health/ready"), 400: Provoke("loading", "/v2/health/ready")},
    "/v2/models/{name}/ready": {
        200: Provoke("ready", f"/v2/models/{MODEL}/ready"),
        400: Provoke("loading", f"/v2/models/{MODEL}/ready"),
        404: Provoke("ready", "/v2/models/nope/ready"),
    },
    "/v2/models/{name}/versions/{version}/ready": {
        200: Provoke("ready", f"/v2/models/{MODEL}/versions/{VERSION}/ready"),
        400: Provoke("loading", f"/v2/models/{MODEL}/versions/{VERSION}/ready"),
        404: Provoke("ready", f"/v2/models/{MODEL}/versions/0.0.0/ready"),
    },
    **_metadata(""),
    **_metadata("/config"),
    "/v2/repository/index": {200: Provoke("ready", "/v2/repository/index")},
    "/v2/models/{name}/infer": _infer(None),
    "/v2/models/{name}/versions/{version}/infer": _infer(VERSION),
}

#: Documented statuses this test cannot provoke in-process, and where they are tested instead.
NOT_PROVOKED = {
    ("/v1/admin/reload", 503): "only during a shutdown: test_repository.py overlaps a reload with one (ModelNotReady)",
}

CASES = [
    (method, path, status)
    for (method, path), (_, answers) in OPERATIONS.items()
    for status in sorted(answers)
    if (path, status) not in NOT_PROVOKED
]


def test_every_documented_status_is_provoked_or_excused() -> None:
    for (_, path), (operation_id, answers) in OPERATIONS.items():
        provoked = set(REQUESTS[path]) | {status for p, status in NOT_PROVOKED if p == path}
        assert provoked == answers, operation_id


@pytest.mark.parametrize(("method", "path", "status"), CASES, ids=[f"{m} {p} {s}" for m, p, s in CASES])
def test_each_documented_status_is_answered_as_documented(
    apps: Apps, document: dict[str, Any], method: str, path: str, status: int
) -> None:
    provoke = REQUESTS[path][status]
    if provoke.before is not None:
        provoke.before(apps)
    client: TestClient = getattr(apps, provoke.app)
    if provoke.app == "loading":
        assert client.get("/readyz").status_code == 503, "the loading app must still be loading"
    kwargs: dict[str, Any] = {"headers": provoke.headers}
    if provoke.json is not None:
        kwargs["json"] = provoke.json
    elif provoke.content is not None:
        kwargs["content"] = provoke.content
    response = client.request(method, provoke.path, **kwargs)
    assert response.status_code == status, response.text[:500]

    documented = document["paths"][path][method.lower()]["responses"][str(status)]
    content = documented.get("content", {})
    if not content:
        assert response.content == b"", "documented as an empty body"
    else:
        media_type = response.headers["content-type"].split(";")[0].strip()
        assert media_type in content, (media_type, list(content))
        if media_type == "application/json":
            schema = {**content[media_type]["schema"], "components": document["components"]}
            jsonschema.validate(response.json(), schema)
    if status >= 400:  # Retry-After on 503, WWW-Authenticate on 401 (200's binary-output header is conditional)
        for header in documented.get("headers", {}):
            assert header in response.headers, header


def test_the_documents_examples_name_the_shipped_version(document: dict[str, Any]) -> None:
    """Swagger UI's "try it out" and schemathesis start from the examples: a stale version would only ever 404."""
    examples = [
        param["schema"]["examples"]
        for path in document["paths"].values()
        for op in path.values()
        for param in op.get("parameters", [])
        if param["name"] == "version" and param["in"] == "path"
    ]
    examples += [
        prop["examples"]
        for component in document["components"]["schemas"].values()
        for name, prop in component.get("properties", {}).items()
        if name in ("version", "model_version", "versions") and "examples" in prop
    ]
    assert len(examples) >= 5 and all(VERSION in str(e) for e in examples), examples
