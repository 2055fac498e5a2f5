"""Your own data, end to end: the client and the ``anytime-prune datasets`` verbs against a real
API, control worker and training worker (tests/service_stack.py, the local storage backend).

An npz the test writes (the digits in the npz loader's layout) is uploaded, validated and
trained on by id; a file the loader refuses ends ``invalid`` with the loader's reason (exit 1).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from service_stack import ROOT, TINY_SPEC, ServiceStack, service_stack

from anytime_prune.client import Client, DatasetInvalid

pytestmark = pytest.mark.slow


def write_digits_npz(path: Path) -> Path:
    """The 8x8 digits as features [N, 64] in [0, 1], with a held-out split and class names."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1400], order[1400:]
    np.savez_compressed(path, x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test],
                        classes=np.array([str(c) for c in range(10)]))
    return path


def write_npz_without_x_train(path: Path) -> Path:
    np.savez(path, y_train=np.zeros(4, dtype=np.int64), x_test=np.zeros((2, 3), np.float32),
             y_test=np.zeros(2, dtype=np.int64))
    return path


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    with service_stack(redis_url, tmp_path_factory.mktemp("datasets-stack")) as s:
        yield s


@pytest.fixture(scope="module")
def secret(stack: ServiceStack) -> str:
    return stack.new_key("datasets")[1]


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_npz(tmp_path_factory.mktemp("npz") / "my.npz")


def test_python_client_uploads_and_trains_by_id(stack: ServiceStack, secret: str, digits_npz: Path) -> None:
    with stack.client(secret) as client:
        record = client.upload_dataset(digits_npz, "npz", name="digits as npz", timeout_s=120)
        assert record["status"] == "ready" and record["name"] == "digits as npz", stack.log_tail()
        info = record["info"]
        assert (info["train_samples"], info["test_samples"], info["num_classes"]) == (1400, 397, 10)
        assert info["input_shape"] == [64] and info["classes"] == [str(c) for c in range(10)]
        assert record["id"] in [d["id"] for d in client.list_datasets()]

        spec: dict[str, Any] = {k: v for k, v in TINY_SPEC.items() if k != "dataset"}
        job = client.submit(spec, dataset_id=record["id"])
        assert job["spec"]["dataset"]["name"] == "npz"  # filled in from the upload's format
        final = client.wait(job["id"], timeout=240, poll_s=0.5)
        assert final["status"] == "succeeded", (final, stack.log_tail())
        assert len(final["result"]["megabatches"]) == 2

        client.delete_dataset(record["id"])
        assert record["id"] not in [d["id"] for d in client.list_datasets()]


def test_python_client_raises_the_reason_of_an_invalid_file(stack: ServiceStack, secret: str,
                                                            tmp_path: Path) -> None:
    with stack.client(secret) as client, pytest.raises(DatasetInvalid) as caught:
        client.upload_dataset(write_npz_without_x_train(tmp_path / "bad.npz"), "npz", timeout_s=120)
    assert "x_train" in caught.value.reason
    assert client_status(stack, secret, caught.value.dataset["id"]) == "invalid"


def client_status(stack: ServiceStack, secret: str, dataset_id: str) -> str:
    with Client(stack.url, secret) as client:
        return str(client.get_dataset(dataset_id)["status"])


def test_cli_upload_list_show_submit_by_id_and_delete(stack: ServiceStack, secret: str, digits_npz: Path,
                                                      tmp_path: Path) -> None:
    up = stack.cli("datasets", "upload", str(digits_npz), "--format", "npz", secret=secret)
    assert up.returncode == 0, up.stderr + stack.log_tail()
    dataset_id = up.stdout.strip()
    assert up.stdout == dataset_id + "\n" and len(dataset_id) == 32  # the id alone, for $(...)
    assert "1400 train / 397 test samples, 10 classes, input 64" in up.stderr

    listed = stack.cli("datasets", "list", secret=secret)
    assert listed.returncode == 0 and dataset_id in listed.stdout and "ready" in listed.stdout
    shown = stack.cli("datasets", "show", dataset_id, secret=secret)
    assert shown.returncode == 0 and "classes   0, 1, 2" in shown.stdout

    run = stack.cli("submit", "--dataset", "npz", "--dataset-id", dataset_id, "--arch", "mlp", "--megabatches", "2",
                    "--epochs", "1", "--precision", "fp32", "--target-sparsity", "0.5", "--watch",
                    secret=secret, timeout=240)
    assert run.returncode == 0, run.stderr + stack.log_tail()
    job_id = run.stdout.splitlines()[0]
    got = stack.cli("download", job_id, "--out", str(tmp_path / "m"), secret=secret)
    assert got.returncode == 0 and (tmp_path / "m" / "model.sparse.safetensors").is_file(), got.stderr

    other = stack.cli("datasets", "show", dataset_id, secret=stack.new_key("someone else")[1])
    assert other.returncode == 4 and "404" in other.stderr  # another key never sees it
    gone = stack.cli("datasets", "delete", dataset_id, secret=secret)
    assert gone.returncode == 0 and f"dataset {dataset_id} deleted" in gone.stdout
    assert stack.cli("datasets", "show", dataset_id, secret=secret).returncode == 4


def test_cli_invalid_upload_exits_1_with_the_reason(stack: ServiceStack, secret: str, tmp_path: Path) -> None:
    truncated = tmp_path / "cut.zip"
    with zipfile.ZipFile(truncated, "w") as archive:
        archive.writestr("cifar-10-batches-py/data_batch_1", b"x" * 1000)
    truncated.write_bytes(truncated.read_bytes()[:-30])  # no end of central directory: not a zip
    for path, fmt, reason in ((write_npz_without_x_train(tmp_path / "bad.npz"), "npz", "x_train"),
                              (truncated, "cifar10", "")):
        result = stack.cli("datasets", "upload", str(path), "--format", fmt, secret=secret)
        assert result.returncode == 1, result.stdout + result.stderr + stack.log_tail()
        assert result.stdout == ""
        assert "is invalid: " in result.stderr and reason in result.stderr


def test_upload_verb_needs_no_torch(stack: ServiceStack, secret: str, digits_npz: Path) -> None:
    code = f"""
import contextlib, io, sys
from anytime_prune.cli import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    assert main(["datasets", "upload", {str(digits_npz)!r}, "--format", "npz", "--no-wait"]) == 0
    assert main(["datasets", "list"]) == 0
heavy = sorted(m for m in ("torch", "numpy", "fastapi", "celery", "app_engine", "worker", "api") if m in sys.modules)
assert not heavy, heavy
print("ok")
"""
    env = dict(stack.env, ANYTIME_PRUNE_URL=stack.url, ANYTIME_PRUNE_API_KEY=secret)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_with_s3_the_upload_goes_straight_to_the_store(redis_url: str, s3_server: Any, s3_bucket: str,
                                                       tmp_path: Path, digits_npz: Path) -> None:
    """The S3 backend offers a presigned POST: the client sends the file to SeaweedFS itself (the
    API never sees the bytes), then ``complete``; validation reads it from the store."""
    extra = {**s3_server.env(), "APP_STORAGE_URL": f"s3://{s3_bucket}/service"}
    with service_stack(redis_url, tmp_path / "s3-stack", worker=False, extra_env=extra) as s3_stack:
        s3_stack.start_control_worker()  # validation only: no training here
        secret = s3_stack.new_key("s3")[1]
        offered = httpx.post(f"{s3_stack.url}/api/v1/datasets", headers={"Authorization": f"Bearer {secret}"},
                             json={"format": "npz", "name": "probe", "sha256": "0" * 64, "bytes": 10}).json()
        assert offered["upload"]["post"]["url"].startswith(s3_server.endpoint_url), offered
        with s3_stack.client(secret) as client:
            client.delete_dataset(offered["id"])
            sent: list[tuple[int, int]] = []
            record = client.upload_dataset(digits_npz, "npz", progress=lambda done, total: sent.append((done, total)),
                                           timeout_s=120)
            assert record["status"] == "ready", s3_stack.log_tail()
            assert record["info"]["train_samples"] == 1400
            assert sent[-1] == (digits_npz.stat().st_size, digits_npz.stat().st_size)
            with pytest.raises(DatasetInvalid, match="x_train"):
                client.upload_dataset(write_npz_without_x_train(tmp_path / "bad.npz"), "npz", timeout_s=120)
