"""The dashboard: a browser UI served by the API itself, at ``/``.

Static files shipped in this package (``static/``: HTML, CSS and plain JavaScript modules; no build
step, no CDN, no web fonts; the charts are the package's own SVG code). The page signs in with an
API key that it keeps in the tab's ``sessionStorage`` and sends as ``Authorization: Bearer`` on
every call to ``/api/v1``; it follows the open job's event stream with ``fetch`` (EventSource cannot
send the header) and polls the job list.

The page and its files (under :data:`ASSETS_PATH`) carry a Content-Security-Policy that lets them
talk to this origin only; other routes keep their own headers. Nothing here is in the OpenAPI
document.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from api.errors import ApiProblem

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
    # Revalidate, so an upgraded server's files are used at once.
    "Cache-Control": "no-cache",
}
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


def install_dashboard(app: FastAPI) -> None:
    """Serve the page at :data:`PAGE_PATH` and its files at ``ASSETS_PATH/<name>``.

    The files are one flat folder, listed once here: a request names one of them or gets a 404
    (and the request metrics count every asset under the one route ``/dashboard/{name}``).
    """
    files = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in _MEDIA_TYPES}

    @app.api_route(PAGE_PATH, methods=["GET", "HEAD"], include_in_schema=False)
    async def dashboard_page() -> FileResponse:
        return _file(files["index.html"])

    @app.api_route(ASSETS_PATH + "/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def dashboard_file(name: str) -> FileResponse:
        path = files.get(name)
        if path is None:
            raise ApiProblem(404, f"no dashboard file {name!r}")
        return _file(path)
