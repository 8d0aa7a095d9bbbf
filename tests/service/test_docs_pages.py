"""The API's documentation pages, /docs (Swagger UI) and /redoc (ReDoc), in a real browser with no way out:
every request that is not to the local server is blocked, and each page must still list every operation of the
API's OpenAPI schema (its scripts and styles come from the service itself, service/docs.py).

    .venv/bin/python -m pytest tests/service/test_docs_pages.py     # screenshots land in test-artifacts/web/

Chromium is Debian's, driven by Playwright, installed and launched as in tests/service/test_web.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from test_web import CHROMIUM_ARGS, TIMEOUT_MS, _install_chromium

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "web"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _install_chromium()
    if reason:
        pytest.skip(reason)
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def operations(module_live_server: Any) -> list[dict[str, str]]:
    """Every operation the live server's OpenAPI schema documents: method, path and summary."""
    schema = httpx.get(module_live_server.url + "/openapi.json", timeout=10).json()
    found = [
        {
            "method": method.upper(),
            "path": path,
            "summary": operation.get("summary", ""),
            "id": operation["operationId"],
        }
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]
    assert len(found) > 10
    return found


class Offline:
    """A browser page whose requests reach only the local server; everything else is aborted and recorded."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.blocked: list[str] = []
        self.failed: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", self._console)
        self.page.on("requestfailed", lambda request: self.failed.append(f"{request.url}: {request.failure}"))

    def _console(self, message: Any) -> None:
        # The pages' Content-Security-Policy refuses images from elsewhere (ReDoc 2 shows Redocly's logo from its
        # CDN): that refusal is expected and sends nothing. Any other console error is a fault.
        refused_image = (
            "image 'https://" in message.text and 'Content Security Policy directive: "img-src' in message.text
        )
        if message.type == "error" and not refused_image:
            self.errors.append(f"console: {message.text}")

    def _route(self, route: Any) -> None:
        if urlsplit(route.request.url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()


@pytest.fixture
def offline(browser: Any) -> Iterator[Offline]:
    session = Offline(browser)
    yield session
    session.context.close()


def test_swagger_ui_lists_every_operation_offline(
    offline: Offline, module_live_server: Any, operations: list[dict[str, str]]
) -> None:
    page = offline.page
    page.goto(module_live_server.url + "/docs")
    page.wait_for_selector(".opblock-summary", state="attached")
    shown = page.eval_on_selector_all(
        ".opblock",
        """blocks => blocks.map(b => [
            (b.querySelector('.opblock-summary-method') || {}).textContent,
            (b.querySelector('.opblock-summary-path') || {}).getAttribute?.('data-path')
        ])""",
    )
    shown_set = {(str(method).strip().upper(), str(path)) for method, path in shown}
    missing = [f"{op['method']} {op['path']}" for op in operations if (op["method"], op["path"]) not in shown_set]
    assert not missing, f"Swagger UI does not show: {missing}"
    assert page.title() == "mnist-serve - Swagger UI"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "docs-swagger-ui.png"))
    assert offline.blocked == [], "the page tried to leave the machine"
    assert offline.errors == []
    assert [f for f in offline.failed if not f.endswith(": csp")] == []  # refused by the CSP: never sent


def test_redoc_lists_every_operation_offline(
    offline: Offline, module_live_server: Any, operations: list[dict[str, str]]
) -> None:
    page = offline.page
    page.goto(module_live_server.url + "/redoc")
    # ReDoc renders one section per operation, with an id of the form operation/<operationId>.
    page.wait_for_selector("[id^='operation/']", state="attached")
    sections = set(page.eval_on_selector_all("[id^='operation/']", "nodes => nodes.map(n => n.id)"))
    missing_ids = [op["id"] for op in operations if f"operation/{op['id']}" not in sections]
    assert not missing_ids, f"ReDoc has no section for: {missing_ids}"
    text = page.locator("body").inner_text()
    missing = [op["summary"] for op in operations if op["summary"] and op["summary"] not in text]
    assert not missing, f"ReDoc does not show: {missing}"
    assert page.title() == "mnist-serve - ReDoc"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "docs-redoc.png"))
    assert offline.blocked == [], "the page tried to leave the machine"
    assert offline.errors == []
    assert [f for f in offline.failed if not f.endswith(": csp")] == []  # refused by the CSP: never sent
