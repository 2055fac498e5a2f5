"""End to end: a real Redis, a real Celery worker process and a real HTTP server (uvicorn).

One API + worker pair serves the whole module. Jobs are tiny digits runs (mlp, 2 megabatches)
that train for real; the assertions compare what the service reports with what the downloaded
model does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from service_stack import ROOT, TINY_SPEC, ServiceStack, cli_argv, free_port, service_stack, stop_process

from anytime_prune.client import ApiError, Client, JobEvent

pytestmark = pytest.mark.slow

# (the job as submitted, the events followed live, the final job)
Finished = tuple[dict[str, Any], list[JobEvent], dict[str, Any]]


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    with service_stack(redis_url, tmp_path_factory.mktemp("e2e")) as s:
        yield s


@pytest.fixture(scope="module")
def alice(stack: ServiceStack) -> Iterator[Client]:
    _, secret = stack.new_key("alice")
    with stack.client(secret) as client:
        yield client


@pytest.fixture(scope="module")
def finished(stack: ServiceStack, alice: Client) -> Finished:
    """(job as submitted, the events followed live, the final job) of one tiny digits job."""
    submitted = alice.submit(TINY_SPEC)
    events: list[JobEvent] = []
    final = alice.watch(submitted["id"], callback=events.append)
    assert final["status"] == "succeeded", (final.get("error"), stack.log_tail())
    return submitted, events, final


def test_submit_answers_queued_with_urls(finished: Finished) -> None:
    submitted, _, _ = finished
    assert re.fullmatch(r"[0-9a-f]{32}", submitted["id"])
    assert submitted["status"] == "queued"
    assert submitted["queue"] == "cpu"
    assert submitted["urls"]["events"] == f"/api/v1/jobs/{submitted['id']}/events"
    assert submitted["spec"]["stream"]["megabatches"] == 2


def test_events_follow_the_run_live(finished: Finished) -> None:
    _, events, final = finished
    types = [e.type for e in events]
    statuses = [e.data["status"] for e in events if e.type == "status_changed"]
    assert statuses == ["running", "succeeded"]
    assert types[-1] == "status_changed" and events[-1].terminal_status == "succeeded"
    assert types.count("run_started") == 1
    assert types.count("epoch_ended") == 2 * 2  # megabatches x epochs
    assert types.count("megabatch_ended") == 2
    # Stream ids strictly increase: they are Redis stream entry ids, what Last-Event-ID resumes after.
    ids = [tuple(map(int, str(e.id).split("-"))) for e in events]
    assert ids == sorted(set(ids))
    epochs = [(e.data["megabatch"], e.data["epoch"]) for e in events if e.type == "epoch_ended"]
    assert epochs == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert final["progress"]["fraction"] == 1.0 and final["progress"]["megabatch"] == 2
    assert final["finished_at"] is not None and final["error"] is None


def test_metrics_history(alice: Client, finished: Finished) -> None:
    _, events, final = finished
    history = alice.metrics(final["id"])
    assert [m["index"] for m in history["megabatches"]] == [1, 2]
    assert len(history["epochs"]) == 4
    result = final["result"]
    for point, record in zip(history["megabatches"], result["megabatches"], strict=True):
        assert point["test_accuracy"] == pytest.approx(record["test_accuracy"])
        assert point["density"] == pytest.approx(record["density"])
    # APP prunes to the target over the stream: density 0.8 after the first of two megabatches
    # (the schedule's first step) and the target 0.5 at the end.
    assert history["megabatches"][-1]["density"] == pytest.approx(0.5, abs=1e-3)
    assert history["megabatches"][0]["density"] > history["megabatches"][-1]["density"]
    assert final["latest_metrics"]["test_accuracy"] == pytest.approx(result["final_test_accuracy"])
    # The megabatch_ended events carried the same numbers.
    streamed = [e.data["metrics"]["test_accuracy"] for e in events if e.type == "megabatch_ended"]
    assert streamed == pytest.approx([m["test_accuracy"] for m in history["megabatches"]])


def test_download_checksums_and_the_sparse_model_predicts(
    alice: Client, finished: Finished, tmp_path: Path
) -> None:
    import torch

    from app_common.spec import DatasetSpec
    from app_engine.data import load_dataset
    from app_engine.export import load_model

    _, _, final = finished
    listing = {a["name"]: a for a in alice.artifacts(final["id"])}
    assert {"model.sparse.safetensors", "model.safetensors", "masks.safetensors", "manifest.json"} <= set(listing)
    paths = alice.download(final["id"], tmp_path / "dl")
    assert sorted(p.name for p in paths) == sorted(listing)
    for path in paths:
        data = path.read_bytes()
        assert len(data) == listing[path.name]["bytes"]
        assert hashlib.sha256(data).hexdigest() == listing[path.name]["sha256"]
    assert not list((tmp_path / "dl").glob("*.part"))

    model = load_model(tmp_path / "dl", source="sparse")
    digits = load_dataset(DatasetSpec(name="digits"), seed=3)
    with torch.no_grad():
        predicted = model(digits.x_test).argmax(dim=1)
    accuracy = (predicted == digits.y_test).float().mean().item()
    # Chance is 0.1. The exported model is the one the worker evaluated (fp32): it reproduces the
    # reported final test accuracy to within a sample or two.
    assert accuracy > 0.6
    assert accuracy == pytest.approx(final["result"]["final_test_accuracy"], abs=2.5 / len(digits.y_test))
    # It really is sparse: half the prunable weights are zero.
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / sum(w.numel() for w in weights) == pytest.approx(0.5, abs=0.05)


def test_cli_verbs_submit_watch_status_list_download(stack: ServiceStack, tmp_path: Path) -> None:
    _, secret = stack.new_key("cli")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(TINY_SPEC))
    submitted = stack.cli("submit", "--spec", str(spec_file), "--epochs", "1", "--seed", "5", secret=secret)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id), submitted.stdout

    watched = stack.cli("watch", job_id, secret=secret)
    assert watched.returncode == 0, watched.stderr + stack.log_tail()
    assert "status: succeeded" in watched.stderr
    assert "final test accuracy" in watched.stdout  # the per-megabatch table

    # --url and --api-key win over the environment.
    status = stack.cli("status", job_id, "--json", "--url", stack.url, "--api-key", secret,
                       extra_env={"ANYTIME_PRUNE_URL": "http://127.0.0.1:9", "ANYTIME_PRUNE_API_KEY": "ap_wrong"})
    assert status.returncode == 0, status.stderr
    job = json.loads(status.stdout)
    assert job["status"] == "succeeded"
    assert job["spec"]["training"]["epochs"] == 1 and job["spec"]["training"]["seed"] == 5  # flags over the file
    human = stack.cli("status", job_id, secret=secret)
    assert "succeeded" in human.stdout and "2/2" in human.stdout

    listed = stack.cli("list", "--json", secret=secret)
    assert [j["id"] for j in json.loads(listed.stdout)] == [job_id]

    out = tmp_path / "downloaded"
    downloaded = stack.cli("download", job_id, "--out", str(out), "--name", "model.sparse.safetensors",
                           "--name", "manifest.json", secret=secret)
    assert downloaded.returncode == 0, downloaded.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.sparse.safetensors"]
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["name"] == "model.sparse.safetensors")
    assert hashlib.sha256((out / "model.sparse.safetensors").read_bytes()).hexdigest() == entry["sha256"]

    # A spec the client can already tell is wrong is refused before anything is sent, naming the flag.
    invalid = stack.cli("submit", "--dataset", "digits", "--target-sparsity", "1.5", secret=secret)
    assert invalid.returncode != 0 and "--target-sparsity" in invalid.stderr
    assert len(json.loads(stack.cli("list", "--json", secret=secret).stdout)) == 1

    # A wrong key is a clean error with the service exit status, not a traceback.
    denied = stack.cli("status", job_id, secret="ap_not-a-key")
    assert denied.returncode == 4 and "401" in denied.stderr and "Traceback" not in denied.stderr


def test_client_verbs_never_import_torch(stack: ServiceStack, tmp_path: Path) -> None:
    """submit -> watch -> status -> download in one process: torch is never imported."""
    _, secret = stack.new_key("torchless")
    code = f"""
import sys
from anytime_prune.cli import main
import io, contextlib
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    assert main(["submit", "--dataset", "digits", "--arch", "mlp", "--megabatches", "2", "--epochs", "1",
                 "--precision", "fp32"]) == 0
job_id = buf.getvalue().strip()
assert main(["watch", job_id]) == 0
assert main(["status", job_id]) == 0
assert main(["list"]) == 0
assert main(["download", job_id, "--out", {str(tmp_path / 'dl')!r}]) == 0
heavy = sorted(m for m in ("torch", "numpy", "fastapi", "celery", "app_engine", "worker", "api") if m in sys.modules)
assert not heavy, heavy
print("ok", job_id)
"""
    env = dict(stack.env, ANYTIME_PRUNE_URL=stack.url, ANYTIME_PRUNE_API_KEY=secret)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr + stack.log_tail()
    assert proc.stdout.splitlines()[-1].startswith("ok ")
    assert (tmp_path / "dl" / "model.sparse.safetensors").is_file()


def test_cancel_mid_run(stack: ServiceStack, alice: Client) -> None:
    long_spec = dict(TINY_SPEC, architecture="cnn_small", stream={"megabatches": 4}, training={"epochs": 150})
    job = alice.submit(long_spec)
    events = alice.events(job["id"])
    for event in events:
        if event.type == "epoch_ended":
            break
    assert alice.status(job["id"])["status"] == "running"

    result = stack.cli("cancel", job["id"], secret=alice.api_key)
    assert result.returncode == 0, result.stderr
    assert re.search(r"is (cancelling|cancelled)", result.stdout)
    rest = list(events)  # the same live stream, to its end
    final = alice.status(job["id"])
    assert final["status"] == "cancelled", (final, stack.log_tail())
    assert rest[-1].terminal_status == "cancelled"
    # The run stops at the next epoch boundary: once the stream says `cancelling`, at most the epoch
    # that was ending then is reported (the worker reads the flag after each epoch's event).
    kinds = [e.type for e in rest]
    cancelling = next(i for i, e in enumerate(rest) if e.data.get("status") == "cancelling")
    assert kinds[cancelling:].count("epoch_ended") <= 1, kinds[cancelling:]
    assert final["progress"]["fraction"] < 0.5
    with pytest.raises(ApiError) as err:
        alice.artifacts(job["id"])
    assert err.value.status == 409
    with pytest.raises(ApiError) as again:
        alice.cancel(job["id"])
    assert again.value.status == 409
    # watch reports the outcome in its exit status.
    assert stack.cli("watch", job["id"], secret=alice.api_key).returncode == 3


def test_key_isolation(stack: ServiceStack, alice: Client,
                       finished: Finished) -> None:
    _, _, job = finished
    _, bob_secret = stack.new_key("bob")
    with stack.client(bob_secret) as bob:
        for call in (bob.status, bob.metrics, bob.artifacts, bob.cancel, lambda i: list(bob.events(i))):
            with pytest.raises(ApiError) as err:
                call(job["id"])
            assert err.value.status == 404, call
        assert job["id"] not in [j["id"] for j in bob.list(limit=100)]
        bobs = bob.submit(dict(TINY_SPEC, training={"epochs": 1}))
        bob.cancel(bobs["id"])
    assert job["id"] in [j["id"] for j in alice.list(limit=100)]
    assert bobs["id"] not in [j["id"] for j in alice.list(limit=100)]
    with pytest.raises(ApiError) as err:
        alice.status(bobs["id"])
    assert err.value.status == 404
    # No key, or a made-up one: 401 with a problem document.
    with stack.client(None) as anonymous, pytest.raises(ApiError) as err:
        anonymous.list()
    assert err.value.status == 401 and err.value.title == "Unauthorized"
    raw = httpx.get(f"{stack.url}/api/v1/jobs/{job['id']}", headers={"Authorization": "Bearer ap_forged"})
    assert raw.status_code == 401 and raw.headers["content-type"].startswith("application/problem+json")
    # A revoked key stops working at once.
    bob_id = next(k["key_id"] for k in stack.store.list_keys() if k["name"] == "bob")
    assert stack.store.revoke_key(bob_id)
    with stack.client(bob_secret) as bob, pytest.raises(ApiError) as err:
        bob.list()
    assert err.value.status == 401


def test_keys_cli_create_list_revoke(stack: ServiceStack) -> None:
    # REDIS_URL and APP_REDIS_PREFIX come from the environment, as on a deployed API container.
    created = stack.cli("keys", "create", "pipeline")
    assert created.returncode == 0, created.stderr
    # Only the hint goes to stderr: no log line to be pasted along with the secret.
    assert created.stderr.strip().splitlines() == [
        "the secret is shown only once; send it as `Authorization: Bearer <secret>`"
    ], created.stderr
    key_id = re.search(r"key id: (\S+)", created.stdout).group(1)  # type: ignore[union-attr]
    secret = re.search(r"secret: (\S+)", created.stdout).group(1)  # type: ignore[union-attr]
    with stack.client(secret) as client:
        assert client.list() == []
    listed = stack.cli("keys", "list", "--json")
    records = {k["key_id"]: k for k in json.loads(listed.stdout)}
    assert records[key_id]["name"] == "pipeline" and "secret" not in records[key_id]
    assert secret not in listed.stdout
    assert stack.cli("keys", "revoke", key_id).returncode == 0
    assert stack.cli("keys", "revoke", key_id).returncode == 1
    with stack.client(secret) as client, pytest.raises(ApiError) as err:
        client.list()
    assert err.value.status == 401


def test_idempotent_submit(alice: Client) -> None:
    spec = dict(TINY_SPEC, training={"epochs": 1, "seed": 11})
    first = alice.submit(spec, idempotency_key="e2e-once")
    # Cancel while queued (or just started) so the shared worker is not kept busy.
    alice.cancel(first["id"])
    again = alice.submit(spec, idempotency_key="e2e-once")
    assert again["id"] == first["id"]
    with pytest.raises(ApiError) as err:
        alice.submit(dict(spec, method="osp"), idempotency_key="e2e-once")
    assert err.value.status == 422 and [e.field for e in err.value.errors] == ["Idempotency-Key"]
    assert alice.wait(first["id"], timeout=30)["status"] == "cancelled"


def test_crashed_worker_is_replaced_and_the_job_resumes_with_equal_metrics(stack: ServiceStack, alice: Client) -> None:
    """SIGKILL the whole worker (main and pool process) mid-job, start a new one: its reaper finds
    the job's lease expired, sends it again, and the run resumes from the megabatch checkpoint
    with exactly the metrics of an uninterrupted run."""
    spec = dict(TINY_SPEC, stream={"megabatches": 3}, training={"epochs": 40, "precision": "fp32", "seed": 7})
    reference = alice.watch(alice.submit(spec)["id"])
    assert reference["status"] == "succeeded", stack.log_tail()

    job = alice.submit(spec)
    events = alice.events(job["id"])
    for event in events:
        if event.type == "megabatch_ended":
            assert event.data["megabatch"] == 1
            stack.crash_worker()
            break
    assert alice.status(job["id"])["status"] == "running"  # nobody knows yet
    # Once its lease has expired (one TTL) the job says its worker is gone: still running, stale.
    deadline = time.monotonic() + 60
    while not (orphan := alice.status(job["id"]))["stale"]:
        assert time.monotonic() < deadline, orphan
        time.sleep(0.2)
    assert orphan["status"] == "running" and orphan["heartbeat_at"] is not None
    stack.start_worker()
    rest = list(events)  # the same event stream, through the outage to the end
    final = alice.status(job["id"])
    assert final["status"] == "succeeded", (final, stack.log_tail())
    assert final["stale"] is False and final["heartbeat_at"] > orphan["heartbeat_at"]  # renewed by the new worker
    assert final["attempt"] == 2
    restarts = [e.data for e in rest if e.type == "run_started"]
    assert len(restarts) == 1 and restarts[0]["resumed_after"] >= 1
    reasons = [e.data.get("reason") for e in rest if e.type == "status_changed" and e.data["status"] == "running"]
    assert reasons == ["attempt 2: resuming after a lost worker"]

    keys = ("index", "test_accuracy", "test_errors", "density", "val_accuracy", "train_loss")
    resumed = [{k: m[k] for k in keys} for m in alice.metrics(job["id"])["megabatches"]]
    expected = [{k: m[k] for k in keys} for m in alice.metrics(reference["id"])["megabatches"]]
    assert resumed == expected
    assert final["result"]["cer"] == reference["result"]["cer"]


def test_api_and_worker_main_process_never_load_torch(stack: ServiceStack, finished: Finished) -> None:
    """The running API, and the worker's main process after jobs ran in its pool, have no torch
    library mapped (jobs import the engine only in the pool process)."""
    for name in ("api", "worker"):
        maps = [m.path for m in psutil.Process(stack.processes[name].pid).memory_maps()]
        assert maps, name
        assert not [p for p in maps if "torch" in p.lower()], name


def test_redis_down_is_a_fast_503(stack: ServiceStack) -> None:
    """An API whose Redis does not answer (connections hang) says so within about a second."""
    blackhole = socket.create_server(("127.0.0.1", 0), backlog=64)  # never accepts, never answers
    port = free_port()
    env = dict(stack.env, REDIS_URL=f"redis://127.0.0.1:{blackhole.getsockname()[1]}/0")
    proc = subprocess.Popen(cli_argv("api", "--port", str(port), "--no-access-log"), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the API did not start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        headers = {"Authorization": "Bearer ap_whatever"}
        for method, path in (("GET", "/readyz"), ("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs")):
            # The client's timeout is the hang guard (redis_timeout_s is 1 s): an answer, not a hang.
            r = httpx.request(method, url + path, headers=headers, json=TINY_SPEC, timeout=20)
            assert r.status_code == 503, (path, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert int(r.headers["Retry-After"]) > 0
        with Client(url, "ap_whatever") as client, pytest.raises(ApiError) as err:
            client.list()
        assert err.value.status == 503 and err.value.retry_after
    finally:
        stop_process(proc)
        blackhole.close()


# --- serve: everything in one command ---------------------------------------------------------


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        children: list[psutil.Process] = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return children


def test_serve_demo_then_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    port = free_port()
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if k != "REDIS_URL" and not k.startswith(("APP_", "ANYTIME_PRUNE_"))}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("XDG_CONFIG_HOME", None)
    demo_out = tmp_path / "demo"
    proc = subprocess.Popen(
        cli_argv("serve", "--port", str(port), "--artifacts-dir", str(tmp_path / "artifacts"),
                 "--data-dir", str(tmp_path / "data"), "--demo", "--demo-out", str(demo_out)),
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("demo: sparse checkpoint") or line.startswith("Press Ctrl-C"):
                done.set()
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    children: list[psutil.Process] = []
    try:
        assert done.wait(150), "".join(lines)
        output = "".join(lines)
        assert f"serving on http://127.0.0.1:{port}" in output, output
        assert "demo: sparse checkpoint" in output, output
        assert (demo_out / "model.sparse.safetensors").is_file()
        table = re.findall(r"^\s+(\d)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)", output, re.M)
        assert [int(row[0]) for row in table] == [1, 2, 3, 4]
        assert float(table[-1][1]) == pytest.approx(0.366, abs=2e-3)  # density after target 0.634

        creds_file = home / ".config" / "anytime-prune" / "credentials.json"
        assert stat.S_IMODE(creds_file.stat().st_mode) == 0o600
        creds = json.loads(creds_file.read_text())
        with Client.from_env(environ={"HOME": str(home)}) as client:
            assert client.base_url == f"http://127.0.0.1:{port}"
            jobs = client.list()
            assert [j["status"] for j in jobs] == ["succeeded"]
        assert creds["redis_url"].startswith("redis://127.0.0.1:")
        # The demo points at the dashboard: its address, the key to sign in with, the job's page.
        assert f"dashboard: http://127.0.0.1:{port}/  (sign in with the API key {creds['api_key']})" in output
        assert f"watch it live at http://127.0.0.1:{port}/#/jobs/{jobs[0]['id']}" in output

        # Ctrl-C in the middle of a job: the job's pool process must go too.
        with Client.from_env(environ={"HOME": str(home)}) as client:
            long_job = client.submit(dict(TINY_SPEC, architecture="cnn_small", training={"epochs": 150}))
            for event in client.events(long_job["id"]):
                if event.type == "epoch_ended":
                    break
        children = _descendants(proc.pid)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names and " worker " in names and " api " in names, names
        assert len(children) >= 4, names  # redis, worker, its pool process running the job, api

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    finally:
        leftovers = children or _descendants(proc.pid)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for child in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        reader.join(timeout=5)
        assert proc.stdout is not None
        proc.stdout.close()
