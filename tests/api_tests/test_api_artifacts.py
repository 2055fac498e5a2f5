"""Artifact links (api/routes/jobs.py) and signed downloads (api/routes/artifacts.py, api/signing.py):
the API's HMAC links with the local storage backend, the store's presigned links with S3 (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from datetime import datetime

import httpx
import pytest
from api_support import Api, assert_problem, make_api
from s3_server import S3Server

from api.signing import sign
from app_common.jobs import ArtifactInfo
from app_common.settings import Settings
from app_common.storage import artifact_key, job_prefix, job_work_prefix

pytestmark = pytest.mark.anyio


async def finished_job_with_artifacts(api: Api) -> tuple[str, dict[str, bytes]]:
    """A succeeded job whose files are in the store, as a worker leaves them."""
    job_id = (await api.submit())["id"]
    files = {"model.safetensors": os.urandom(3000), "manifest.json": b'{"density": 0.2}'}
    storage = api.settings.open_storage()
    for name, data in files.items():
        storage.put_stream(artifact_key(job_id, name), [data])
    storage.put_stream(artifact_key(job_id, "not-listed.txt"), [b"private"])
    storage.put_stream(job_work_prefix(job_id) + "checkpoint.json", [b"{}"])
    listed = [
        ArtifactInfo(name=name, format=name.rsplit(".", 1)[1], bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        for name, data in files.items()
    ]
    api.store.transition(job_id, "running", allowed_from={"queued"})
    assert_problem(await api.client.get(f"/api/v1/jobs/{job_id}/artifacts", headers=api.a), 409)
    api.store.set_result(job_id, {"final_test_accuracy": 0.9}, listed)
    api.store.transition(job_id, "succeeded", allowed_from={"running"})
    return job_id, files


async def test_artifact_links(api: Api) -> None:
    job_id, files = await finished_job_with_artifacts(api)
    r = await api.client.get(f"/api/v1/jobs/{job_id}/artifacts", headers=api.a)
    assert r.status_code == 200
    links = {a["name"]: a for a in r.json()}
    assert set(links) == set(files)
    now = time.time()
    for name, data in files.items():
        link = links[name]
        assert link["bytes"] == len(data) and link["sha256"] == hashlib.sha256(data).hexdigest()
        assert link["download_url"].startswith(f"http://testserver/api/v1/artifacts/{job_id}/{name}?expires=")
        expires_at = datetime.fromisoformat(link["expires_at"]).timestamp()
        assert abs(expires_at - (now + api.settings.download_url_ttl_s)) < 5
        # No API key: the signature is the credential.
        d = await api.client.get(link["download_url"])
        assert d.status_code == 200 and d.content == data
        assert d.headers["etag"] == f'"{link["sha256"]}"'
        assert int(d.headers["content-length"]) == len(data)
    d = await api.client.get(links["manifest.json"]["download_url"])
    assert d.headers["content-type"].startswith("application/json")
    model = await api.client.get(links["model.safetensors"]["download_url"])
    assert model.headers["content-type"] == "application/octet-stream"


async def test_artifact_links_refused(api: Api) -> None:
    job_id, _ = await finished_job_with_artifacts(api)
    links = {a["name"]: a["download_url"] for a in (await api.client.get(
        f"/api/v1/jobs/{job_id}/artifacts", headers=api.a)).json()}
    good = httpx.URL(links["model.safetensors"])
    expires, sig = good.params["expires"], good.params["sig"]
    base = f"/api/v1/artifacts/{job_id}"
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    for url in [
        f"{base}/model.safetensors?expires={expires}&sig={flipped}",  # tampered signature
        f"{base}/model.safetensors?expires={int(expires) + 1}&sig={sig}",  # tampered expiry
        f"{base}/manifest.json?expires={expires}&sig={sig}",  # signature of another file
        f"{base}/model.safetensors?expires={expires}&sig=%C3%A9",  # not even hex
    ]:
        assert_problem(await api.client.get(url), 403)
    past = int(time.time()) - 10
    past_sig = sign("test-signing-secret", job_id, "model.safetensors", past)
    expired = f"{base}/model.safetensors?expires={past}&sig={past_sig}"
    assert "expired" in assert_problem(await api.client.get(expired), 403)["detail"]
    # A valid signature for a file the worker did not list is still refused.
    later = int(time.time()) + 60
    for name in ("not-listed.txt", "..", "%2E%2E%2Fsecret"):
        url = f"{base}/{name}?expires={later}&sig={sign('test-signing-secret', job_id, name, later)}"
        assert (await api.client.get(url)).status_code in (403, 404)
    assert_problem(await api.client.get(f"{base}/model.safetensors"), 422)


async def test_a_stored_file_gone_missing_is_404(api: Api) -> None:
    job_id, _ = await finished_job_with_artifacts(api)
    links = {a["name"]: a["download_url"] for a in (await api.client.get(
        f"/api/v1/jobs/{job_id}/artifacts", headers=api.a)).json()}
    api.settings.open_storage().delete(artifact_key(job_id, "manifest.json"))
    assert_problem(await api.client.get(links["manifest.json"]), 404)


async def test_deleting_a_job_frees_its_files_in_the_store(api: Api) -> None:
    job_id, _ = await finished_job_with_artifacts(api)
    other_id, _ = await finished_job_with_artifacts(api)
    storage = api.settings.open_storage()
    assert len(storage.list(job_prefix(job_id))) == 4
    r = await api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.a)
    assert r.status_code == 204
    assert storage.list(job_prefix(job_id)) == []
    assert len(storage.list(job_prefix(other_id))) == 4


@pytest.fixture
async def s3_api(
    settings: Settings, s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Api]:
    """The API on an S3 store, configured the AWS way, with 2 s download links."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    s3_settings = settings.model_copy(update={"storage_url": f"s3://{s3_bucket}/svc", "download_url_ttl_s": 2})
    async for value in make_api(s3_settings):
        yield value


async def test_s3_links_are_the_stores_presigned_urls(s3_api: Api, s3_server: S3Server) -> None:
    api = s3_api
    job_id, files = await finished_job_with_artifacts(api)
    r = await api.client.get(f"/api/v1/jobs/{job_id}/artifacts", headers=api.a)
    assert r.status_code == 200
    links = {a["name"]: a for a in r.json()}
    assert set(links) == set(files)
    now = time.time()
    async with httpx.AsyncClient() as store_client:  # straight to the store, no API key
        for name, data in files.items():
            link = links[name]
            assert link["download_url"].startswith(f"{s3_server.endpoint_url}/")
            assert abs(datetime.fromisoformat(link["expires_at"]).timestamp() - (now + 2)) < 2
            d = await store_client.get(link["download_url"])
            assert d.status_code == 200 and d.content == data
            assert d.headers["content-disposition"] == f'attachment; filename="{name}"'
        url = links["model.safetensors"]["download_url"]
        tampered = url.replace("model.safetensors", "not-listed.txt")
        assert (await store_client.get(tampered)).status_code == 403
        time.sleep(3)
        assert (await store_client.get(url)).status_code == 403  # expired

    r = await api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.a)
    assert r.status_code == 204
    assert api.settings.open_storage().list(job_prefix(job_id)) == []
