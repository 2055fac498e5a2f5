"""The HTTP API in-process (httpx + ASGI transport) against a real Redis (see conftest.py).

Queueing is checked where the worker would look: the Celery message in the queue's Redis list.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
from factories import epoch_ended, megabatch_ended

from api.main import create_app
from api.queue import create_celery
from api.signing import sign
from app_common import spec as S
from app_common.events import EpochEnded, Pruned, RunStarted
from app_common.jobs import ArtifactInfo
from app_common.settings import Settings
from app_common.store import JobStore
from app_common.tasks import RUN_JOB_TASK

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
PROBLEM = "application/problem+json"
SMALL = {"training": {"epochs": 3}, "stream": {"megabatches": 2}}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(redis_url: str, key_prefix: str, tmp_path: Path) -> Settings:
    data = tmp_path / "data"
    (data / "cifar").mkdir(parents=True)
    (data / "cifar" / "train.npz").write_bytes(b"not read by the API")
    return Settings(
        redis_url=redis_url,
        redis_prefix=key_prefix,
        celery_key_prefix=f"{key_prefix}:celery:",
        data_dir=data,
        artifacts_dir=tmp_path / "artifacts",
        signing_secret="test-signing-secret",
        max_epochs=20,
        max_megabatches=10,
        max_concurrent_jobs_per_key=3,
        max_body_bytes=4096,
        sse_heartbeat_s=0.2,
    )


class Api:
    """An app, a client on it, its store and two API keys."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient, store: JobStore):
        self.settings = settings
        self.client = client
        self.store = store
        self.owner_a, secret_a = store.create_key("a")
        self.owner_b, secret_b = store.create_key("b")
        self.a = {"Authorization": f"Bearer {secret_a}"}
        self.b = {"Authorization": f"Bearer {secret_b}"}

    def queue_length(self, queue: str = "cpu") -> int:
        return int(self.store.redis.llen(f"{self.settings.celery_key_prefix}{queue}"))

    def queued_job_ids(self, queue: str = "cpu") -> list[str]:
        out = []
        for raw in self.store.redis.lrange(f"{self.settings.celery_key_prefix}{queue}", 0, -1):
            message = json.loads(raw)
            assert message["headers"]["task"] == RUN_JOB_TASK
            assert message["content-type"] == "application/json"
            args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            assert kwargs == {}
            out += args
        return out

    async def submit(self, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> dict:
        r = await self.client.post("/api/v1/jobs", json=SMALL if body is None else body, headers=headers or self.a)
        assert r.status_code == 202, r.text
        return r.json()


async def make_api(settings: Settings) -> AsyncIterator[Api]:
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield Api(settings, client, app.state.store)
    app.state.store.redis.close()
    app.state.celery.close()


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async for value in make_api(settings):
        yield value


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert set(body) == {"type", "title", "status", "detail", "errors"}
    assert body["status"] == status and body["detail"]
    return body


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends


# --- submission and validation ------------------------------------------------------------------
BAD_BODIES = [
    ({"dataset": {"name": "mnist"}}, "dataset.name"),
    ({"architecture": "resnet1000"}, "architecture"),
    ({"method": "lottery"}, "method"),
    ({"sparsity": {"pruner": "l1"}}, "sparsity.pruner"),
    ({"sparsity": {"target": 1.5}}, "sparsity.target"),
    ({"sparsity": {"target": -0.1}}, "sparsity.target"),
    ({"sparsity": {"target": 0.5, "tau": 2.0}}, "sparsity.target"),
    ({"training": {"epochs": 21}}, "training.epochs"),
    ({"training": {"epochs": "many"}}, "training.epochs"),
    ({"stream": {"megabatches": 11}}, "stream.megabatches"),
    ({"dataset": {"name": "cifar10"}}, "dataset.path"),
    ({"dataset": {"name": "npz", "path": "/etc/passwd"}}, "dataset.path"),
    ({"dataset": {"name": "npz", "path": "../outside.npz"}}, "dataset.path"),
    ({"dataset": {"name": "npz", "path": "cifar/../../outside.npz"}}, "dataset.path"),
    ({"dataset": {"name": "npz", "path": "missing.npz"}}, "dataset.path"),
    ({"dataset": {"name": "npz", "path": "nul\u0000byte"}}, "dataset.path"),
    ({"training": {"milestones": [5, 3]}}, "training.milestones"),
    ({"training": {"milestones": [0, 2]}}, "training.milestones"),
    ({"training": {"epochs": 5, "warmup_epochs": 5}}, "training.warmup_epochs"),
    ({"training": {"device": "cuda"}}, "training.device"),
    ({"export": {"formats": ["pickle"]}}, "export.formats.0"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"sparsity": {"target": 0.5, "bogus": True}}, "sparsity.bogus"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES, ids=[f for _, f in BAD_BODIES])
async def test_invalid_spec_is_422_naming_the_field(api: Api, body: dict, field: str) -> None:
    r = await api.client.post("/api/v1/jobs", json=body, headers=api.a)
    problem = assert_problem(r, 422)
    assert problem["type"].endswith("validation-error")
    fields = {e["field"]: e["reason"] for e in problem["errors"]}
    assert field in fields, problem
    assert fields[field]
    assert api.store.list_jobs(api.owner_a) == ([], None)
    assert api.queue_length() == 0


@pytest.mark.parametrize(
    "raw", [b'{"dataset":', b"[]", b'"job"', b"\xff\xfe{}", b"[" * 1500 + b"]" * 1500], ids=["cut", "list", "str", "utf8", "deep"]
)
async def test_malformed_json_is_422_on_body(api: Api, raw: bytes) -> None:
    r = await api.client.post("/api/v1/jobs", content=raw, headers={**api.a, "Content-Type": "application/json"})
    problem = assert_problem(r, 422)
    assert [e["field"] for e in problem["errors"]] == ["body"]


async def test_symlink_out_of_data_dir_is_refused(api: Api, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.npz").write_bytes(b"secret")
    (api.settings.data_dir / "link").symlink_to(outside)
    r = await api.client.post("/api/v1/jobs", json={**SMALL, "dataset": {"name": "npz", "path": "link/x.npz"}}, headers=api.a)
    assert [e["field"] for e in assert_problem(r, 422)["errors"]] == ["dataset.path"]


async def test_submit_stores_and_queues(api: Api) -> None:
    body = {"dataset": {"name": "npz", "path": "cifar/train.npz"}, **SMALL, "sparsity": {"target": 0.8}}
    r = await api.client.post("/api/v1/jobs", json=body, headers=api.a)
    assert r.status_code == 202
    job = r.json()
    job_id = job["id"]
    assert r.headers["location"] == f"/api/v1/jobs/{job_id}"
    assert job["urls"] == {
        "self": f"/api/v1/jobs/{job_id}",
        "events": f"/api/v1/jobs/{job_id}/events",
        "metrics": f"/api/v1/jobs/{job_id}/metrics",
        "artifacts": f"/api/v1/jobs/{job_id}/artifacts",
        "cancel": f"/api/v1/jobs/{job_id}/cancel",
    }
    assert job["status"] == "queued" and job["queue"] == "cpu" and job["attempt"] == 0
    # The stored spec is the validated one, defaults filled in.
    assert job["spec"] == S.JobSpec.from_dict(body).to_dict()
    assert job["spec"]["sparsity"]["target"] == 0.8 and job["spec"]["architecture"] == "cnn_small"
    assert job["progress"] == {"megabatch": 0, "megabatches": 2, "epoch": 0, "epochs": 3, "fraction": 0.0}
    assert api.queued_job_ids() == [job_id]
    stored = api.store.get_job(job_id)
    assert stored.owner == api.owner_a and stored.status == "queued"
    r = await api.client.get(f"/api/v1/jobs/{job_id}", headers=api.a)
    assert r.status_code == 200 and r.json() == job


async def test_gpu_queue_when_configured(settings: Settings) -> None:
    gpu_settings = settings.model_copy(update={"queues": ("cpu", "gpu")})
    async for api in make_api(gpu_settings):
        r = await api.client.get("/api/v1/catalog")
        assert r.json()["devices"] == ["auto", "cpu", "cuda"]
        job = await api.submit({**SMALL, "training": {"epochs": 2, "device": "cuda"}})
        assert job["queue"] == "gpu"
        assert api.queued_job_ids("gpu") == [job["id"]] and api.queue_length("cpu") == 0


# --- auth and isolation ----------------------------------------------------------------------------
async def test_auth_required(api: Api) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic dXNlcjpwdw=="}):
        r = await api.client.get("/api/v1/jobs", headers=headers)
        assert_problem(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = await api.client.post("/api/v1/jobs", json=SMALL)
    assert_problem(r, 401)
    assert api.queue_length() == 0
    assert (await api.client.get("/api/v1/jobs", headers=api.a)).status_code == 200
    api.store.revoke_key(api.owner_a)
    assert_problem(await api.client.get("/api/v1/jobs", headers=api.a), 401)


async def test_auth_can_be_disabled(settings: Settings) -> None:
    async for api in make_api(settings.model_copy(update={"auth_enabled": False})):
        job = await api.submit(headers={})
        r = await api.client.get("/api/v1/jobs")
        assert [j["id"] for j in r.json()["items"]] == [job["id"]]
        assert api.store.get_job(job["id"]).owner == "anonymous"


async def test_other_keys_jobs_are_404_everywhere(api: Api) -> None:
    job_id = (await api.submit())["id"]
    api.store.transition(job_id, "running", allowed_from={"queued"})
    api.store.transition(job_id, "succeeded", allowed_from={"running"})
    c, b = api.client, api.b
    for method, path in [
        ("GET", f"/api/v1/jobs/{job_id}"),
        ("POST", f"/api/v1/jobs/{job_id}/cancel"),
        ("DELETE", f"/api/v1/jobs/{job_id}"),
        ("GET", f"/api/v1/jobs/{job_id}/events"),
        ("GET", f"/api/v1/jobs/{job_id}/metrics"),
        ("GET", f"/api/v1/jobs/{job_id}/artifacts"),
        ("GET", "/api/v1/jobs/not-a-job"),
        ("GET", "/api/v1/jobs/x:events/metrics"),
    ]:
        assert_problem(await c.request(method, path, headers=b), 404)
    assert (await c.get("/api/v1/jobs", headers=b)).json() == {"items": [], "next_cursor": None}
    assert api.store.get_job(job_id).status == "succeeded"  # B's DELETE did nothing


# --- idempotency and limits ---------------------------------------------------------------------------
async def test_idempotency_replay_and_conflict(api: Api) -> None:
    headers = {**api.a, "Idempotency-Key": "retry-1"}
    first = await api.client.post("/api/v1/jobs", json=SMALL, headers=headers)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    # The same job spelled with a default written out is the same request.
    same = {**SMALL, "training": {"epochs": 3, "batch_size": 64}}
    again = await api.client.post("/api/v1/jobs", json=same, headers=headers)
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and again.headers["location"] == first.headers["location"]
    assert api.queue_length() == 1
    assert len(api.store.list_jobs(api.owner_a)[0]) == 1

    other = await api.client.post("/api/v1/jobs", json={**SMALL, "method": "osp"}, headers=headers)
    assert [e["field"] for e in assert_problem(other, 422)["errors"]] == ["Idempotency-Key"]
    # Keys are per API key: B's "retry-1" is a different request.
    mine = await api.client.post("/api/v1/jobs", json=SMALL, headers={**api.b, "Idempotency-Key": "retry-1"})
    assert mine.status_code == 202 and mine.json()["id"] != first.json()["id"]
    assert api.queue_length() == 2


async def test_concurrent_jobs_per_key_limit(api: Api) -> None:
    ids = [(await api.submit())["id"] for _ in range(3)]
    r = await api.client.post("/api/v1/jobs", json=SMALL, headers=api.a)
    assert_problem(r, 429)
    assert int(r.headers["retry-after"]) > 0
    assert (await api.client.post("/api/v1/jobs", json=SMALL, headers=api.b)).status_code == 202
    assert (await api.client.post(f"/api/v1/jobs/{ids[0]}/cancel", headers=api.a)).status_code == 200
    assert (await api.client.post("/api/v1/jobs", json=SMALL, headers=api.a)).status_code == 202
    assert api.queue_length() == 5


async def test_enqueue_failure_marks_job_failed(api: Api, settings: Settings) -> None:
    app = api.client._transport.app  # type: ignore[attr-defined]
    broken = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{closed_port()}/0"})
    app.state.celery = create_celery(broken)
    t0 = time.monotonic()
    r = await api.client.post("/api/v1/jobs", json=SMALL, headers={**api.a, "Idempotency-Key": "k"})
    assert time.monotonic() - t0 < 2.0
    assert_problem(r, 503)
    assert r.headers["retry-after"]
    jobs, _ = api.store.list_jobs(api.owner_a)
    assert [j.status for j in jobs] == ["failed"]
    assert jobs[0].error.startswith("could not be queued")
    assert api.store.count_active(api.owner_a) == 0
    app.state.celery.close()
    # The key was released: the retry (broker back) goes through.
    app.state.celery = create_celery(settings)
    r = await api.client.post("/api/v1/jobs", json=SMALL, headers={**api.a, "Idempotency-Key": "k"})
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers


# --- listing, cancel, delete ------------------------------------------------------------------------
async def test_list_newest_first_with_filter_and_cursor(settings: Settings) -> None:
    async for api in make_api(settings.model_copy(update={"max_concurrent_jobs_per_key": 10})):
        ids = [(await api.submit())["id"] for _ in range(5)]
        for job_id in ids[1:3]:
            assert (await api.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=api.a)).status_code == 200
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = (await api.client.get("/api/v1/jobs", params=params, headers=api.a)).json()
            seen += [j["id"] for j in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == 3 and sorted(seen) == sorted(ids) and len(seen) == 5
        created = [api.store.get_job(i).created_at for i in seen]
        assert created == sorted(created, reverse=True)
        r = await api.client.get("/api/v1/jobs", params={"status": "cancelled"}, headers=api.a)
        assert sorted(j["id"] for j in r.json()["items"]) == sorted(ids[1:3])
        assert {j["status"] for j in r.json()["items"]} == {"cancelled"}
        for params, field in [
            ({"status": "done"}, "status"),
            ({"limit": 0}, "limit"),
            ({"limit": 101}, "limit"),
            ({"limit": "ten"}, "limit"),
            ({"cursor": "not-a-cursor"}, "cursor"),
        ]:
            r = await api.client.get("/api/v1/jobs", params=params, headers=api.a)
            assert [e["field"] for e in assert_problem(r, 422)["errors"]] == [field]


async def test_cancel(api: Api) -> None:
    queued = (await api.submit())["id"]
    r = await api.client.post(f"/api/v1/jobs/{queued}/cancel", headers=api.a)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    assert_problem(await api.client.post(f"/api/v1/jobs/{queued}/cancel", headers=api.a), 409)

    running = (await api.submit())["id"]
    api.store.transition(running, "running", allowed_from={"queued"})
    r = await api.client.post(f"/api/v1/jobs/{running}/cancel", headers=api.a)
    assert r.status_code == 202
    assert r.json()["status"] == "cancelling" and r.json()["cancel_requested"] is True
    statuses = [e["status"] for _, e in api.store.read_events(running)]
    assert statuses == ["running", "cancelling"]


async def test_delete_only_finished_jobs(api: Api) -> None:
    job_id = (await api.submit())["id"]
    assert_problem(await api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.a), 409)
    api.store.transition(job_id, "running", allowed_from={"queued"})
    assert_problem(await api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.a), 409)
    folder = api.settings.artifacts_dir / job_id
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    api.store.append_event(job_id, Pruned(megabatch=1, target_density=0.5, density=0.5, pruner="snip"))
    api.store.transition(job_id, "failed", reason="boom", allowed_from={"running"})
    r = await api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.a)
    assert r.status_code == 204 and r.content == b""
    assert not folder.exists()
    assert_problem(await api.client.get(f"/api/v1/jobs/{job_id}", headers=api.a), 404)
    assert not api.store.redis.exists(api.store.events_key(job_id))
    assert_problem(await api.client.delete(f"/api/v1/jobs/{job_id}", headers=api.a), 404)


# --- metrics history and artifacts -----------------------------------------------------------------
def epoch_event(m: int, e: int, loss: float) -> EpochEnded:
    return epoch_ended(m, e, epochs=3, loss=loss)


async def test_metrics_history(api: Api) -> None:
    job_id = (await api.submit())["id"]
    api.store.transition(job_id, "running", allowed_from={"queued"})
    for m in (1, 2):
        for e in (1, 2, 3):
            api.store.append_event(job_id, epoch_event(m, e, loss=1.0 / (m * e)))
        api.store.append_event(job_id, megabatch_ended(m, 2, test_accuracy=0.5 + 0.1 * m, density=0.8**m))
    r = await api.client.get(f"/api/v1/jobs/{job_id}/metrics", headers=api.a)
    assert r.status_code == 200
    body = r.json()
    assert [p["megabatch"] for p in body["megabatches"]] == [1, 2]
    assert body["megabatches"][1]["test_accuracy"] == pytest.approx(0.7)
    assert [(p["megabatch"], p["epoch"]) for p in body["epochs"]] == [(m, e) for m in (1, 2) for e in (1, 2, 3)]
    assert body["epochs"][5]["train_loss"] == pytest.approx(1 / 6)
    job = (await api.client.get(f"/api/v1/jobs/{job_id}", headers=api.a)).json()
    assert job["progress"]["fraction"] == 1.0 and job["latest_metrics"]["test_accuracy"] == pytest.approx(0.7)


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
    expired = f"{base}/model.safetensors?expires={past}&sig={sign('test-signing-secret', job_id, 'model.safetensors', past)}"
    assert "expired" in assert_problem(await api.client.get(expired), 403)["detail"]
    # A valid signature for a file the worker did not list is still refused.
    later = int(time.time()) + 60
    for name in ("not-listed.txt", "..", "%2E%2E%2Fsecret"):
        url = f"{base}/{name}?expires={later}&sig={sign('test-signing-secret', job_id, name, later)}"
        assert (await api.client.get(url)).status_code in (403, 404)
    assert_problem(await api.client.get(f"{base}/model.safetensors"), 422)


# --- events (SSE) -------------------------------------------------------------------------------------
def parse_sse(text: str) -> tuple[list[dict[str, Any]], int]:
    """(messages with id/event/data, number of comment lines)."""
    messages, comments = [], 0
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                comments += 1
            elif line:
                key, _, value = line.partition(": ")
                fields[key] = value
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
            messages.append(fields)
    return messages, comments


async def test_events_in_order_then_end(api: Api) -> None:
    job_id = (await api.submit())["id"]
    store = api.store
    store.transition(job_id, "running", allowed_from={"queued"})
    store.append_event(job_id, RunStarted(megabatches=2, epochs=3))
    for e in (1, 2, 3):
        store.append_event(job_id, epoch_event(1, e, loss=1.0 / e))
    store.transition(job_id, "succeeded", allowed_from={"running"})
    expected = store.read_events(job_id)

    r = await api.client.get(f"/api/v1/jobs/{job_id}/events", headers=api.a)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    messages, _ = parse_sse(r.text)
    assert [m["id"] for m in messages] == [i for i, _ in expected]
    assert [m["event"] for m in messages] == ["status_changed", "run_started", "epoch_ended", "epoch_ended",
                                              "epoch_ended", "status_changed"]
    assert [m["data"] for m in messages] == [e for _, e in expected]
    assert messages[-1]["data"]["status"] == "succeeded"

    # Resume after the third event, by header or by query parameter.
    third = messages[2]["id"]
    for kwargs in ({"headers": {**api.a, "Last-Event-ID": third}}, {"headers": api.a, "params": {"last_event_id": third}}):
        r = await api.client.get(f"/api/v1/jobs/{job_id}/events", **kwargs)
        assert [m["id"] for m in parse_sse(r.text)[0]] == [m["id"] for m in messages[3:]]
    # Resuming after the last event of a finished job ends at once.
    r = await api.client.get(f"/api/v1/jobs/{job_id}/events", headers={**api.a, "Last-Event-ID": messages[-1]["id"]})
    assert parse_sse(r.text)[0] == []
    for bad in ("x", "99999999999999999999-0"):
        r = await api.client.get(f"/api/v1/jobs/{job_id}/events", headers={**api.a, "Last-Event-ID": bad})
        assert [e["field"] for e in assert_problem(r, 422)["errors"]] == ["Last-Event-ID"]
    r = await api.client.get(f"/api/v1/jobs/{job_id}/events", params={"last_event_id": "1-99999999999999999999"},
                             headers=api.a)
    assert [e["field"] for e in assert_problem(r, 422)["errors"]] == ["last_event_id"]


async def test_events_live_with_heartbeats(api: Api) -> None:
    job_id = (await api.submit())["id"]
    store = api.store
    store.transition(job_id, "running", allowed_from={"queued"})

    async def worker() -> None:
        # Idle for a few heartbeats (0.2 s), then a megabatch and the end of the job.
        await anyio.sleep(0.7)
        for e in (1, 2, 3):
            await anyio.to_thread.run_sync(store.append_event, job_id, epoch_event(1, e, loss=0.3))
        await anyio.sleep(0.3)
        await anyio.to_thread.run_sync(
            lambda: store.transition(job_id, "succeeded", allowed_from={"running"})
        )

    t0 = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        with anyio.fail_after(10):
            r = await api.client.get(f"/api/v1/jobs/{job_id}/events", headers=api.a)
    elapsed = time.monotonic() - t0
    messages, comments = parse_sse(r.text)
    assert [m["event"] for m in messages] == ["status_changed"] + ["epoch_ended"] * 3 + ["status_changed"]
    assert [m["data"].get("epoch") for m in messages[1:4]] == [1, 2, 3]
    assert messages[-1]["data"]["status"] == "succeeded"
    assert comments >= 3  # heartbeats while idle
    assert 1.0 <= elapsed < 5.0
    assert r.text.startswith("retry: ")


# --- catalog, health, metrics, errors ------------------------------------------------------------------
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
                              "max_body_bytes": 4096, "download_url_ttl_s": 3600}


async def test_health(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    assert (await api.client.get("/readyz")).json() == {"status": "ready"}


async def test_prometheus_metrics(api: Api) -> None:
    done = (await api.submit())["id"]
    await api.submit()
    api.store.transition(done, "running", allowed_from={"queued"})
    api.store.transition(done, "succeeded", allowed_from={"running"})
    await api.client.get("/api/v1/jobs/0123/metrics", headers=api.a)
    r = await api.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values['jobs{status="queued"}'] == 1 and values['jobs{status="succeeded"}'] == 1
    assert values['queue_depth{queue="cpu"}'] == 2
    assert values['job_duration_seconds_count{status="succeeded"}'] == 1
    assert values['http_requests_total{method="POST",route="/api/v1/jobs",status="202"}'] == 2
    assert values['http_requests_total{method="GET",route="/api/v1/jobs/{job_id}/metrics",status="404"}'] == 1
    assert values["store_up"] == 1
    r = await api.client.get("/metrics")  # a finished job is observed once
    assert 'job_duration_seconds_count{status="succeeded"} 1.0' in r.text


async def test_http_errors_are_problems(api: Api) -> None:
    assert_problem(await api.client.get("/api/v1/nothing-here"), 404)
    r = await api.client.put("/api/v1/jobs", headers=api.a)
    assert_problem(r, 405)
    assert "POST" in r.headers["allow"]
    big = {"dataset": {"name": "npz", "path": "x" * 5000}}
    too_large = assert_problem(await api.client.post("/api/v1/jobs", json=big, headers=api.a), 413)
    assert too_large["type"] == "urn:anytime-prune:problem:body-too-large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
        for _ in range(10):
            yield b" " * 1000

    r = await api.client.post("/api/v1/jobs", content=chunks(), headers={**api.a, "Content-Type": "application/json"})
    assert assert_problem(r, 413)["type"] == too_large["type"]  # the same problem either way
    assert api.queue_length() == 0


async def test_redis_down_is_fast_503(settings: Settings) -> None:
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{closed_port()}/0"})
    async for api_down in _app_without_keys(down):
        client = api_down
        t0 = time.monotonic()
        for method, path in [("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs"), ("GET", "/api/v1/jobs/" + "a" * 32),
                             ("GET", "/api/v1/jobs/" + "a" * 32 + "/events")]:
            r = await client.request(method, path, json=SMALL if method == "POST" else None,
                                     headers={"Authorization": "Bearer whatever"})
            assert_problem(r, 503)
            assert int(r.headers["retry-after"]) > 0
        r = await client.get("/readyz")
        assert "redis" in assert_problem(r, 503)["detail"]
        assert time.monotonic() - t0 < 2.0
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/api/v1/catalog")).status_code == 200
        r = await client.get("/metrics")
        assert r.status_code == 200 and "store_up 0.0" in r.text


async def _app_without_keys(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        yield client


async def test_openapi_document(api: Api) -> None:
    doc = (await api.client.get("/openapi.json")).json()
    operation_ids = {op["operationId"] for item in doc["paths"].values() for op in item.values()}
    assert operation_ids == {
        "create_job", "list_jobs", "get_job", "cancel_job", "delete_job", "job_events", "job_metrics",
        "job_artifacts", "download_artifact", "catalog", "healthz", "readyz", "prometheus_metrics",
    }
    assert all(p.startswith("/api/v1/") or p in ("/healthz", "/readyz", "/metrics") for p in doc["paths"])
    create = doc["paths"]["/api/v1/jobs"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    assert set(doc["components"]["schemas"]["JobSpec"]["properties"]) == set(S.JobSpec.model_fields)
    assert create["responses"]["422"]["content"] == {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert (await api.client.get("/docs")).status_code == 200


def test_api_imports_no_torch_numpy_engine_or_worker() -> None:
    code = (
        "import sys, api.main; "
        "bad = [m for m in ('torch', 'numpy', 'app_engine', 'worker') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_redis_server_is_not_needed_to_build_the_app() -> None:
    # create_app connects lazily: building it against a dead Redis must not block or fail.
    t0 = time.monotonic()
    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{closed_port()}/0", signing_secret="s"))
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(redis.exceptions.ConnectionError):
        app.state.store.ping()
