"""api/routes/catalog.py."""

from __future__ import annotations

import pytest
from api_support import Api

from app_common import spec as S

pytestmark = pytest.mark.anyio


async def test_catalog(api: Api) -> None:
    r = await api.client.get("/api/v1/catalog")
    assert r.status_code == 200
    body = r.json()
    assert body["datasets"] == list(S.DATASETS) and body["architectures"] == list(S.ARCHITECTURES)
    assert body["methods"] == list(S.METHODS) and body["pruners"] == list(S.PRUNERS)
    assert body["scopes"] == list(S.SCOPES) and body["replays"] == list(S.REPLAYS)
    assert body["precisions"] == list(S.PRECISIONS) and body["export_formats"] == list(S.EXPORT_FORMATS)
    assert body["devices"] == ["auto", "cpu"] and body["queues"] == ["cpu"]
    assert body["limits"] == {"max_epochs": 20, "max_megabatches": 10, "max_concurrent_jobs_per_key": 3,
                              "max_body_bytes": 4096, "download_url_ttl_s": 3600, "max_dataset_bytes": 2 * 2**30}
