"""The dashboard's files as the API serves them (no browser needed): the page at ``/`` and its assets
under ``/dashboard/``, their security headers (and no other route's), out of the OpenAPI document,
nothing in them that reaches another host, and every file shipped as package data."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from api.dashboard import STATIC_DIR
from api.main import create_app
from app_common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
STATIC_FILES = sorted(p for p in STATIC_DIR.iterdir() if p.is_file())


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(redis_url: str, key_prefix: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(redis_url=redis_url, redis_prefix=key_prefix, celery_key_prefix=f"{key_prefix}:celery:",
                        data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts",
                        storage_dir=tmp_path / "storage", signing_secret="test-signing-secret")
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as http:
        yield http
    app.state.store.close()
    app.state.celery.close()


@pytest.mark.anyio
async def test_the_page_and_its_files_are_served_with_a_same_origin_policy(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert 'src="dashboard/app.js"' in page.text

    head = await client.head("/")
    assert head.status_code == 200 and head.content == b""

    for path in STATIC_FILES:
        name = path.relative_to(STATIC_DIR).as_posix()
        got = await client.get(f"/dashboard/{name}")
        assert got.status_code == 200, name
        assert got.content == path.read_bytes()
        assert got.headers["content-security-policy"] == policy
        if name.endswith(".js"):  # module scripts need a JavaScript type
            assert got.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")

    for name in ("no-such-file.js", "views/app.js", "..%2Fapi%2Fmain.py"):
        missing = await client.get(f"/dashboard/{name}")
        assert missing.status_code == 404, name
        assert missing.headers["content-type"] == "application/problem+json"
    # Request metrics count the files under one route: names cannot grow the label set.
    metrics = (await client.get("/metrics")).text
    assert 'route="/dashboard/{name}"' in metrics
    assert "no-such-file" not in metrics and "views" not in metrics


@pytest.mark.anyio
async def test_other_routes_keep_their_headers_and_the_openapi_document_has_no_dashboard(
    client: httpx.AsyncClient,
) -> None:
    for path in ("/docs", "/api/v1/catalog", "/healthz", "/openapi.json"):
        response = await client.get(path)
        assert response.status_code == 200, path
        assert "content-security-policy" not in response.headers, path  # /docs runs an inline script
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths
    assert not [p for p in paths if p.startswith("/dashboard")]


def test_the_files_name_no_other_host_and_run_under_the_policy() -> None:
    for path in STATIC_FILES:
        text = path.read_text()
        # The SVG namespace is a name, not a request.
        urls = set(re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s\"'`)]*", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (path.name, urls)
        assert "@import" not in text and "url(" not in text, path.name
        assert "innerHTML" not in text and "eval(" not in text, path.name
    html = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)  # no inline script (script-src 'self')
    assert " style=" not in html  # no inline style (style-src 'self')


def test_every_static_file_is_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["api.dashboard"]
    for path in STATIC_FILES:
        name = path.relative_to(STATIC_DIR.parent).as_posix()
        covered = [p for p in patterns if fnmatch.fnmatch(name, p) and name.count("/") == p.count("/")]
        assert covered, name
