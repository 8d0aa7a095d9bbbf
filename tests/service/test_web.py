"""The web page at / in a real browser: Debian's Chromium driven by Playwright, against a live ``mnist-serve``.

    .venv/bin/python -m pytest tests/service/test_web.py      # screenshots land in test-artifacts/web/

Chromium is the system one (/usr/bin/chromium); when it is missing and we run as root, it is installed with
apt-get once (quietly); Playwright never downloads a browser. Where it cannot be installed, these tests skip
and say why. The server is a real ``python -m service`` process serving the committed model; nothing here
hard-codes the model's accuracy: the page is checked against models/mnist-cnn.json.

Every answer carries a verdict, and the page says what it means: the digit (``digit``), "Not sure: 4 or 9?"
(``unsure``) or "That doesn't look like a digit" (``not_a_digit``). The inputs for the last two are checked
against the API first, so a test fails on what the page shows, not on what the model happens to answer.

docs/web-page.png is a copy of test-artifacts/web/desktop-after-drawing.png, docs/web-page-not-a-digit.png of
test-artifacts/web/desktop-not-a-digit.png.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import LiveServer, spawn_server
from PIL import Image, ImageDraw, ImageFont
from repository_helpers import MODEL_NAME, flat_repository

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "web"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Long enough for a cold start of the service and a first prediction on a busy 2-core machine.
TIMEOUT_MS = 30_000
#: MNIST test images drawn on the pad by tracing their skeletons: a 7, a 2, a 0, a 4, a 9, a 3.
TRACED = (0, 1, 3, 4, 7, 18)
#: MNIST test images given as photos: a 1, a 5, a 6, an 8.
UPLOADED = (2, 8, 11, 61)
API_KEY = "web-test-key-0123456789"
#: An MNIST test 9 that reads as 9 or 4 as a photo (mnist-cnn 1.2.0: 55 % 9, 44 % 4, ood_score 3.9 below its
#: not_a_digit line), and a card that answers ``unsure`` below 95 %: well clear of the line for any model that
#: finds this digit as ambiguous as people do. (Which digits are ambiguous moves with the model: test 9 #2414,
#: which 1.0.0 read as 53 % 9, 34 % 4, was 99 % 9 to 1.1.0, and #2293, 69 % 9 to 1.1.0, is 79 % 9 to 1.2.0 with
#: its ood_score only 0.9 below the line.)
AMBIGUOUS = 1232
STRICT_UNSURE_BELOW = 0.95
NOT_A_DIGIT = "That doesn't look like a digit"
#: A word photographed instead of a digit.
PHOTO_WORD = "cat"
#: How far past the card's ``not_a_digit_at_or_above`` the ``ood_score`` of a not-a-digit input must be (in
#: log-odds), so that another Chromium's anti-aliasing cannot move it across the line.
OOD_MARGIN = 2.0


def _loops() -> list[list[tuple[float, float]]]:
    """A scribble: a spring of five loops drawn across the pad in one stroke."""
    t = np.linspace(0, 10 * np.pi, 240)
    xs = 0.5 + np.linspace(-0.3, 0.3, t.size) + 0.13 * np.cos(t)
    ys = 0.5 + 0.2 * np.sin(t)
    return [[(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]]


#: Things people draw that are not one digit, as pen strokes in pad coordinates (0..1, y down).
NOT_DIGITS: dict[str, list[list[tuple[float, float]]]] = {
    "letter-W": [[(0.12, 0.22), (0.3, 0.8), (0.5, 0.35), (0.7, 0.8), (0.88, 0.22)]],
    "scribble": _loops(),
}


# ---------------------------------------------------------------------------------------------------------
# Chromium, the server, the browser


def _install_chromium() -> str | None:
    """Install Debian's chromium package if it is missing; None when it is there, else why it is not."""
    if CHROMIUM.exists():
        return None
    if shutil.which("apt-get") is None:
        return "Chromium is not installed at /usr/bin/chromium and there is no apt-get to install it"
    if os.geteuid() != 0:
        return "Chromium is not installed at /usr/bin/chromium; install it as root: apt-get install -y chromium"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
    attempts: list[subprocess.CompletedProcess[str]] = []
    # A fresh machine may have no package lists yet: update once only if the first attempt fails.
    for before in ([], [["apt-get", "update", "-qq"]]):
        for command in before:
            attempts.append(subprocess.run(command, env=env, capture_output=True, text=True, timeout=600))
        attempts.append(subprocess.run(install, env=env, capture_output=True, text=True, timeout=900))
        if attempts[-1].returncode == 0 and CHROMIUM.exists():
            return None
    tail = (attempts[-1].stderr or attempts[-1].stdout).strip().splitlines()[-3:]
    return "Chromium could not be installed with apt-get: " + " | ".join(tail)


@pytest.fixture(scope="module")
def chromium() -> str:
    reason = _install_chromium()
    if reason:
        pytest.skip(reason)
    return str(CHROMIUM)


@pytest.fixture(scope="module")
def server(chromium: str, module_live_server: Any) -> Any:
    """The service as users run it (``python -m service``), started only once a browser is at hand."""
    return module_live_server


@pytest.fixture(scope="module")
def strict_server(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The committed model behind a card that differs only in ``trust.verdict.unsure_below_confidence``.

    Same ONNX bytes (the card's sha256 still matches): the model answers exactly as shipped; only the line
    between ``digit`` and ``unsure`` moves, so an ambiguous digit is ``unsure`` whatever the shipped card says.
    """
    root = flat_repository(tmp_path_factory.mktemp("strict-models"))
    card_path = root / f"{MODEL_NAME}.json"
    card = json.loads(card_path.read_text())
    trust = card.get("trust") or {}
    verdict = trust.get("verdict") or {"ood_output": None, "not_a_digit_at_or_above": None}
    card["trust"] = {**trust, "verdict": {**verdict, "unsure_below_confidence": STRICT_UNSURE_BELOW}}
    card_path.write_text(json.dumps(card, indent=2))
    live = spawn_server(tmp_path_factory.mktemp("strict-server") / "server.log", {"MNIST_SERVE_MODEL_DIR": str(root)})
    try:
        live.wait_ready()
        yield live
    finally:
        if live.process.poll() is None:
            live.stop(timeout_s=15)


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class PageWatch:
    """Everything a page asked for and complained about, to assert on afterwards."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.requests: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: (
                self.errors.append(f"console {message.type}: {message.text}") if message.type == "error" else None
            ),
        )


def _open(browser: Any, url: str, **context: Any) -> PageWatch:
    # Reduced motion turns the bar transitions off, so screenshots show the final state.
    page = browser.new_context(reduced_motion="reduce", **context).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    watch = PageWatch(page)
    page.goto(url.rstrip("/") + "/")
    page.wait_for_selector("html[data-ready='true']")
    return watch


@pytest.fixture
def page(browser: Any, server: Any) -> Iterator[PageWatch]:
    watch = _open(browser, server.url, viewport={"width": 1100, "height": 900})
    yield watch
    watch.page.context.close()


# ---------------------------------------------------------------------------------------------------------
# Drawing like a person: trace a real MNIST digit's skeleton with the mouse


def thin(binary: np.ndarray) -> np.ndarray:
    """Zhang–Suen thinning: a boolean image → its one-pixel-wide skeleton."""
    image = np.pad(binary.astype(np.uint8), 1)
    offsets = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
    changed = True
    while changed:
        changed = False
        for step in (0, 1):
            n = [np.roll(image, (-dy, -dx), axis=(0, 1)) for dy, dx in offsets]
            neighbours = sum(n)
            transitions = sum(((n[i] == 0) & (n[(i + 1) % 8] == 1)).astype(np.uint8) for i in range(8))
            north, east, south, west = n[0], n[2], n[4], n[6]
            if step == 0:
                clear = (north * east * south == 0) & (east * south * west == 0)
            else:
                clear = (north * east * west == 0) & (north * south * west == 0)
            remove = (image == 1) & (neighbours >= 2) & (neighbours <= 6) & (transitions == 1) & clear
            if remove.any():
                image[remove] = 0
                changed = True
    return image[1:-1, 1:-1].astype(bool)


def pen_strokes(skeleton: np.ndarray) -> list[list[tuple[int, int]]]:
    """Skeleton pixels → polylines through neighbouring pixels (row, col), each one pen-down…pen-up."""
    points = {(int(r), int(c)) for r, c in np.argwhere(skeleton)}

    def neighbours(p: tuple[int, int]) -> list[tuple[int, int]]:
        r, c = p
        straight = [(r + dr, c + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)) if (r + dr, c + dc) in points]
        # A diagonal step only where no straight path joins the two pixels, to avoid little triangles.
        diagonal = [
            (r + dr, c + dc)
            for dr, dc in ((-1, -1), (-1, 1), (1, -1), (1, 1))
            if (r + dr, c + dc) in points and (r + dr, c) not in points and (r, c + dc) not in points
        ]
        return straight + diagonal

    edges = {frozenset((p, q)) for p in points for q in neighbours(p)}
    degree = {p: sum(1 for q in neighbours(p)) for p in points}
    strokes = [[p] for p in sorted(points) if degree[p] == 0]
    while edges:
        open_ends = sorted(p for p in points if any(frozenset((p, q)) in edges for q in neighbours(p)))
        line = [next((p for p in open_ends if degree[p] % 2 == 1), open_ends[0])]
        while True:
            step = next((q for q in neighbours(line[-1]) if frozenset((line[-1], q)) in edges), None)
            if step is None:
                break
            edges.discard(frozenset((line[-1], step)))
            line.append(step)
        strokes.append(line)
    return strokes


def smooth(stroke: list[tuple[int, int]], passes: int = 2) -> np.ndarray:
    """A pixel path → a smoother pen path (a hand does not move in one-pixel steps); the ends stay put."""
    path = np.asarray(stroke, dtype=np.float64)
    for _ in range(passes if len(path) > 2 else 0):
        path[1:-1] = 0.25 * path[:-2] + 0.5 * path[1:-1] + 0.25 * path[2:]
    return path


def draw_mnist_digit(page: Any, digit: np.ndarray) -> None:
    """Trace the digit's skeleton on the pad, scaled from 28×28 to the pad's size on screen."""
    box = page.locator("#pad").bounding_box()
    for stroke in pen_strokes(thin(digit > 100)):
        points = [
            (box["x"] + (c + 0.5) * box["width"] / 28, box["y"] + (r + 0.5) * box["height"] / 28)
            for r, c in smooth(stroke)
        ]
        page.mouse.move(*points[0])
        page.mouse.down()
        for point in points[1:]:
            page.mouse.move(*point, steps=2)
        page.mouse.up()


def draw_strokes(page: Any, strokes: list[list[tuple[float, float]]]) -> None:
    """Draw polylines given in pad coordinates (0..1) with the mouse, one pen-down…pen-up each."""
    box = page.locator("#pad").bounding_box()
    for stroke in strokes:
        points = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in stroke]
        page.mouse.move(*points[0])
        page.mouse.down()
        for point in points[1:]:
            page.mouse.move(*point, steps=4)
        page.mouse.up()


def photo_of(digit: np.ndarray, size: int = 220, fmt: str = "PNG") -> bytes:
    """A 28×28 MNIST digit as people would give it: dark ink on white paper, larger, off-centre."""
    ink = Image.fromarray(255 - digit).resize((size, size), Image.Resampling.BICUBIC)
    sheet = Image.new("L", (size + 90, size + 40), 255)
    sheet.paste(ink, (60, 15))
    buffer = io.BytesIO()
    sheet.save(buffer, format=fmt)
    return buffer.getvalue()


def wait_for_answer(page: Any) -> None:
    page.wait_for_selector("#result[data-state='done']")


def shown_digit(page: Any) -> int:
    return int(page.inner_text("#result-digit"))


def seen_image_pixels(page: Any) -> list[list[int]]:
    """The 28×28 'what the model saw' canvas as rows of grey levels."""
    flat: list[int] = page.evaluate(
        """() => {
            const c = document.getElementById('seen');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            return Array.from({ length: c.width * c.height }, (_, i) => d[i * 4]);
        }"""
    )
    return [flat[r * 28 : (r + 1) * 28] for r in range(28)]


def seen_image_ink(page: Any) -> float:
    """Mean brightness of the 28×28 'what the model saw' canvas (0 when nothing is shown)."""
    value: float = page.evaluate(
        """() => {
            const c = document.getElementById('seen');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let sum = 0;
            for (let i = 0; i < d.length; i += 4) sum += d[i];
            return sum / (d.length / 4) / 255;
        }"""
    )
    return value


def assert_full_answer(page: Any, expected: int) -> None:
    """Digit, confidence, ten bars with the best one marked, the seen image and the live summary all agree."""
    assert page.get_attribute("#result", "data-verdict") == "digit"
    assert page.locator("#result-headline").is_hidden()
    assert shown_digit(page) == expected
    confidence = page.inner_text("#result-confidence")
    assert confidence.endswith("%") and confidence != "–"
    values = page.locator("#bars .bar-value").all_inner_texts()
    assert len(values) == 10 and all(v.endswith("%") for v in values)
    assert page.locator("#bars .bar.best").get_attribute("data-digit") == str(expected)
    assert page.locator("#error").is_hidden()
    assert seen_image_ink(page) > 0.01, "the 28×28 image the model saw is not shown"
    assert f"reads {expected}" in page.inner_text("#result-summary")


def percent(p: float, digits: int = 1) -> str:
    """A probability as the page writes it (app.js ``percent``): never 100.0% or 0.0% unless it is."""
    step = 10.0**-digits
    value = p * 100
    if 0 < value < step:
        return f"<{step:.{digits}f}%"
    if 100 - step < value < 100:
        return f">{100 - step:.{digits}f}%"
    return f"{value:.{digits}f}%"


def api_answer(server: Any, image: bytes, return_image: bool = False) -> dict[str, Any]:
    """What the service answers for these image bytes, with the two most likely digits."""
    payload = {"image_base64": base64.b64encode(image).decode(), "top_k": 2, "return_image": return_image}
    response = httpx.post(f"{server.url}/v1/predict", json=payload, timeout=TIMEOUT_MS / 1000)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def upload(page: Any, name: str, image: bytes) -> Any:
    """Give the page ``image`` through its file input; the service's answer to the page's request."""
    with page.expect_response("**/v1/predict") as response:
        page.set_input_files("#file-input", files=[{"name": name, "mimeType": "image/png", "buffer": image}])
    wait_for_answer(page)
    assert response.value.status == 200
    return response.value.json()


def bar_values(page: Any) -> list[str]:
    values: list[str] = page.locator("#bars .bar-value").all_inner_texts()
    assert len(values) == 10 and all(v.endswith("%") for v in values), values
    return values


def shoot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


# ---------------------------------------------------------------------------------------------------------
# The tests


def test_page_loads_only_local_assets_and_shows_the_model_card(page: PageWatch, server: Any, model_card: dict) -> None:
    p = page.page
    expected_accuracy = f"{model_card['metrics']['test_accuracy'] * 100:.2f}%"
    p.wait_for_function("document.getElementById('model-accuracy').dataset.value !== undefined")
    assert p.inner_text("#model-name") == model_card["name"]
    assert p.inner_text("#model-version") == model_card["version"]
    assert p.inner_text("#model-accuracy") == expected_accuracy
    assert float(p.locator("#model-accuracy").get_attribute("data-value")) == pytest.approx(
        model_card["metrics"]["test_accuracy"]
    )
    assert p.title().startswith("mnist-serve")
    # The trust headline is shown exactly when the card has a trust section, with the card's figures.
    trust = model_card.get("trust") or {}
    assert p.locator("#model-trust-row").is_visible() == bool(trust)
    shown = p.inner_text("#model-trust") if trust else ""
    ece = (trust.get("calibration") or {}).get("test_after", {}).get("ece")
    if ece is not None:
        assert f"Calibrated (test ECE {percent(ece, 2)})" in shown, shown
    least = (trust.get("ood") or {}).get("held_out", {}).get("min_family_not_digit_rate")
    if least is not None:
        assert f"at least {percent(least)} of each kind" in shown, shown
    held_back = (trust.get("selective") or {}).get("test_digits_rejected")
    if held_back is not None:
        assert f"holds back {percent(held_back, 2)} of MNIST test digits" in shown, shown
    foreign = [url for url in page.requests if not url.startswith(server.url)]
    assert not foreign, f"the page fetched from elsewhere: {foreign}"
    assert not page.errors


def test_drawing_a_stroke_predicts_when_the_pen_lifts(page: PageWatch) -> None:
    """A single vertical stroke (a 1), no button pressed: lifting the pen asks the service."""
    p = page.page
    box = p.locator("#pad").bounding_box()
    x = box["x"] + box["width"] * 0.5
    with p.expect_response("**/v1/predict") as response:
        p.mouse.move(x, box["y"] + box["height"] * 0.2)
        p.mouse.down()
        p.mouse.move(x + box["width"] * 0.02, box["y"] + box["height"] * 0.8, steps=12)
        p.mouse.up()
    assert response.value.status == 200
    wait_for_answer(p)
    assert_full_answer(p, 1)
    assert not page.errors


@pytest.mark.parametrize("index", TRACED)
def test_drawing_a_real_mnist_digit_shows_the_right_answer(
    page: PageWatch, mnist_test: tuple[np.ndarray, np.ndarray], index: int
) -> None:
    images, labels = mnist_test
    p = page.page
    draw_mnist_digit(p, images[index])
    p.click("#predict-button")
    wait_for_answer(p)
    assert_full_answer(p, int(labels[index]))
    shoot(p, f"drawn-mnist-{index}-label-{labels[index]}")
    if index == TRACED[-1]:
        shoot(p, "desktop-after-drawing")
    p.click("#clear-button")
    assert p.inner_text("#result-digit") == "–"
    assert seen_image_ink(p) == 0
    assert not page.errors


@pytest.mark.parametrize("index", UPLOADED)
def test_uploading_a_photo_of_a_real_mnist_digit_shows_the_right_answer(
    page: PageWatch, mnist_test: tuple[np.ndarray, np.ndarray], index: int
) -> None:
    images, labels = mnist_test
    p = page.page
    name = f"mnist-test-{index}.png"
    with p.expect_response("**/v1/predict") as response:
        p.set_input_files(
            "#file-input", files=[{"name": name, "mimeType": "image/png", "buffer": photo_of(images[index])}]
        )
    wait_for_answer(p)
    assert_full_answer(p, int(labels[index]))
    # The image shown is exactly the one the service says its model saw.
    assert seen_image_pixels(p) == response.value.json()["image"]["pixels"]
    assert p.inner_text("#file-name") == name
    assert p.locator("#upload-preview").is_visible()
    shoot(p, f"uploaded-mnist-{index}-label-{labels[index]}")
    assert not page.errors


def test_dropping_a_jpeg_on_the_drop_zone_predicts_it(
    page: PageWatch, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = mnist_test
    index = 18
    p = page.page
    payload = base64.b64encode(photo_of(images[index], size=300, fmt="JPEG")).decode()
    transfer = p.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], 'scan.jpg', { type: 'image/jpeg' }));
            return transfer;
        }""",
        payload,
    )
    p.dispatch_event("#drop-zone", "dragenter", {"dataTransfer": transfer})
    assert "dragging" in (p.get_attribute("#drop-zone", "class") or "")
    p.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    wait_for_answer(p)
    assert_full_answer(p, int(labels[index]))
    assert p.inner_text("#file-name") == "scan.jpg"
    assert "inactive" in (p.get_attribute(".pad-frame", "class") or "")
    # Drawing again makes the pad the input once more, starting from a clean pad.
    draw_mnist_digit(p, images[TRACED[0]])
    p.click("#predict-button")
    wait_for_answer(p)
    assert shown_digit(p) == int(labels[TRACED[0]])
    assert p.inner_text("#file-name") == ""
    assert p.locator("#upload-preview").is_hidden()
    assert "inactive" not in (p.get_attribute(".pad-frame", "class") or "")
    assert not page.errors


def test_the_page_works_under_a_strict_content_security_policy(
    browser: Any, server: Any, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    """No inline script or style, no data: or blob: URLs: the service may send a strict CSP without breaking it."""
    images, labels = mnist_test
    policy = "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    context = browser.new_context(reduced_motion="reduce")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    violations: list[str] = []
    page.on("console", lambda message: violations.append(message.text) if "Content Security" in message.text else None)

    def with_policy(route: Any) -> None:
        response = route.fetch()
        route.fulfill(response=response, headers={**response.headers, "content-security-policy": policy})

    page.route(server.url + "/", with_policy)
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("html[data-ready='true']")
        page.set_input_files(
            "#file-input",
            files=[{"name": "digit.png", "mimeType": "image/png", "buffer": photo_of(images[UPLOADED[0]])}],
        )
        wait_for_answer(page)
        assert_full_answer(page, int(labels[UPLOADED[0]]))
        assert page.locator("#upload-preview").is_visible()
        assert not violations, violations
    finally:
        context.close()


def test_an_ambiguous_digit_is_shown_as_not_sure_between_two(
    browser: Any, strict_server: LiveServer, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    """An MNIST 9 that could be a 4, under a card that says ``unsure`` below 95 %: "Not sure: 9 or 4?"."""
    images, _ = mnist_test
    photo = photo_of(images[AMBIGUOUS])
    expected = api_answer(strict_server, photo)
    assert expected["verdict"] == "unsure", expected
    first, second = (c["digit"] for c in expected["top_k"])
    assert {first, second} == {4, 9}, expected["top_k"]

    watch = _open(browser, strict_server.url, viewport={"width": 1100, "height": 900})
    p = watch.page
    try:
        answer = upload(p, f"mnist-test-{AMBIGUOUS}.png", photo)
        assert answer["verdict"] == "unsure"
        assert p.get_attribute("#result", "data-verdict") == "unsure"
        headline = p.locator("#result-headline")
        assert headline.is_visible()
        assert headline.inner_text() == f"Not sure: {first} or {second}?"
        # Said in words (the live region), not only by the amber colour.
        summary = p.inner_text("#result-summary")
        assert summary.startswith(f"Not sure: {first} or {second}?")
        assert f"Most likely {first} ({p.inner_text('#bars .bar.best .bar-value')})" in summary
        assert p.get_attribute("#result-summary", "aria-live") == "polite"
        # The box shows both candidates, the bars stay, with both candidates marked.
        assert p.inner_text("#result-digit").split() == [str(first), "or", str(second)]
        assert p.locator("#confidence-line").is_visible()
        assert p.inner_text("#result-confidence").endswith("%")
        values = bar_values(p)
        assert p.locator("#bars .bar.best").get_attribute("data-digit") == str(first)
        assert sorted(p.locator("#bars .bar.candidate").evaluate_all("els => els.map(e => e.dataset.digit)")) == sorted(
            [str(first), str(second)]
        )
        assert float(values[first].rstrip("%")) > float(values[second].rstrip("%"))
        assert seen_image_ink(p) > 0.01
        # The card has a trust section now: its headline shows with the card info.
        p.wait_for_selector("#model-trust-row:not([hidden])")
        assert p.inner_text("#model-trust").strip()
        shoot(p, "desktop-unsure")
        # Clearing forgets the verdict: no headline, no marked candidates.
        p.click("#clear-button")
        assert p.get_attribute("#result", "data-verdict") is None
        assert p.locator("#result-headline").is_hidden()
        assert p.locator("#bars .bar.candidate").count() == 0
        assert not watch.errors
    finally:
        p.context.close()


def not_a_digit_threshold(model_card: dict[str, Any]) -> float:
    """The shipped card's ``not_a_digit_at_or_above``; skips when the shipped model has no OOD output."""
    verdict = (model_card.get("trust") or {}).get("verdict") or {}
    if verdict.get("ood_output") is None:
        pytest.skip("the shipped model has no out-of-distribution output: it never answers not_a_digit")
    return float(verdict["not_a_digit_at_or_above"])


def ood_score(classifier: Any, pixels: list[list[int]]) -> float:
    """The shipped model's ``ood_score`` for the 28×28 image the service says it saw."""
    x = np.asarray(pixels, dtype=np.float32)[None, :, :, None] / 255.0
    return float(classifier.scores(x)[0, -1])


def assert_not_a_digit_shown(page: Any, hint: str) -> None:
    """The words, no digit, no confidence, the bars with none marked, and the image the model saw."""
    assert page.get_attribute("#result", "data-verdict") == "not_a_digit"
    assert page.inner_text("#result-headline") == NOT_A_DIGIT
    summary = page.inner_text("#result-summary")
    assert summary.startswith(NOT_A_DIGIT) and hint in summary, summary
    assert page.get_attribute("#result-summary", "aria-live") == "polite"
    assert page.inner_text("#result-digit").strip() == ""
    assert page.locator("#confidence-line").is_hidden()
    bar_values(page)
    assert page.locator("#bars .bar.best, #bars .bar.candidate").count() == 0
    assert page.locator("#error").is_hidden()
    assert seen_image_ink(page) > 0.01


@pytest.mark.parametrize("name", list(NOT_DIGITS))
def test_drawing_something_that_is_not_a_digit_says_so(
    page: PageWatch, classifier: Any, model_card: dict[str, Any], name: str
) -> None:
    """A letter or a scribble on the pad, read by the shipped model: "That doesn't look like a digit"."""
    threshold = not_a_digit_threshold(model_card)
    p = page.page
    draw_strokes(p, NOT_DIGITS[name])
    with p.expect_response("**/v1/predict") as response:
        p.click("#predict-button")
    wait_for_answer(p)
    answer = response.value.json()
    # What the service answered for the page's own request, and how far past the line the drawing is.
    score = ood_score(classifier, answer["image"]["pixels"])
    assert answer["verdict"] == "not_a_digit", (answer["verdict"], score, threshold)
    assert score >= threshold + OOD_MARGIN, f"{name}: ood_score {score:.2f} is too close to {threshold:.2f}"
    assert_not_a_digit_shown(p, "Draw one digit, large and centred on the pad.")
    shoot(p, f"not-a-digit-{name}")
    if name == next(iter(NOT_DIGITS)):
        shoot(p, "desktop-not-a-digit")
    # Clearing forgets the verdict: the confidence line and the digit box come back.
    p.click("#clear-button")
    assert p.get_attribute("#result", "data-verdict") is None
    assert p.locator("#confidence-line").is_visible()
    assert p.inner_text("#result-digit") == "–"
    assert not page.errors


def text_photo(text: str, size: int = 180) -> bytes:
    """A word typed black on white (in Pillow's own font, the same on every machine): a photo of no digit."""
    font = ImageFont.load_default(size=size)
    sheet = Image.new("L", (int(size * 0.8 * len(text)) + 120, size + 100), 255)
    ImageDraw.Draw(sheet).text((60, 30), text, fill=0, font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def test_dropping_a_photo_of_a_word_says_it_is_not_a_digit(
    page: PageWatch, server: Any, classifier: Any, model_card: dict[str, Any]
) -> None:
    """A photo of the word "cat", checked against the API first, then dropped on the page."""
    threshold = not_a_digit_threshold(model_card)
    photo = text_photo(PHOTO_WORD)
    expected = api_answer(server, photo, return_image=True)
    score = ood_score(classifier, expected["image"]["pixels"])
    assert expected["verdict"] == "not_a_digit", (expected["verdict"], score, threshold)
    assert score >= threshold + OOD_MARGIN, f"ood_score {score:.2f} is too close to {threshold:.2f}"
    p = page.page
    payload = base64.b64encode(photo).decode()
    transfer = p.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], 'word.png', { type: 'image/png' }));
            return transfer;
        }""",
        payload,
    )
    with p.expect_response("**/v1/predict") as response:
        p.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    wait_for_answer(p)
    assert response.value.json()["verdict"] == "not_a_digit"
    assert_not_a_digit_shown(p, "Use a photo of one handwritten digit, cropped close around it.")
    shoot(p, "not-a-digit-photo")
    assert not page.errors


def test_a_file_that_is_not_an_image_shows_the_services_error(page: PageWatch) -> None:
    p = page.page
    with p.expect_response("**/v1/predict") as response:
        p.set_input_files(
            "#file-input", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not a picture"}]
        )
    assert 400 <= response.value.status < 500
    error = response.value.json()["error"]
    p.wait_for_selector("#result[data-state='error']")
    alert = p.locator("#error")
    assert alert.is_visible()
    assert alert.get_attribute("role") == "alert"
    assert alert.inner_text() == error["message"]
    assert alert.get_attribute("data-code") == error["code"]
    assert p.inner_text("#result-digit") == "?"
    # Drawing afterwards recovers.
    p.click("#clear-button")
    assert alert.is_hidden()


def test_controls_are_reachable_with_the_keyboard(page: PageWatch) -> None:
    p = page.page
    reached = []
    for _ in range(12):
        p.keyboard.press("Tab")
        reached.append(p.evaluate("document.activeElement.id || document.activeElement.tagName"))
    for control in ("clear-button", "predict-button", "file-input"):
        assert control in reached, f"{control} cannot be reached with Tab (got {reached})"
    # The hidden file input shows its focus on the drop zone, and Space/Enter opens the file chooser.
    upload = p.locator("#file-input")
    upload.focus()
    p.wait_for_function("document.activeElement && document.activeElement.id === 'file-input'")
    shoot(p, "keyboard-focus-on-upload")
    # Focus and key press in one step, with room for a loaded CI machine: Chromium opens the chooser asynchronously.
    with p.expect_file_chooser(timeout=60_000) as chooser:
        upload.press("Space")
    assert chooser.value.element.get_attribute("id") == "file-input"
    # The buttons work from the keyboard too.
    p.focus("#predict-button")
    p.keyboard.press("Enter")
    assert "Draw a digit first" in p.inner_text("#result-summary")
    # Every control has an accessible name (what a screen reader announces).
    assert p.get_by_role("button", name="Clear").is_visible()
    assert p.get_by_role("button", name="Predict").is_visible()
    assert p.get_by_label("Choose a photo or scan").get_attribute("id") == "file-input"
    assert p.get_by_role("img", name=re.compile("Drawing pad")).get_attribute("id") == "pad"
    assert p.get_attribute("#result-summary", "aria-live") == "polite"


def test_the_page_fits_a_phone(browser: Any, server: Any, mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = mnist_test
    watch = _open(
        browser,
        server.url,
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    p = watch.page
    try:
        assert p.evaluate("document.documentElement.scrollWidth") <= 390, "the page scrolls sideways on a phone"
        pad = p.locator("#pad").bounding_box()
        assert pad["width"] >= 250 and pad["x"] >= 0 and pad["x"] + pad["width"] <= 390
        for control in ("#clear-button", "#predict-button"):
            assert p.locator(control).bounding_box()["height"] >= 44, "touch targets should be at least 44 px"
        # The answer comes right under the pad, before the upload section.
        assert p.locator("#result").bounding_box()["y"] < p.locator("#drop-zone").bounding_box()["y"]
        draw_mnist_digit(p, images[TRACED[0]])
        p.click("#predict-button")
        wait_for_answer(p)
        assert shown_digit(p) == int(labels[TRACED[0]])
        assert p.evaluate("document.documentElement.scrollWidth") <= 390
        shoot(p, "phone-after-drawing")
        assert not watch.errors
    finally:
        p.context.close()


PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}


def assert_fits_the_phone(page: Any) -> None:
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "the page scrolls sideways on a phone"
    for selector in ("#result-digit", "#result-summary"):
        box = page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, f"{selector} leaves the screen: {box}"


def test_not_sure_fits_a_phone(
    browser: Any, strict_server: LiveServer, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = mnist_test
    photo = photo_of(images[AMBIGUOUS])
    first, second = (c["digit"] for c in api_answer(strict_server, photo)["top_k"])
    watch = _open(browser, strict_server.url, **PHONE)
    p = watch.page
    try:
        assert upload(p, "ambiguous.png", photo)["verdict"] == "unsure"
        assert p.inner_text("#result-headline") == f"Not sure: {first} or {second}?"
        assert p.inner_text("#result-digit").split() == [str(first), "or", str(second)]
        assert_fits_the_phone(p)
        shoot(p, "phone-unsure")
        assert not watch.errors
    finally:
        p.context.close()


def test_not_a_digit_fits_a_phone(browser: Any, server: Any, model_card: dict[str, Any]) -> None:
    not_a_digit_threshold(model_card)
    watch = _open(browser, server.url, **PHONE)
    p = watch.page
    try:
        name = next(iter(NOT_DIGITS))
        draw_strokes(p, NOT_DIGITS[name])
        with p.expect_response("**/v1/predict") as response:
            p.click("#predict-button")
        wait_for_answer(p)
        assert response.value.json()["verdict"] == "not_a_digit"
        assert_not_a_digit_shown(p, "Draw one digit, large and centred on the pad.")
        assert_fits_the_phone(p)
        shoot(p, "phone-not-a-digit")
        assert not watch.errors
    finally:
        p.context.close()


def test_the_page_asks_for_an_api_key_when_the_service_needs_one(chromium: str, browser: Any, live_server: Any) -> None:
    server = live_server(env={"MNIST_SERVE_API_KEY": API_KEY})
    watch = _open(browser, server.url, viewport={"width": 1100, "height": 900})
    p = watch.page
    draw_mnist_digit(p, np.pad(np.full((20, 4), 255, dtype=np.uint8), 4))
    p.click("#predict-button")
    p.wait_for_selector("#api-key-form:not([hidden])")
    assert p.evaluate("document.activeElement.id") == "api-key-input"
    shoot(p, "api-key-asked")
    p.fill("#api-key-input", "wrong-key-but-long-enough")
    p.click("#api-key-form button[type=submit]")
    p.wait_for_selector("#api-key-form:not([hidden])")
    assert p.locator("#error").is_visible()
    p.fill("#api-key-input", API_KEY)
    p.click("#api-key-form button[type=submit]")
    wait_for_answer(p)
    assert p.locator("#api-key-form").is_hidden()
    assert shown_digit(p) == 1
    # The key was kept for the tab: the next prediction needs no asking.
    p.click("#predict-button")
    wait_for_answer(p)
    assert p.locator("#api-key-form").is_hidden()
    p.context.close()
