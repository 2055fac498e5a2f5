"""The model at every megabatch through the API (api/routes/models.py): real models from a short
digits run, stored by the worker's mirror (worker/files.py) as the engine writes them, listed while
the job runs and after, chosen by density or accuracy, downloaded through signed links."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import Api, assert_problem, make_api
from s3_server import S3Server

from api.signing import sign
from app_common.events import ModelWritten
from app_common.jobs import ArtifactInfo
from app_common.megabatch_models import MegabatchModel, best_model
from app_common.settings import Settings
from app_common.spec import JobSpec
from app_common.storage import artifact_key, models_index_key
from worker.files import RunFolderMirror

pytestmark = pytest.mark.anyio

SPEC = {
    "dataset": {"name": "digits"}, "architecture": "mlp", "sparsity": {"target": 0.75},
    "stream": {"megabatches": 4}, "training": {"epochs": 1, "device": "cpu", "precision": "fp32"},
}


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ModelWritten], dict[str, Any]]:
    """A real run of SPEC: its folder, its model_written events and its result."""
    from app_engine.runner import run

    out = tmp_path_factory.mktemp("run")
    events: list[Any] = []
    outcome = run(JobSpec.from_dict(SPEC), out, callbacks=[events.append])
    return out, [e for e in events if isinstance(e, ModelWritten)], outcome.result


async def running_job(api: Api, engine_run: Any, upto: int) -> tuple[str, RunFolderMirror]:
    """A running job whose worker has stored the models of megabatches 1..upto."""
    out, written, _ = engine_run
    job_id = (await api.submit(SPEC))["id"]
    api.store.transition(job_id, "running", allowed_from={"queued"})
    mirror = RunFolderMirror(api.settings.open_storage(), job_id, out)
    for event in written[:upto]:
        mirror(event)
    return job_id, mirror


async def test_models_are_listed_while_the_job_runs_and_after(api: Api, engine_run: Any) -> None:
    out, written, result = engine_run
    job_id, mirror = await running_job(api, engine_run, 2)
    url = f"/api/v1/jobs/{job_id}/models"
    r = await api.client.get(url, headers=api.a)
    assert r.status_code == 200, r.text
    listed = r.json()
    assert [m["index"] for m in listed] == [1, 2]
    for m, kept in zip(listed, result["megabatch_models"], strict=False):
        for key in ("density", "target_density", "test_accuracy", "name", "bytes", "sha256"):
            assert m[key] == kept[key], key
        # Anytime: the model downloads while the job still runs, without the API key.
        d = await api.client.get(m["download_url"])
        assert d.status_code == 200 and hashlib.sha256(d.content).hexdigest() == m["sha256"]
        assert d.content == (out / m["name"]).read_bytes()
        assert d.headers["etag"] == f'"{m["sha256"]}"'
        assert [f["name"] for f in m["files"]] == [m["name"], m["name"].replace("model.sparse.safetensors",
                                                                                 "manifest.json")]
        manifest = await api.client.get(m["files"][1]["download_url"])
        assert manifest.status_code == 200 and manifest.json()["megabatch"] == m["index"]
    # The rest as the run goes on, then the job succeeds: its artifacts are its final files.
    for event in written[2:]:
        mirror(event)
    data = (out / "model.sparse.safetensors").read_bytes()
    api.settings.open_storage().put_stream(artifact_key(job_id, "model.sparse.safetensors"), [data])
    final = ArtifactInfo(name="model.sparse.safetensors", format="sparse", bytes=len(data),
                         sha256=hashlib.sha256(data).hexdigest())
    api.store.set_result(job_id, result, [final])
    api.store.transition(job_id, "succeeded", allowed_from={"running"})
    listed = (await api.client.get(url, headers=api.a)).json()
    assert [m["index"] for m in listed] == [1, 2, 3, 4]
    assert [m["sha256"] for m in listed] == [m["sha256"] for m in result["megabatch_models"]]
    job = (await api.client.get(f"/api/v1/jobs/{job_id}", headers=api.a)).json()
    assert job["urls"]["models"] == url
    artifacts = (await api.client.get(f"/api/v1/jobs/{job_id}/artifacts", headers=api.a)).json()
    assert [a["name"] for a in artifacts] == ["model.sparse.safetensors"]
    d = await api.client.get(listed[2]["files"][1]["download_url"])
    assert d.status_code == 200 and d.json()["megabatch"] == 3
    # Another key's job does not exist.
    assert_problem(await api.client.get(url, headers=api.b), 404)
    assert_problem(await api.client.get(f"{url}/best", params={"max_density": 0.5}, headers=api.b), 404)
    # Deleting the job deletes its models and their index.
    assert (await api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.a)).status_code == 204
    assert_problem(await api.client.get(url, headers=api.a), 404)
    assert_problem(await api.client.get(listed[0]["download_url"]), 404)
    assert not list(api.settings.open_storage().list(f"jobs/{job_id}/"))


async def test_best_model_by_density_or_accuracy(api: Api, engine_run: Any) -> None:
    _, _, result = engine_run
    job_id, _ = await running_job(api, engine_run, 4)
    kept = [MegabatchModel.model_validate(m) for m in result["megabatch_models"]]
    best = f"/api/v1/jobs/{job_id}/models/best"

    async def chosen(**params: float) -> dict[str, Any]:
        r = await api.client.get(best, params=params, headers=api.a)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    within = await chosen(max_density=0.5)
    expected = max((m for m in kept if m.density <= 0.5), key=lambda m: m.test_accuracy)
    assert within["index"] == expected.index and within["density"] <= 0.5
    assert (await api.client.get(within["download_url"])).status_code == 200
    floor = sorted(m.test_accuracy for m in kept)[1]
    sparsest = await chosen(min_accuracy=floor)
    assert sparsest["test_accuracy"] >= floor
    assert sparsest["density"] == min(m.density for m in kept if m.test_accuracy >= floor)
    both = await chosen(max_density=0.9, min_accuracy=floor)
    assert both["index"] == best_model(kept, max_density=0.9, min_accuracy=floor).index  # type: ignore[union-attr]

    body = assert_problem(await api.client.get(best, headers=api.a), 422)
    assert {e["field"] for e in body["errors"]} == {"max_density", "min_accuracy"}
    for params, field in (({"max_density": 1.5}, "max_density"), ({"min_accuracy": -0.1}, "min_accuracy"),
                          ({"max_density": "half"}, "max_density")):
        body = assert_problem(await api.client.get(best, params=params, headers=api.a), 422)
        assert [e["field"] for e in body["errors"]] == [field]
    body = assert_problem(await api.client.get(best, params={"max_density": 0.01}, headers=api.a), 404)
    assert body["type"].endswith("no-model-qualifies")
    assert_problem(await api.client.get(best, params={"min_accuracy": 1.0, "max_density": 0.2}, headers=api.a), 404)


async def test_a_job_without_kept_models_lists_none(api: Api) -> None:
    job_id = (await api.submit({**SPEC, "export": {"keep_every_megabatch": False}}))["id"]
    r = await api.client.get(f"/api/v1/jobs/{job_id}/models", headers=api.a)
    assert r.status_code == 200 and r.json() == []
    body = assert_problem(await api.client.get(f"/api/v1/jobs/{job_id}/models/best",
                                               params={"max_density": 1.0}, headers=api.a), 404)
    assert "none of the 0 kept models" in body["detail"]
    assert_problem(await api.client.get("/api/v1/jobs/0123456789abcdef0123456789abcdef/models", headers=api.a), 404)


async def test_only_listed_megabatch_files_are_served(api: Api, engine_run: Any) -> None:
    job_id, _ = await running_job(api, engine_run, 1)
    storage = api.settings.open_storage()
    storage.put_stream(artifact_key(job_id, "megabatch-0002/model.sparse.safetensors"), [b"not listed yet"])
    storage.put_stream(f"jobs/{job_id}/secret.txt", [b"private"])
    expires = 2**40
    base = f"/api/v1/artifacts/{job_id}"
    for name in ("megabatch-0002/model.sparse.safetensors", "megabatch-0001/../secret.txt",
                 "megabatch-0001/../../" + job_id + "/secret.txt", "megabatch-0001/model.safetensors", "../secret.txt"):
        sig = sign("test-signing-secret", job_id, name, expires)
        r = await api.client.get(f"{base}/{name}", params={"expires": expires, "sig": sig})
        assert r.status_code in (403, 404, 307), (name, r.status_code)  # never the file ("/.." is cut by httpx)
        assert b"private" not in r.content and b"not listed" not in r.content
    # The listed one with a signature for it is served; with another file's signature it is refused.
    name = "megabatch-0001/model.sparse.safetensors"
    ok = await api.client.get(f"{base}/{name}", params={"expires": expires, "sig": sign(
        "test-signing-secret", job_id, name, expires)})
    assert ok.status_code == 200
    bad = await api.client.get(f"{base}/{name}", params={"expires": expires, "sig": sign(
        "test-signing-secret", job_id, "megabatch-0001/manifest.json", expires)})
    assert_problem(bad, 403)
    # Quoted slashes reach the same file.
    quoted = httpx.URL(f"http://testserver{base}/megabatch-0001%2Fmodel.sparse.safetensors",
                       params={"expires": expires, "sig": sign("test-signing-secret", job_id, name, expires)})
    assert (await api.client.get(quoted)).status_code == 200


async def test_a_damaged_index_is_a_503_and_does_not_fail_the_worker(api: Api, tmp_path: Path) -> None:
    job_id = (await api.submit(SPEC))["id"]
    storage = api.settings.open_storage()
    storage.put_stream(models_index_key(job_id), [b'{"models": [{"index": "x"}]}'])
    body = assert_problem(await api.client.get(f"/api/v1/jobs/{job_id}/models", headers=api.a), 503)
    assert body["type"].endswith("storage-unavailable")
    mirror = RunFolderMirror(storage, job_id, tmp_path / "work")
    assert mirror.fetch() is None and mirror.models.models == []  # starts a new list


@pytest.fixture
async def s3_api(settings: Settings, s3_server: S3Server, s3_bucket: str,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Api]:
    """The API on an S3 store (SeaweedFS), configured the AWS way."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    async for value in make_api(settings.model_copy(update={"storage_url": f"s3://{s3_bucket}/svc"})):
        yield value


async def test_with_an_s3_store_the_links_are_presigned(s3_api: Api, s3_server: S3Server, engine_run: Any) -> None:
    out = engine_run[0]
    job_id, _ = await running_job(s3_api, engine_run, 2)
    listed = (await s3_api.client.get(f"/api/v1/jobs/{job_id}/models", headers=s3_api.a)).json()
    assert [m["index"] for m in listed] == [1, 2]
    async with httpx.AsyncClient() as store_client:  # straight to the store, no API key
        for m in listed:
            assert m["download_url"].startswith(f"{s3_server.endpoint_url}/")
            d = await store_client.get(m["download_url"])
            assert d.status_code == 200 and d.content == (out / m["name"]).read_bytes()
            flat = m["name"].replace("/", "-")
            assert d.headers["content-disposition"] == f'attachment; filename="{flat}"'
