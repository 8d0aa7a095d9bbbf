"""The API's documentation pages, /docs (Swagger UI) and /redoc (ReDoc), served without a CDN.

    app = FastAPI(docs_url=None, redoc_url=None)   # FastAPI's own pages load their scripts from a CDN
    install_docs(app)                               # these load them from /docs-assets/, served by the app

FastAPI's pages fetch Swagger UI and ReDoc from a CDN (and ReDoc its fonts from Google), so they stay blank on a
machine without internet access and tell third parties who reads the docs. Here the same pages, written by
FastAPI's get_swagger_ui_html and get_redoc_html, load the files vendored in service/docs_assets/ (npm's
swagger-ui-dist and redoc; versions and licences in its README.md, refreshed by scripts/vendor-docs-assets.sh).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, swagger_ui_default_parameters
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

#: The vendored Swagger UI and ReDoc files.
ASSETS_DIR = Path(__file__).resolve().parent / "docs_assets"
#: Where the app serves them.
ASSETS_URL = "/docs-assets"
#: The pages may load nothing from elsewhere. The inline script and styles are FastAPI's page setup and the
#: libraries' own; ReDoc's search runs in a blob: worker. ReDoc 2 also shows Redocly's logo from its CDN: refused
#: here (the image hides itself), so reading the docs tells no third party.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "base-uri 'self'; form-action 'self'; frame-ancestors 'self'"
)


def install_docs(app: FastAPI, *, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve Swagger UI at ``docs_url`` and ReDoc at ``redoc_url`` from local files.

    Create the app with ``docs_url=None, redoc_url=None`` (FastAPI's CDN pages) and keep its ``openapi_url``: the
    pages read the schema from there. Paths honour the ASGI root_path, so the pages work behind a path prefix.
    """
    if app.openapi_url is None:
        raise ValueError("the documentation pages need the app's OpenAPI schema (openapi_url is None)")
    openapi_url = app.openapi_url
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    # BaseLayout (FastAPI's default) has no top bar; no validator badge either way: it would call an online service.
    swagger_parameters = {**swagger_ui_default_parameters, "validatorUrl": None, **(app.swagger_ui_parameters or {})}

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        page = get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/swagger-ui/favicon-32x32.png",
            swagger_ui_parameters=swagger_parameters,
        )
        page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return page

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        page = get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/swagger-ui/favicon-32x32.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return page
