"""api/routes/jobs.py: submission and validation, idempotency, limits, listing, cancel, delete, metric history,
jobs on uploaded datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
from api_support import SMALL, Api, assert_problem, epoch_event, make_api
from factories import megabatch_ended

from app_common import spec as S
from app_common.datasets import DatasetInfo
from app_common.events import Pruned
from app_common.settings import Settings

pytestmark = pytest.mark.anyio


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


async def test_symlink_out_of_data_dir_is_refused(api: Api, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.npz").write_bytes(b"secret")
    (api.settings.data_dir / "link").symlink_to(outside)
    body = {**SMALL, "dataset": {"name": "npz", "path": "link/x.npz"}}
    r = await api.client.post("/api/v1/jobs", json=body, headers=api.a)
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
        "models": f"/api/v1/jobs/{job_id}/models",
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
    # The cancelled job left its queue: only the four live jobs wait for a worker.
    assert api.queue_length() == 4 and ids[0] not in api.queued_job_ids()


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


# --- jobs on an uploaded dataset (dataset.id) -------------------------------------------------------
def uploaded(api: Api, owner: str, *, fmt: str = "npz", ready: bool = True) -> str:
    """A dataset of ``owner`` straight in the store (the upload itself is test_api_datasets')."""
    record = api.store.create_dataset(owner, name="mine", format=fmt, sha256="ab" * 32, bytes=10)
    if ready:
        api.store.move_dataset(record.id, "validating", allowed_from={"uploading"})
        info = DatasetInfo(train_samples=8, test_samples=2, num_classes=2, classes=["a", "b"], input_shape=[4])
        api.store.set_dataset_ready(record.id, info)
    return record.id


async def test_job_on_an_uploaded_dataset_gets_its_format_as_name(api: Api) -> None:
    dataset_id = uploaded(api, api.owner_a, fmt="cifar10")
    job = await api.submit({"dataset": {"id": dataset_id}, **SMALL})
    assert job["spec"]["dataset"]["id"] == dataset_id and job["spec"]["dataset"]["name"] == "cifar10"
    stored = api.store.get_job(job["id"])
    assert stored is not None and stored.spec["dataset"] == job["spec"]["dataset"]
    assert api.queued_job_ids() == [job["id"]]
    same = await api.submit({"dataset": {"id": dataset_id, "name": "cifar10", "few_shot": 2}, **SMALL})
    assert same["spec"]["dataset"]["few_shot"] == 2


async def test_job_on_an_uploaded_dataset_replays_with_its_idempotency_key(api: Api) -> None:
    dataset_id = uploaded(api, api.owner_a)
    headers = {**api.a, "Idempotency-Key": "on-upload"}
    body = {"dataset": {"id": dataset_id}, **SMALL}
    first = await api.client.post("/api/v1/jobs", json=body, headers=headers)
    again = await api.client.post("/api/v1/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and api.queue_length() == 1


async def test_job_on_a_dataset_that_is_not_ready_is_409(api: Api) -> None:
    for status in ("uploading", "validating", "invalid"):
        dataset_id = uploaded(api, api.owner_a, ready=False)
        if status != "uploading":
            api.store.move_dataset(dataset_id, "validating", allowed_from={"uploading"})
        if status == "invalid":
            api.store.set_dataset_invalid(dataset_id, "not a zip file")
        r = await api.client.post("/api/v1/jobs", json={"dataset": {"id": dataset_id}, **SMALL}, headers=api.a)
        problem = assert_problem(r, 409)
        assert problem["type"].endswith("dataset-not-ready") and status in problem["detail"]
        if status == "invalid":
            assert "not a zip file" in problem["detail"]
    assert api.queue_length() == 0 and api.store.list_jobs(api.owner_a) == ([], None)


@pytest.mark.parametrize(
    ("dataset", "field"),
    [
        ({"id": "0" * 32}, "dataset.id"),  # nobody's
        ({"id": "B's"}, "dataset.id"),  # replaced below by key b's dataset
        ({"id": "not-hex"}, "dataset.id"),
        ({"id": "A", "name": "imagefolder"}, "dataset.name"),  # A: key a's npz dataset
        ({"id": "A", "name": "digits"}, "dataset.name"),
        ({"id": "A", "path": "cifar/train.npz"}, "dataset.path"),
    ],
)
async def test_job_naming_a_dataset_it_cannot_use_is_422(api: Api, dataset: dict[str, str], field: str) -> None:
    mine, theirs = uploaded(api, api.owner_a), uploaded(api, api.owner_b)
    dataset = dataset | {"id": {"A": mine, "B's": theirs}.get(dataset["id"], dataset["id"])}
    r = await api.client.post("/api/v1/jobs", json={"dataset": dataset, **SMALL}, headers=api.a)
    problem = assert_problem(r, 422)
    assert field in [e["field"] for e in problem["errors"]], problem
    assert api.queue_length() == 0 and api.store.list_jobs(api.owner_a) == ([], None)
