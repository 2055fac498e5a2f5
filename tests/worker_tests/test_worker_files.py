"""worker/files.py: the run folder mirrored to the store, with the local backend and with S3
(SeaweedFS): a run stopped on one "host" resumes on another from the store alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from s3_server import S3Server
from worker_support import SPEC, events, spec_with

from app_common.events import Event, MegabatchEnded, RunStarted
from app_common.settings import Settings
from app_common.spec import JobSpec
from app_common.storage import LocalStorage, Storage, StorageError, job_work_prefix
from app_common.store import JobStore
from app_engine.runner import StopRun, run
from worker.files import RunFolderMirror
from worker.job import execute_job

THREE = {**SPEC, "stream": {"megabatches": 3}}


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    import boto3

    from app_common.storage.s3 import S3Storage, _client

    server: S3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    plain = boto3.client("s3", endpoint_url=server.endpoint_url, aws_access_key_id=server.access_key,
                         aws_secret_access_key=server.secret_key, region_name=server.region)
    return S3Storage(bucket, "svc", client=_client(None, like=plain))


class StopAfter:
    """A callback that stops the run once megabatch ``n`` ended (a worker that went away)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.started: list[RunStarted] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.started.append(event)
        if isinstance(event, MegabatchEnded) and event.megabatch == self.n:
            raise StopRun("host went away")


def metrics(result: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("test_accuracy", "density", "test_errors", "val_accuracy", "train_loss", "nonzero_params")
    return [{k: m[k] for k in keys} for m in result["megabatches"]]


def stored_names(storage: Storage, job_id: str) -> list[str]:
    prefix = job_work_prefix(job_id)
    return [o.key[len(prefix):] for o in storage.list(prefix)]


def test_a_run_stopped_on_one_host_resumes_on_another(storage: Storage, tmp_path: Path) -> None:
    spec = JobSpec.from_dict(THREE)
    host_a = RunFolderMirror(storage, "job1", tmp_path / "host-a" / "job1")
    assert host_a.fetch() is None  # nothing stored yet: a fresh start
    stop = StopAfter(2)
    stopped = run(spec, host_a.out_dir, callbacks=[host_a, stop])
    assert stopped.stopped and host_a.uploads == 2
    assert stored_names(storage, "job1") == [
        "checkpoint.json", "checkpoints/megabatch-0001.pt", "checkpoints/megabatch-0002.pt",
    ]

    host_b = RunFolderMirror(storage, "job1", tmp_path / "host-b" / "job1")
    assert host_b.fetch() == 2
    assert sorted(p.name for p in (host_b.out_dir / "checkpoints").iterdir()) == [
        "megabatch-0001.pt", "megabatch-0002.pt",
    ]
    watch = StopAfter(99)
    resumed = run(spec, host_b.out_dir, callbacks=[host_b, watch])
    assert not resumed.stopped and watch.started[0].resumed_after == 2
    # The engine keeps two checkpoints: the store drops the one its record no longer names.
    assert stored_names(storage, "job1") == [
        "checkpoint.json", "checkpoints/megabatch-0002.pt", "checkpoints/megabatch-0003.pt",
    ]
    local_record = (host_b.out_dir / "checkpoint.json").read_bytes()
    assert b"".join(storage.iter_chunks(job_work_prefix("job1") + "checkpoint.json")) == local_record

    reference = run(spec, tmp_path / "reference")
    assert metrics(resumed.result) == metrics(reference.result)

    host_b.upload_artifacts(resumed.artifacts)
    assert {o.key.rsplit("/", 1)[-1] for o in storage.list("jobs/job1/artifacts/")} == set(resumed.artifacts)


def test_fetch_empties_the_local_folder(storage: Storage, tmp_path: Path) -> None:
    out_dir = tmp_path / "job2"
    (out_dir / "checkpoints").mkdir(parents=True)
    (out_dir / "checkpoint.json").write_text('{"checkpoints": []}')
    (out_dir / "checkpoints" / "megabatch-0001.pt").write_bytes(b"stale, from an attempt the store never saw")
    assert RunFolderMirror(storage, "job2", out_dir).fetch() is None
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("file", ["../../escape.pt", "checkpoints/../../x.pt", "other/megabatch-0001.pt", "/abs"])
def test_fetch_refuses_a_record_naming_files_outside_its_folder(storage: Storage, tmp_path: Path, file: str) -> None:
    record = {"spec_fingerprint": "x", "checkpoints": [{"megabatch": 1, "file": file, "sha256": "0", "bytes": 1}]}
    storage.put_stream(job_work_prefix("job3") + "checkpoint.json", [json.dumps(record).encode()])
    with pytest.raises(StorageError):
        RunFolderMirror(storage, "job3", tmp_path / "job3").fetch()
    assert not (tmp_path / "escape.pt").exists()


class FlakyStorage(LocalStorage):
    """A store that refuses the upload of checkpoint ``fail_at`` (the store went away)."""

    def __init__(self, root: Path, fail_at: str) -> None:
        super().__init__(root)
        self.fail_at = fail_at

    def put_file(self, key: str, path: Path) -> Any:
        if key.endswith(self.fail_at):
            raise StorageError(f"{key}: connection refused")
        return super().put_file(key, path)


def test_a_storage_error_while_uploading_a_checkpoint_is_retried(
    store: JobStore, settings: Settings, tmp_path: Path
) -> None:
    job = store.create_job("key_a", spec_with(epochs=1), queue="cpu")
    flaky = FlakyStorage(settings.storage_dir, fail_at="megabatch-0002.pt")
    with pytest.raises(StorageError):
        execute_job(job.id, store=store, settings=settings, storage=flaky)
    record = store.get_job(job.id)
    assert record is not None and record.status == "running" and record.attempt == 1
    assert stored_names(flaky, job.id) == ["checkpoint.json", "checkpoints/megabatch-0001.pt"]

    # The next delivery (Celery's retry) resumes from the store's last checkpoint.
    assert execute_job(job.id, store=store, settings=settings, storage=LocalStorage(settings.storage_dir)) == (
        "succeeded"
    )
    starts = [e["resumed_after"] for e in events(store, job.id) if e["type"] == "run_started"]
    assert starts == [0, 1]
    assert stored_names(flaky, job.id) == []  # a finished job's checkpoints are dropped
    assert not (settings.artifacts_dir / job.id).exists()
