"""api/docs.py: /docs works offline (issue 11, item 11): every asset the page loads is ours."""

from __future__ import annotations

import re

import pytest
from api_support import Api

pytestmark = pytest.mark.anyio


async def test_docs_page_loads_only_local_assets(api: Api) -> None:
    page = await api.client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assert urls, page.text
    assert not [u for u in urls if u.startswith(("http://", "https://", "//"))], urls
    kinds = {"/docs/assets/swagger-ui-bundle.js": "javascript", "/docs/assets/swagger-ui.css": "text/css",
             "/openapi.json": "application/json"}
    for url, kind in kinds.items():
        assert url in urls
        asset = await api.client.get(url)
        assert asset.status_code == 200 and kind in asset.headers["content-type"], url
    bundle = (await api.client.get("/docs/assets/swagger-ui-bundle.js")).text
    assert len(bundle) > 500_000 and "SwaggerUIBundle" in bundle
