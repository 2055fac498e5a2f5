"""Artifact links (api/routes/jobs.py) and signed downloads (api/routes/artifacts.py, api/signing.py)."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import datetime

import httpx
import pytest
from api_support import Api, assert_problem

from api.signing import sign
from app_common.jobs import ArtifactInfo

pytestmark = pytest.mark.anyio


async def finished_job_with_artifacts(api: Api) -> tuple[str, dict[str, bytes]]:
    job_id = (await api.submit())["id"]
    files = {"model.safetensors": os.urandom(3000), "manifest.json": b'{"density": 0.2}'}
    folder = api.settings.artifacts_dir / job_id
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "not-listed.txt").write_bytes(b"private")
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
