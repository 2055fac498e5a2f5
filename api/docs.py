"""The interactive API docs (``/docs``), served with no network access.

FastAPI's default page loads Swagger UI from a CDN, so it is blank offline, behind a firewall or in
an air-gapped cluster. The assets come from the ``fastapi-swagger`` package (a current Swagger UI 5
build, which renders OpenAPI 3.1) and are served by this app under ``/docs/assets``.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """Serve Swagger UI at :data:`DOCS_PATH` from local assets (create the app with
    ``docs_url=None``)."""
    app.mount(ASSETS_PATH, StaticFiles(packages=[("fastapi_swagger", "resources")]), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
            swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True},
        )
