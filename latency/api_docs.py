"""The latency service's interactive API page (/docs), working with no internet access."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path  # Swagger UI's dist files, as a package

DOCS_ASSETS = "/docs/assets"  # Swagger UI's files, served from this machine


def add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs, its JavaScript and CSS served by the service itself (FastAPI's
    "self-hosting" recipe): the service often runs where no CDN can be reached, and a page
    that loads code from elsewhere would also see the token typed into it."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # behind a reverse proxy
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url,
            title=f"{app.title} - API",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon-32x32.png",
            oauth2_redirect_url=root + "/docs/oauth2-redirect",
            # no badge that sends the schema to an online validator
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
