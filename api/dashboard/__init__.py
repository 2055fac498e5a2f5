"""The dashboard: a browser UI served by the API itself, at ``/``.

Static files shipped in this package (``static/``: HTML, CSS and plain JavaScript modules; no build
step, no CDN, no web fonts; the charts are the package's own SVG code). The page signs in with an
API key that it keeps in the tab's ``sessionStorage`` and sends as ``Authorization: Bearer`` on
every call to ``/api/v1``; it follows the open job's event stream with ``fetch`` (EventSource cannot
send the header) and polls the job list.

The page and its assets (under :data:`ASSETS_PATH`) carry a Content-Security-Policy that lets them
talk to this origin only; other routes keep their own headers. Nothing here is in the OpenAPI
document.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_PATH = "/"
ASSETS_PATH = "/dashboard"

# Scripts, styles, images and fetch() go to this origin only; download links are navigations,
# which CSP does not restrict (a store's presigned link works).
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # The page's address (its #/jobs/<id> route) goes nowhere, not even to the object store.
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidate (ETag / Last-Modified) so an upgraded server's files are used at once.
    "Cache-Control": "no-cache",
}


class _DashboardFiles(StaticFiles):
    """StaticFiles whose answers carry :data:`SECURITY_HEADERS`."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def install_dashboard(app: FastAPI) -> None:
    """Serve the page at :data:`PAGE_PATH` and its assets under :data:`ASSETS_PATH`."""
    app.mount(ASSETS_PATH, _DashboardFiles(directory=STATIC_DIR), name="dashboard-assets")

    @app.api_route(PAGE_PATH, methods=["GET", "HEAD"], include_in_schema=False)
    async def dashboard_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers=SECURITY_HEADERS)
