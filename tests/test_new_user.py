"""The issue's "new user" path, as a person types it: ``anytime-prune serve`` (a real subprocess in
an empty folder with its own HOME: embedded Redis, API, training and control workers, and the
credentials file the client then finds by itself), ``datasets upload my.npz --format npz``,
``submit --dataset npz --dataset-id <id> ... --watch``, ``download <job> --out m/``; then the
downloaded model loads and predicts the held-out data of that npz.

Kept small (2 megabatches x 2 epochs); the issue's 8 x 15 run is the same commands with bigger
numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_stack import cli_argv, free_port, stop_process

pytestmark = pytest.mark.slow


def write_blobs_npz(path: Path, *, classes: int = 3, features: int = 20, per_class: int = 150) -> None:
    """Separable Gaussian blobs, a dataset no other test uses: [N, 20] features, 3 classes."""
    rng = np.random.default_rng(11)
    centres = rng.normal(0.0, 3.0, size=(classes, features))
    x = np.concatenate([rng.normal(c, 1.0, size=(per_class, features)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(classes), per_class)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    np.savez(path, x_train=x[:cut], y_train=y[:cut], x_test=x[cut:], y_test=y[cut:])


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A folder and environment of a person who just installed the package: nothing configured."""
    folder = tmp_path_factory.mktemp("new-user")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("APP_", "ANYTIME_PRUNE_", "AWS_")) and k not in ("REDIS_URL", "XDG_CONFIG_HOME")}
    env.update(HOME=str(folder / "home"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    port = free_port()
    log = (folder / "serve.log").open("wb")
    serve = subprocess.Popen(cli_argv("serve", "--port", str(port)), env=env, cwd=folder, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        credentials = folder / "home" / ".config" / "anytime-prune" / "credentials.json"
        deadline = time.monotonic() + 120
        while True:
            assert serve.poll() is None, (folder / "serve.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError, OSError, ValueError):
                url = json.loads(credentials.read_text())["url"]
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, (folder / "serve.log").read_text()[-3000:]
            time.sleep(0.3)
        yield folder, env
    finally:
        stop_process(serve, timeout=30)
        log.close()


User = tuple[Path, dict[str, str]]


def anytime_prune(user: User, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    folder, env = user
    return subprocess.run(cli_argv(*args), env=env, cwd=folder, capture_output=True, text=True, timeout=timeout)


def serve_log(folder: Path) -> str:
    return (folder / "serve.log").read_text(errors="replace")[-3000:]


def test_serve_upload_submit_by_id_watch_download_and_load(user: User) -> None:
    folder, _ = user
    write_blobs_npz(folder / "my.npz")

    up = anytime_prune(user, "datasets", "upload", "my.npz", "--format", "npz")
    assert up.returncode == 0, up.stderr + serve_log(folder)
    dataset_id = up.stdout.strip()
    assert len(dataset_id) == 32 and "360 train / 90 test samples, 3 classes, input 20" in up.stderr

    run = anytime_prune(user, "submit", "--dataset", "npz", "--dataset-id", dataset_id, "--arch", "mlp",
                        "--megabatches", "2", "--epochs", "2", "--target-sparsity", "0.9", "--watch")
    assert run.returncode == 0, run.stderr + serve_log(folder)
    job_id = run.stdout.splitlines()[0]

    got = anytime_prune(user, "download", job_id, "--out", "m/")
    assert got.returncode == 0, got.stderr
    assert (folder / "m" / "model.sparse.safetensors").is_file()

    import torch

    from app_engine.loading import load_model

    model = load_model(folder / "m", source="sparse")
    data = np.load(folder / "my.npz")
    with torch.no_grad():
        predicted = model(torch.from_numpy(data["x_test"])).argmax(dim=1).numpy()
    assert (predicted == data["y_test"]).mean() > 0.6  # chance is 1/3; the blobs are separable
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / sum(w.numel() for w in weights) == pytest.approx(0.9, abs=0.05)
