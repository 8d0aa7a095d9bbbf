"""The model repository: every model and version in a directory, requests naming a version, reload without loss.

Repositories are built in tmp_path from the committed model (same ONNX bytes, cards differing only in version),
so every card's sha256 is checked for real. Versions 7.0.0 and 10.0.0 sit beside the committed flat model.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import LiveServer
from fastapi.testclient import TestClient
from repository_helpers import MODEL_NAME, add_version, committed_card, flat_repository
from service_helpers import metric, pixels_payload, png_bytes

from service.batching import MicroBatcher
from service.errors import ModelNotReady
from service.metrics import ServiceMetrics
from service.model import ModelLoadError, OnnxClassifier, find_models, load_repository, scan_models, version_key
from service.repository import ModelSet, ServedModel

ClientFactory = Callable[..., TestClient]
StartServer = Callable[..., LiveServer]
KEY = "admin-key-for-the-tests-0123456789"
AUTH = {"X-API-Key": KEY}
BLANK = {"pixels": [[0] * 28] * 28}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = flat_repository(tmp_path / "models")
    add_version(root, MODEL_NAME, "7.0.0")
    add_version(root, MODEL_NAME, "10.0.0")
    return root


def served_version(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    version: str = response.json()["model"]["version"]
    return version


# --- scanning ----------------------------------------------------------------------------------------------


def test_versions_sort_numerically_with_pre_releases_first() -> None:
    versions = ["10.0.0", "2", "1.0.0", "abc", "1.0.0-rc1", "0.0.1-temporary", "2.0.0", "1.10.0", "1.9.0"]
    ordered = ["abc", "0.0.1-temporary", "1.0.0-rc1", "1.0.0", "1.9.0", "1.10.0", "2", "2.0.0", "10.0.0"]
    assert sorted(versions, key=version_key) == ordered


def test_scan_finds_both_layouts_and_skips_what_is_not_a_model(repo: Path) -> None:
    shutil.copyfile(repo / f"{MODEL_NAME}.onnx", repo / "digits-small.onnx")
    (repo / "digits-small.json").write_text(json.dumps({**committed_card(), "name": "digits-small"}))
    (repo / "evaluation.json").write_text("{}")  # a JSON file without its ONNX is not a card
    (repo / "orphan.onnx").write_bytes(b"no card, not served")
    hidden = add_version(repo, MODEL_NAME, "99.0.0")
    hidden.rename(repo / ".incoming")  # staged, not yet in place
    found = [m.key for m in find_models(repo)]
    committed = committed_card()["version"]
    assert found == [
        ("digits-small", committed),
        (MODEL_NAME, committed),
        (MODEL_NAME, "7.0.0"),
        (MODEL_NAME, "10.0.0"),
    ]
    loaded = load_repository(repo, warm_up=False)
    assert [(c.name, c.version) for c in loaded.classifiers] == found and loaded.problems == []
    assert len({c.sha256 for c in loaded.classifiers}) == 1  # the same bytes, verified against every card


@pytest.mark.parametrize(
    ("breakage", "where", "message"),
    [
        ("version_dir", f"{MODEL_NAME}/8.0.0/{MODEL_NAME}.json", "directories must be <name>/<version>/"),
        ("duplicate", f"{MODEL_NAME}/7.0.0/{MODEL_NAME}.json", "also claimed by copy.json"),
        ("bad_card", f"{MODEL_NAME}/10.0.0/{MODEL_NAME}.json", "not readable JSON"),
        ("no_onnx", f"{MODEL_NAME}/10.0.0/{MODEL_NAME}.json", f"its model file {MODEL_NAME}.onnx is missing"),
    ],
)
def test_scan_reports_an_ambiguous_or_broken_version_and_keeps_the_rest(
    repo: Path, breakage: str, where: str, message: str
) -> None:
    if breakage == "version_dir":
        (repo / MODEL_NAME / "7.0.0").rename(repo / MODEL_NAME / "8.0.0")  # card still says 7.0.0
    elif breakage == "duplicate":  # a flat copy whose card also says mnist-cnn 7.0.0
        shutil.copyfile(repo / f"{MODEL_NAME}.onnx", repo / "copy.onnx")
        (repo / "copy.json").write_text(json.dumps({**committed_card(), "version": "7.0.0"}))
    elif breakage == "bad_card":
        (repo / MODEL_NAME / "10.0.0" / f"{MODEL_NAME}.json").write_text("{not json")
    else:
        (repo / MODEL_NAME / "10.0.0" / f"{MODEL_NAME}.onnx").unlink()
    scan = scan_models(repo)
    assert [p.where for p in scan.problems] == [where] and message in scan.problems[0].reason
    assert str(repo) not in str(scan.problems[0])  # relative paths only: problems are shown to clients
    assert (MODEL_NAME, committed_card()["version"]) in [m.key for m in scan.models]
    with pytest.raises(ModelLoadError, match=message):
        find_models(repo)


def test_loading_an_empty_or_missing_directory_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no servable models in"):
        load_repository(tmp_path)
    with pytest.raises(ModelLoadError, match="not found"):
        load_repository(tmp_path / "absent")


def test_a_corrupt_version_is_left_out_of_the_load_and_reported(repo: Path) -> None:
    (repo / MODEL_NAME / "7.0.0" / f"{MODEL_NAME}.onnx").write_bytes(b"\0" * 64)
    loaded = load_repository(repo, warm_up=False)
    assert "7.0.0" not in [c.version for c in loaded.classifiers] and len(loaded.classifiers) == 2
    (problem,) = loaded.problems
    assert problem.where == f"{MODEL_NAME}/7.0.0/{MODEL_NAME}.json" and "sha256" in problem.reason


def test_a_broken_non_default_model_at_start_leaves_the_rest_serving(make_client: ClientFactory, repo: Path) -> None:
    """A corrupt second model must not take the service down, nor show absolute paths to anyone."""
    broken = add_version(repo, "other-model", "1.0.0")
    (broken / "other-model.onnx").write_bytes(b"\0" * 64)
    client = make_client(model=None, model_dir=repo)
    wait_ready(client)
    listed = client.get("/v1/models").json()
    assert [m["name"] for m in listed["models"]] == [MODEL_NAME] * 3
    assert listed["problems"] == [f"other-model/1.0.0/other-model.json: {listed['problems'][0].split(': ', 1)[1]}"]
    assert "sha256" in listed["problems"][0]
    for path in ("/healthz", "/readyz", "/v1/models"):
        assert str(repo) not in client.get(path).text and "/tmp" not in client.get(path).text
    assert metric(client.get("/metrics").text, "mnist_serve_model_problems") == 1
    assert served_version(client.post("/v1/predict", json=BLANK)) == "10.0.0"


# --- serving several versions ------------------------------------------------------------------------------


def test_every_version_is_listed_and_requests_name_one(make_client: ClientFactory, repo: Path) -> None:
    client = make_client(model=None, model_dir=repo)
    wait_ready(client)
    committed = committed_card()["version"]
    listed = client.get("/v1/models").json()["models"]
    assert [(m["name"], m["version"], m["default"]) for m in listed] == [
        (MODEL_NAME, "10.0.0", True),  # the highest version is the default, listed first
        (MODEL_NAME, committed, False),
        (MODEL_NAME, "7.0.0", False),
    ]
    assert all(m["ready"] and m["sha256"] == committed_card()["onnx"]["sha256"] for m in listed)
    assert client.get("/readyz").json()["model"] == {"name": MODEL_NAME, "version": "10.0.0"}
    assert served_version(client.post("/v1/predict", json=BLANK)) == "10.0.0"
    assert served_version(client.post("/v1/predict?version=7.0.0", json=BLANK)) == "7.0.0"
    assert served_version(client.post(f"/v1/predict?model={MODEL_NAME}&version={committed}", json=BLANK)) == committed
    batch = client.post("/v1/predict/batch?version=7.0.0", json={"items": [BLANK, BLANK]})
    assert served_version(batch) == "7.0.0"
    files = {"file": ("blank.png", png_of_a_stroke(), "image/png")}
    assert served_version(client.post("/v1/predict?version=7.0.0", files=files)) == "7.0.0"
    for query, wanted in (("model=nope", "'nope'"), ("version=9.9.9", "'9.9.9'")):
        missing = client.post(f"/v1/predict?{query}", json=BLANK)
        assert missing.status_code == 404, missing.text
        assert missing.json()["error"]["code"] == "model_not_found" and wanted in missing.json()["error"]["message"]
    text = client.get("/metrics").text
    assert metric(text, "mnist_serve_models_served") == 3
    info = [line for line in text.splitlines() if line.startswith("mnist_serve_model_info{")]
    assert len(info) == 3 and 'version="10.0.0"' in next(line for line in info if 'default="true"' in line)


def test_the_default_version_can_be_pinned(make_client: ClientFactory, repo: Path) -> None:
    client = make_client(model=None, model_dir=repo, model_version="7.0.0")
    wait_ready(client)
    assert served_version(client.post("/v1/predict", json=BLANK)) == "7.0.0"
    assert served_version(client.post("/v1/predict?version=10.0.0", json=BLANK)) == "10.0.0"
    pinned_to_nothing = make_client(model=None, model_dir=repo, model_version="3.0.0")
    error = wait_for_status(pinned_to_nothing, "/readyz", 503).json()["error"]
    while error["code"] != "model_load_failed":
        error = pinned_to_nothing.get("/readyz").json()["error"]
    assert "no servable version '3.0.0'" in error["message"]
    assert pinned_to_nothing.get("/healthz").status_code == 200


# --- reload ------------------------------------------------------------------------------------------------


def test_admin_reload_is_refused_without_a_configured_key(make_client: ClientFactory, repo: Path) -> None:
    client = make_client(model=None, model_dir=repo)
    wait_ready(client)
    refused = client.post("/v1/admin/reload", headers=AUTH)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_disabled"
    assert "MNIST_SERVE_API_KEY" in refused.json()["error"]["message"]
    keyed = make_client(model=None, model_dir=repo, api_key=KEY)
    wait_ready(keyed)
    assert keyed.post("/v1/admin/reload").status_code == 401
    assert keyed.post("/v1/admin/reload", headers={"X-API-Key": "x" * 32}).status_code == 401


def test_reload_picks_up_new_versions_and_a_bad_reload_keeps_the_old_set(
    make_client: ClientFactory, repo: Path
) -> None:
    client = make_client(model=None, model_dir=repo, api_key=KEY)
    wait_ready(client)
    add_version(repo, MODEL_NAME, "11.0.0")
    reloaded = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {KEY}"})
    assert reloaded.status_code == 200, reloaded.text
    body = reloaded.json()
    assert body["default"] == {"name": MODEL_NAME, "version": "11.0.0"} and len(body["models"]) == 4
    assert served_version(client.post("/v1/predict", json=BLANK, headers=AUTH)) == "11.0.0"

    # A corrupt new version: the reload fails, says why, and the previous set goes on serving.
    broken = add_version(repo, MODEL_NAME, "12.0.0")
    (broken / f"{MODEL_NAME}.onnx").write_bytes(b"\0" * 64)
    failed = client.post("/v1/admin/reload", headers=AUTH)
    assert failed.status_code == 500, failed.text
    error = failed.json()["error"]
    assert error["code"] == "reload_failed" and "sha256" in error["message"] and "previous" in error["message"]
    assert f"{MODEL_NAME}/12.0.0/{MODEL_NAME}.json" in error["message"] and str(repo) not in error["message"]
    assert served_version(client.post("/v1/predict", json=BLANK, headers=AUTH)) == "11.0.0"
    listed = client.get("/v1/models").json()
    assert len(listed["models"]) == 4 and "sha256" in listed["last_reload_error"]
    assert client.get("/readyz").status_code == 200

    # A served version whose ONNX file disappears: not dropped silently, the reload fails and says so.
    shutil.rmtree(broken)
    (repo / MODEL_NAME / "7.0.0" / f"{MODEL_NAME}.onnx").unlink()
    vanished = client.post("/v1/admin/reload", headers=AUTH)
    assert vanished.status_code == 500 and f"its model file {MODEL_NAME}.onnx is missing" in vanished.text
    assert "7.0.0" in client.get("/v1/models").json()["last_reload_error"]

    # The default model gone from the directory: refused too.
    for path in repo.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    add_version(repo, "another-model", "1.0.0")
    gone = client.post("/v1/admin/reload", headers=AUTH)
    assert gone.status_code == 500 and f"default model '{MODEL_NAME}' is not servable" in gone.text
    assert served_version(client.post("/v1/predict", json=BLANK, headers=AUTH)) == "11.0.0"

    text = client.get("/metrics").text
    assert metric(text, "mnist_serve_reloads_total", result="ok") == 1
    assert metric(text, "mnist_serve_reloads_total", result="failed") == 3


def test_reload_recovers_a_service_whose_first_load_failed(make_client: ClientFactory, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    client = make_client(model=None, model_dir=repo, api_key=KEY)
    deadline = time.monotonic() + 10
    while wait_for_status(client, "/readyz", 503).json()["error"]["code"] != "model_load_failed":
        assert time.monotonic() < deadline
    flat_repository(repo)
    assert client.post("/v1/admin/reload", headers=AUTH).status_code == 200
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    assert client.post("/v1/predict", json=BLANK, headers=AUTH).status_code == 200


def test_a_retiring_set_waits_for_its_leases_before_stopping(classifier: OnnxClassifier) -> None:
    """A request that resolved its model before a swap, but has not reached the batcher yet, is still served."""
    images = np.zeros((1, 28, 28, 1), dtype=np.float32)

    async def scenario() -> None:
        metrics = ServiceMetrics().for_model(MODEL_NAME, "x")
        runner = MicroBatcher(classifier.predict, max_wait_s=0)
        models = ModelSet([ServedModel(classifier, runner, metrics)], MODEL_NAME)
        await models.start()
        with models.lease():
            retiring = asyncio.create_task(models.stop(5.0))
            await asyncio.sleep(0.1)
            assert not retiring.done() and models.leases == 1
            assert (await runner.predict(images)).shape == (1, 10)  # still admitted: the lease holds the set open
        await asyncio.wait_for(retiring, 5.0)
        with pytest.raises(ModelNotReady):
            await runner.predict(images)

        # A lease held past the timeout does not block the drain for ever.
        late = MicroBatcher(classifier.predict, max_wait_s=0)
        stuck = ModelSet([ServedModel(classifier, late, metrics)], MODEL_NAME)
        await stuck.start()
        with stuck.lease():
            started = time.monotonic()
            await stuck.stop(0.2)
            assert time.monotonic() - started < 2

    asyncio.run(scenario())


# --- reload under load, over real HTTP ----------------------------------------------------------------------

IN_FLIGHT = 12


def held_server(live_server: StartServer, repo: Path) -> LiveServer:
    # A one-second gathering window keeps requests waiting inside the old batchers while the reload happens.
    env = {
        "MNIST_SERVE_MODEL_DIR": str(repo),
        "MNIST_SERVE_API_KEY": KEY,
        "MNIST_SERVE_MAX_WAIT_MS": "1000",
        "MNIST_SERVE_MAX_BATCH_SIZE": "1024",
    }
    return live_server(env=env)


async def requests_held_across(server: LiveServer, x: np.ndarray, swap: Callable[[], Any]) -> list[httpx.Response]:
    """Send IN_FLIGHT /v1 and /v2 requests, ``swap()`` while some of them sit in the old batchers, collect them all.

    The gathering window is one second from the first arrival: on a busy machine the first requests may be answered
    before the last ones arrive. So the swap waits until every request is either answered or queued, with at least
    one still queued; if all were answered first (nothing held: the test would prove nothing), they are sent again.
    """
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=AUTH) as http:
        for _attempt in range(3):
            pending = []
            for i in range(IN_FLIGHT):
                if i % 2:
                    data = (x[i].reshape(-1) / 255.0).tolist()
                    v2_body = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": data}]}
                    pending.append(asyncio.ensure_future(http.post(f"/v2/models/{MODEL_NAME}/infer", json=v2_body)))
                else:
                    pending.append(asyncio.ensure_future(http.post("/v1/predict", json=pixels_payload(x[i]))))
            deadline = time.monotonic() + 10
            while True:
                depth = metric((await http.get("/metrics")).text, "mnist_serve_queue_depth")
                answered = sum(p.done() for p in pending)
                if depth >= 1 and depth + answered >= IN_FLIGHT:
                    swapped = swap()
                    if asyncio.iscoroutine(swapped):
                        await swapped
                    return list(await asyncio.gather(*pending))
                if answered == IN_FLIGHT:
                    break  # all answered before the swap: send them again
                assert time.monotonic() < deadline, f"requests never queued: depth {depth}, {answered} answered"
                await asyncio.sleep(0.01)
    raise AssertionError("three times, every request was answered before any could be held across the swap")


def check_answered_by_the_old_set(responses: list[httpx.Response], y: np.ndarray) -> None:
    """Every request answered 200, by the set it was admitted to, with the right digit (a 99% model: one slip)."""
    assert [r.status_code for r in responses] == [200] * IN_FLIGHT, [r.text for r in responses]
    digits = []
    for i, response in enumerate(responses):
        body = response.json()
        if i % 2:
            assert (body["model_name"], body["model_version"]) == (MODEL_NAME, "10.0.0")
            digits.append(next(o for o in body["outputs"] if o["name"] == "digit")["data"][0])
        else:
            assert body["model"]["version"] == "10.0.0"
            digits.append(body["digit"])
    assert np.sum(np.array(digits) == y[:IN_FLIGHT]) >= IN_FLIGHT - 1


def test_admin_reload_answers_every_request_in_flight(live_server: StartServer, repo: Path, mnist_test: tuple) -> None:
    server = held_server(live_server, repo)
    x, y = mnist_test
    add_version(repo, MODEL_NAME, "11.0.0")
    reload: dict[str, httpx.Response] = {}

    async def swap() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            reload["response"] = await http.post("/v1/admin/reload", headers=AUTH)

    responses = asyncio.run(requests_held_across(server, x, swap))
    check_answered_by_the_old_set(responses, y)
    assert reload["response"].status_code == 200 and reload["response"].json()["default"]["version"] == "11.0.0"
    after = httpx.post(f"{server.url}/v1/predict", json=pixels_payload(x[0]), headers=AUTH, timeout=10)
    assert served_version(after) == "11.0.0" and after.json()["digit"] == y[0]
    assert server.stop() == 0
    assert "drained the previous model set" in server.log() and "Traceback" not in server.log()


def test_sighup_reloads_without_dropping_requests_and_a_bad_one_changes_nothing(
    live_server: StartServer, repo: Path, mnist_test: tuple
) -> None:
    server = held_server(live_server, repo)
    x, y = mnist_test
    add_version(repo, MODEL_NAME, "11.0.0")
    responses = asyncio.run(requests_held_across(server, x, lambda: server.process.send_signal(signal.SIGHUP)))
    check_answered_by_the_old_set(responses, y)
    wait_for_default(server, "11.0.0")

    broken = add_version(repo, MODEL_NAME, "12.0.0")
    (broken / f"{MODEL_NAME}.onnx").write_bytes(b"\0" * 64)
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while metric(httpx.get(f"{server.url}/metrics").text, "mnist_serve_reloads_total", result="failed") < 1:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    after = httpx.post(f"{server.url}/v1/predict", json=pixels_payload(x[1]), headers=AUTH, timeout=10)
    assert served_version(after) == "11.0.0" and after.json()["digit"] == y[1]
    assert server.process.poll() is None  # SIGHUP never kills it
    assert server.stop() == 0
    log = server.log()
    assert "reload failed, still serving" in log and "sha256" in log


# --- helpers -----------------------------------------------------------------------------------------------


def png_of_a_stroke() -> bytes:
    image = np.zeros((28, 28), dtype=np.uint8)
    image[8:20, 13:15] = 255  # a stroke: a blank image is refused
    return png_bytes(image)


def wait_ready(client: TestClient, timeout_s: float = 30) -> None:
    wait_for_status(client, "/readyz", 200, timeout_s)


def wait_for_status(client: TestClient, path: str, status: int, timeout_s: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while (response := client.get(path)).status_code != status:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.02)
    return response


def wait_for_default(server: LiveServer, version: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{server.url}/readyz", timeout=5).json()["model"]["version"] != version:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)


def test_a_slow_upload_does_not_hold_up_a_reload(live_server: StartServer, repo: Path, mnist_test: tuple) -> None:
    """The model is leased around the run, not while the body trickles in: the reload is prompt, the upload served."""
    import socket

    server = live_server(env={"MNIST_SERVE_MODEL_DIR": str(repo), "MNIST_SERVE_API_KEY": KEY})
    x, y = mnist_test
    body = json.dumps(pixels_payload(x[0])).encode()
    add_version(repo, MODEL_NAME, "11.0.0")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as slow:
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: {KEY}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        slow.sendall(head + body[:10])
        time.sleep(0.3)  # the request is admitted and waiting for the rest of its body
        start = time.monotonic()
        reload = httpx.post(f"{server.url}/v1/admin/reload", headers=AUTH, timeout=30)
        took = time.monotonic() - start
        slow.sendall(body[10:])
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
    assert reload.status_code == 200 and took < 5, f"reload took {took:.1f} s"
    status, _, payload = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200"), answer[:300]
    result = json.loads(payload)
    assert result["digit"] == y[0] and result["model"]["version"] == "11.0.0"
    assert server.stop() == 0


def test_a_shutdown_during_a_slow_reload_leaves_no_batcher_running(classifier: OnnxClassifier) -> None:
    """The reload finishing after shutdown began used to swap in a started set that nobody would ever stop."""
    from service.batching import MicroBatcher as Batcher
    from service.repository import ModelRepository
    from service.settings import Settings

    release = __import__("threading").Event()
    started: list[Batcher] = []

    def slow_loader(_settings: object) -> list[OnnxClassifier]:
        release.wait(10)
        return [classifier]

    def runner_for(model: OnnxClassifier, metrics: Any) -> Batcher:
        runner = Batcher(model.run, max_wait_s=0)
        started.append(runner)
        return runner

    async def scenario() -> None:
        settings = Settings(model_name=classifier.name, shutdown_timeout_s=0.5)
        repository = ModelRepository(settings, ServiceMetrics(), slow_loader, runner_for)
        await repository.start([classifier])
        first = repository.current
        reload = asyncio.create_task(repository.reload())
        await asyncio.sleep(0.05)  # the reload is loading
        stopping = asyncio.create_task(repository.stop(0.5))
        await asyncio.sleep(0.2)
        release.set()  # the load finishes while shutdown is under way
        await stopping
        with pytest.raises((ModelNotReady, asyncio.CancelledError)):
            await reload
        assert repository.current is first  # nothing was swapped in after shutdown began
        images = np.zeros((1, 28, 28, 1), dtype=np.float32)
        for runner in started:  # every batcher started, the old set's and any the reload made, is stopped
            with pytest.raises(ModelNotReady):
                await runner.predict(images)

    asyncio.run(scenario())
