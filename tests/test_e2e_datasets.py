"""Bring your own data, end to end: the real API, a training worker and a control worker (the
tests/service_stack.py stack) on an .npz the test writes; an archive that is not one ends invalid."""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_stack import TINY_SPEC, ServiceStack, service_stack

sys.path.insert(0, str(Path(__file__).parent / "worker_tests"))
from dataset_support import digits_npz  # noqa: E402


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    with service_stack(redis_url, tmp_path_factory.mktemp("datasets")) as s:
        yield s


@pytest.fixture(scope="module")
def http(stack: ServiceStack) -> Iterator[httpx.Client]:
    _, secret = stack.new_key("datasets")
    with httpx.Client(base_url=f"{stack.url}/api/v1", headers={"Authorization": f"Bearer {secret}"},
                      timeout=30.0) as client:
        yield client


def upload(http: httpx.Client, path: Path, fmt: str) -> dict[str, Any]:
    """Create the dataset, PUT its bytes, wait until validation settles; the final record."""
    data = path.read_bytes()
    created = http.post("/datasets", json={"format": fmt, "name": path.name, "bytes": len(data),
                                           "sha256": hashlib.sha256(data).hexdigest()})
    assert created.status_code == 201, created.text
    put = http.put(created.json()["upload"]["put_url"], content=data,
                   headers={"Content-Type": "application/octet-stream"})
    assert put.status_code == 202, put.text
    deadline = time.monotonic() + 120  # a hang guard: validation takes seconds
    while time.monotonic() < deadline:
        record: dict[str, Any] = http.get(f"/datasets/{created.json()['id']}").json()
        if record["status"] in ("ready", "invalid"):
            return record
        time.sleep(0.3)
    raise AssertionError(f"dataset still {record['status']} after 120 s")


def test_train_on_an_uploaded_npz(stack: ServiceStack, http: httpx.Client, tmp_path: Path) -> None:
    record = upload(http, digits_npz(tmp_path / "digits.npz"), "npz")
    assert record["status"] == "ready", (record, stack.log_tail())
    assert record["error"] is None
    assert record["info"] == {"train_samples": 300, "test_samples": 100, "num_classes": 10,
                              "classes": [str(d) for d in range(10)], "input_shape": [1, 8, 8]}
    spec = {**TINY_SPEC, "dataset": {"id": record["id"]}}
    submitted = http.post("/jobs", json=spec)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    deadline = time.monotonic() + 180
    while (job := http.get(f"/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, stack.log_tail()
        time.sleep(0.5)
    assert job["status"] == "succeeded", (job, stack.log_tail())
    assert job["spec"]["dataset"]["id"] == record["id"] and job["spec"]["dataset"]["name"] == "npz"


def test_an_archive_that_is_not_the_format_ends_invalid(http: httpx.Client, tmp_path: Path) -> None:
    record = upload(http, digits_npz(tmp_path / "images.zip"), "imagefolder")  # a zip, but of .npy arrays
    assert record["status"] == "invalid" and record["info"] is None
    assert record["error"].startswith("the archive holds no imagefolder dataset: expected a train/ folder")
