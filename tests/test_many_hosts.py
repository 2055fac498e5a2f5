"""Workers on two "hosts" share nothing but Redis and the object store (S3 on SeaweedFS).

The API, a control worker and two training workers run as processes; each training worker has
its own empty work folder, dataset cache and HOME, and the API sees neither. An .npz is uploaded
(straight to the store, through a presigned POST) and a job submitted on it; the job's worker is
SIGKILLed (all of it: a machine lost) once megabatch 2's checkpoint is in the store; the other
worker's reaper re-sends the job when the lease expires, and that worker fetches the dataset into
its own cache and finishes the job from the store's checkpoint. Its per-megabatch metrics and its
exported tensors equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from s3_server import S3Server
from service_stack import TINY_SPEC, ServiceStack, service_stack

from app_common.storage import Storage, job_work_prefix, open_storage

sys.path.insert(0, str(Path(__file__).parent / "worker_tests"))
from dataset_support import digits_npz  # noqa: E402

pytestmark = pytest.mark.slow

SPEC: dict[str, Any] = {
    **TINY_SPEC,
    "stream": {"megabatches": 4},
    # Long enough per megabatch that the kill lands while megabatch 3 trains.
    "training": {**TINY_SPEC["training"], "epochs": 15},
}
HOSTS = ("host-a", "host-b")
TIMEOUT_S = 240.0
# Timings differ between any two runs; everything else a megabatch reports must not.
TIMINGS = {"wall_time_s", "train_time_s", "images_per_s"}


@pytest.fixture
def stack(redis_url: str, s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> Iterator[ServiceStack]:
    shared = {"APP_STORAGE_URL": f"s3://{s3_bucket}/svc", "APP_JOB_LEASE_TTL_S": "3", **s3_server.env()}
    with service_stack(redis_url, tmp_path / "api", worker=False, extra_env=shared) as s:
        for host in HOSTS:
            home = tmp_path / host
            for folder in ("artifacts", "cache", "home"):
                (home / folder).mkdir(parents=True)
            s.start(host, "worker", "--queue", "cpu", "--hostname", f"{host}-{s.prefix}@%h", extra_env={
                "APP_ARTIFACTS_DIR": str(home / "artifacts"),
                "APP_CACHE_DIR": str(home / "cache"),
                "HOME": str(home / "home"),
                # A folder that is not the API's store folder (the S3 URL wins anyway).
                "APP_STORAGE_DIR": str(home / "storage"),
            })
        s.start_control_worker()
        for name in (*HOSTS, "control"):
            _wait_for_log(s, name, " ready.")
        yield s


def _wait_for_log(stack: ServiceStack, name: str, text: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in stack.logs[name].read_text(errors="replace"):
        stack.check_alive()
        assert time.monotonic() < deadline, f"{name}: no {text!r}\n{stack.log_tail()}"
        time.sleep(0.2)


def _stored_megabatch(storage: Storage, job_id: str) -> int:
    """The newest megabatch whose checkpoint the store's commit record names (0: none)."""
    try:
        raw = b"".join(storage.iter_chunks(job_work_prefix(job_id) + "checkpoint.json"))
    except KeyError:
        return 0
    return max((int(c["megabatch"]) for c in json.loads(raw)["checkpoints"]), default=0)


def _runner(tmp_path: Path, job_id: str) -> str:
    """The host whose work folder holds the job."""
    found = [host for host in HOSTS if (tmp_path / host / "artifacts" / job_id).exists()]
    assert len(found) == 1, found
    return found[0]


def _megabatch_metrics(history: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in history["megabatches"]]


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_a_job_killed_on_one_host_finishes_on_the_other(
    stack: ServiceStack, s3_server: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    storage = open_storage(f"s3://{s3_bucket}/svc", local_dir=tmp_path / "unused")
    _, secret = stack.new_key("many-hosts")
    with stack.client(secret) as client:
        dataset = client.upload_dataset(digits_npz(tmp_path / "digits.npz", n_train=1400, n_test=397), "npz",
                                        timeout_s=TIMEOUT_S, poll_s=0.3)
        assert dataset["status"] == "ready"
        spec = {**SPEC, "dataset": {"id": dataset["id"]}}
        job_id = client.submit(spec)["id"]
        deadline = time.monotonic() + TIMEOUT_S
        while _stored_megabatch(storage, job_id) < 2:
            stack.check_alive()
            assert time.monotonic() < deadline, stack.log_tail()
            time.sleep(0.1)
        victim = _runner(tmp_path, job_id)
        os.killpg(stack.processes[victim].pid, signal.SIGKILL)  # the whole worker: a machine lost
        stack.processes[victim].wait(timeout=10)
        del stack.processes[victim]  # check_alive watches the survivors only
        killed_at = _stored_megabatch(storage, job_id)
        survivor = next(host for host in HOSTS if host != victim)

        final = client.wait(job_id, timeout=TIMEOUT_S, poll_s=0.5)
        assert final["status"] == "succeeded", (final.get("error"), stack.log_tail())
        assert final["attempt"] == 2
        events = [e for _, e in stack.store.read_events(job_id, count=10_000)]
        starts = [e["resumed_after"] for e in events if e["type"] == "run_started"]
        assert starts[0] == 0 and len(starts) == 2 and 2 <= starts[1] <= killed_at < 4
        running = [e["reason"] for e in events if e.get("status") == "running"]
        assert running == [None, "attempt 2: resuming after a lost worker"]
        # Each host fetched the dataset into its own cache.
        for host in HOSTS:
            assert any((tmp_path / host / "cache").iterdir()), host
        # The dead host's folder stays where it died; the survivor dropped its own once done, and
        # the store keeps only the exported files.
        # The survivor cleans up just after it reports the job succeeded: wait for it (hang guard).
        deadline = time.monotonic() + TIMEOUT_S
        while ((tmp_path / survivor / "artifacts" / job_id).exists() or storage.list(job_work_prefix(job_id))) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / victim / "artifacts" / job_id).exists()
        assert not (tmp_path / survivor / "artifacts" / job_id).exists()
        assert storage.list(job_work_prefix(job_id)) == []
        # The API never had a worker's folder: its own holds nothing of the job.
        assert not (stack.artifacts_dir / job_id).exists() and not stack.storage_dir.exists()

        reference_id = client.submit(spec)["id"]
        reference = client.wait(reference_id, timeout=TIMEOUT_S, poll_s=0.5)
        assert reference["status"] == "succeeded" and reference["attempt"] == 1

        assert _megabatch_metrics(client.metrics(job_id)) == _megabatch_metrics(client.metrics(reference_id))
        assert final["result"]["cer"] == reference["result"]["cer"]
        resumed_files = client.download(job_id, tmp_path / "resumed", names=["model.safetensors"])
        reference_files = client.download(reference_id, tmp_path / "reference", names=["model.safetensors"])
        resumed, expected = _tensors(resumed_files[0]), _tensors(reference_files[0])
        assert resumed.keys() == expected.keys() and resumed
        for name, tensor in expected.items():
            assert (resumed[name] == tensor).all(), name
    print(f"many hosts: {time.monotonic() - started:.1f} s")  # noqa: T201  (shown with -s)
