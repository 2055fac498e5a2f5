"""The Python client (``anytime_prune.client``) against a real API server and worker.

Pure parts (credentials, reading event streams from scripted responses) are tested directly;
everything else talks HTTP to an ``anytime-prune api`` subprocess with an ``anytime-prune worker``
on a real Redis.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_stack import TINY_SPEC, ServiceStack, free_port, service_stack

from anytime_prune.client import (
    ApiError,
    Client,
    DownloadError,
    JobEvent,
    credentials_path,
    read_credentials,
    write_credentials,
)
from app_common.spec import JobSpec
from app_common.storage import artifact_key

# --- pure -------------------------------------------------------------------------------------


class ScriptedStream(httpx.SyncByteStream):
    """A response body sent in the given chunks; ``then_fail`` drops the connection after them."""

    def __init__(self, chunks: list[str], then_fail: bool = False):
        self.chunks = chunks
        self.then_fail = then_fail

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            yield chunk.encode()
        if self.then_fail:
            raise httpx.ReadError("connection reset by peer")


def scripted_client(streams: list[ScriptedStream], seen: list[httpx.Request], status: str = "succeeded") -> Client:
    """A client whose n-th event-stream request gets ``streams[n]``; the job's status is ``status``."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/events"):
            body = streams[sum(r.url.path.endswith("/events") for r in seen) - 1]
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, stream=body)
        return httpx.Response(200, json={"id": "j", "status": status})

    return Client("http://api.test", "ap_x", transport=httpx.MockTransport(handle))


def test_events_follow_the_event_stream_format() -> None:
    text = (
        "retry: 3000\n\n"  # no data: not dispatched
        ": heartbeat\n\n"
        "id: 1-0\r\nevent: epoch_ended\r\ndata: {\"a\": 1}\r\n\r\n"
        ": heartbeat after an id\n\n"  # still no data: not an event
        "id: 2-0\nevent: note\ndata: {\"first\": 1,\ndata:\"second\": 2}\n\n"
        "data: \"no id or type\"\n\n"  # the last id stays (the standard's lastEventId)
        "id: bad\0id\nevent: x\ndata: y\n\n"  # an id containing NUL is ignored; y is not JSON
        "id: 3-0\nevent: cut\ndata: never finished\n"  # no blank line: the connection dropped
    )
    seen: list[httpx.Request] = []
    # Split mid-line and mid-message: the decoder must reassemble across chunks.
    chunks = [text[i:i + 7] for i in range(0, len(text), 7)]
    with scripted_client([ScriptedStream(chunks)], seen) as client:
        events = list(client.events("j"))
    assert events == [
        JobEvent("1-0", "epoch_ended", {"a": 1}),
        JobEvent("2-0", "note", {"first": 1, "second": 2}),
        JobEvent("2-0", "message", {"value": "no id or type"}),
        JobEvent("2-0", "x", {"raw": "y"}),
    ]
    # The stream ended cleanly without a terminal event: the client asked the job's status.
    assert [r.url.path for r in seen] == ["/api/v1/jobs/j/events", "/api/v1/jobs/j"]
    assert seen[0].headers["Accept"] == "text/event-stream" and "Last-Event-ID" not in seen[0].headers
    assert seen[0].headers["Authorization"] == "Bearer ap_x"


def test_events_reconnect_with_last_event_id() -> None:
    first = ScriptedStream(["id: 1-0\nevent: run_started\ndata: {}\n\nid: 2-0\nevent: epoch_ended\ndata: {\"ep"],
                           then_fail=True)
    second = ScriptedStream(["id: 2-0\nevent: epoch_ended\ndata: {\"epoch\": 1}\n\n",
                             "id: 3-0\nevent: status_changed\ndata: {\"status\": \"succeeded\"}\n\n",
                             "id: 4-0\nevent: after_the_end\ndata: {}\n\n"])
    seen: list[httpx.Request] = []
    with scripted_client([first, second], seen) as client:
        events = list(client.events("j"))
    assert [(e.id, e.type) for e in events] == [("1-0", "run_started"), ("2-0", "epoch_ended"),
                                               ("3-0", "status_changed")]
    assert events[1].data == {"epoch": 1}  # the half-sent message was dropped, not half-parsed
    assert [r.headers.get("Last-Event-ID") for r in seen] == [None, "1-0"]


def test_job_event_terminal_status() -> None:
    assert JobEvent("1-0", "status_changed", {"status": "succeeded"}).terminal_status == "succeeded"
    assert JobEvent("1-0", "status_changed", {"status": "running"}).terminal_status is None
    assert JobEvent("1-0", "epoch_ended", {"status": "failed"}).terminal_status is None


def test_credentials_file_is_private_and_found_by_from_env(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "home")}
    path = credentials_path(env)
    assert path == tmp_path / "home" / ".config" / "anytime-prune" / "credentials.json"
    assert credentials_path({**env, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}) == (
        tmp_path / "xdg" / "anytime-prune" / "credentials.json")
    assert credentials_path({**env, "ANYTIME_PRUNE_HOME": str(tmp_path / "ap")}) == tmp_path / "ap" / "credentials.json"
    assert read_credentials(path) is None

    write_credentials({"url": "http://127.0.0.1:9999", "api_key": "ap_saved"}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_credentials(path) == {"url": "http://127.0.0.1:9999", "api_key": "ap_saved"}
    assert not [p for p in path.parent.iterdir() if p.name != "credentials.json"]  # no temp file left

    with Client.from_env(environ=env) as saved:
        assert (saved.base_url, saved.api_key) == ("http://127.0.0.1:9999", "ap_saved")
    # The environment wins over the file, variable by variable.
    with Client.from_env(environ={**env, "ANYTIME_PRUNE_API_KEY": "ap_env"}) as mixed:
        assert (mixed.base_url, mixed.api_key) == ("http://127.0.0.1:9999", "ap_env")
    with Client.from_env(environ={**env, "ANYTIME_PRUNE_URL": "http://h:1/", "ANYTIME_PRUNE_API_KEY": "k"}) as both:
        assert (both.base_url, both.api_key) == ("http://h:1", "k")
    with Client.from_env(environ={"HOME": str(tmp_path / "nobody")}) as default:
        assert (default.base_url, default.api_key) == ("http://127.0.0.1:8000", None)
    assert "ap_saved" not in repr(saved)

    path.write_text("{not json")
    with pytest.raises(ValueError, match="credentials.json"):
        read_credentials(path)


def test_unreachable_service_is_an_api_error_with_status_0() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", "ap_x", timeout=2) as client, pytest.raises(ApiError) as err:
        client.status("0" * 32)
    assert err.value.status == 0 and "unreachable" in err.value.title


# --- against a running service ------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    with service_stack(redis_url, tmp_path_factory.mktemp("client")) as s:
        yield s


@pytest.fixture(scope="module")
def key(stack: ServiceStack) -> tuple[str, str]:
    return stack.new_key("client-tests")


@pytest.fixture(scope="module")
def client(stack: ServiceStack, key: tuple[str, str]) -> Iterator[Client]:
    with stack.client(key[1]) as c:
        yield c


@pytest.fixture(scope="module")
def done(client: Client, stack: ServiceStack) -> dict[str, Any]:
    """A finished job, submitted as a JobSpec object and followed with watch()."""
    seen: list[JobEvent] = []
    job = client.submit(JobSpec.from_dict(TINY_SPEC))
    final = client.watch(job["id"], callback=seen.append)
    assert final["status"] == "succeeded", (final, stack.log_tail())
    assert seen[-1].terminal_status == "succeeded"
    assert sum(e.type == "megabatch_ended" for e in seen) == 2
    return final


def test_problem_documents_become_api_errors(client: Client, stack: ServiceStack) -> None:
    bad = dict(TINY_SPEC, sparsity={"target": 1.5}, architecture="resnet9000")
    with pytest.raises(ApiError) as err:
        client.submit(bad)
    assert err.value.status == 422 and err.value.title
    assert {e.field for e in err.value.errors} == {"sparsity.target", "architecture"}
    assert "sparsity.target" in str(err.value)

    with pytest.raises(ApiError) as missing:
        client.status("f" * 32)
    assert missing.value.status == 404 and missing.value.title == "Not Found"
    assert missing.value.type.endswith("job-not-found")

    with stack.client(None) as anonymous, pytest.raises(ApiError) as unauthorized:
        anonymous.submit(TINY_SPEC)
    assert unauthorized.value.status == 401


def test_events_resume_after_last_event_id(client: Client, done: dict[str, Any]) -> None:
    everything = list(client.events(done["id"]))
    assert everything[-1].terminal_status == "succeeded"
    assert len(everything) >= 8
    resumed = list(client.events(done["id"], last_event_id=everything[2].id))
    assert resumed == everything[3:]


class CuttingProxy:
    """A TCP proxy in front of the API that drops the n-th connection after ``cuts[n]`` bytes of
    response (connections past the list are left alone): a flaky network, for real."""

    def __init__(self, upstream_port: int, cuts: list[int]):
        self.upstream_port = upstream_port
        self.cuts = list(cuts)
        self.connections = 0
        self.cut_connections = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while True:
            try:
                downstream, _ = self.server.accept()
            except OSError:
                return
            limit = self.cuts[self.connections] if self.connections < len(self.cuts) else None
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for args in ((downstream, upstream, None), (upstream, downstream, limit)):
                t = threading.Thread(target=self._pump, args=args, daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: limit - sent])
                    self.cut_connections += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.server.close()
        for t in self._threads:
            t.join(timeout=5)


def test_events_survive_dropped_connections(stack: ServiceStack, key: tuple[str, str],
                                            client: Client, done: dict[str, Any]) -> None:
    direct = list(client.events(done["id"]))
    # The whole stream is ~4 kB; the response head ~200 bytes. The cuts land mid-message (in an
    # epoch_ended, then in the ~1 kB megabatch_ended), which must be discarded and fetched again,
    # never half-parsed; the third connection ends before even one whole event arrived.
    proxy = CuttingProxy(stack.port, cuts=[700, 1200, 900])
    try:
        with Client(f"http://127.0.0.1:{proxy.port}", key[1]) as flaky:
            through_proxy = list(flaky.events(done["id"]))
    finally:
        proxy.close()
    assert proxy.cut_connections == 3 and proxy.connections >= 4
    assert [e.id for e in through_proxy] == [e.id for e in direct]
    assert through_proxy == direct


def test_events_give_up_after_max_retries(key: tuple[str, str], done: dict[str, Any], stack: ServiceStack) -> None:
    proxy = CuttingProxy(stack.port, cuts=[50] * 10)  # never gets past the response head
    try:
        with Client(f"http://127.0.0.1:{proxy.port}", key[1]) as flaky, pytest.raises(ApiError) as err:
            list(flaky.events(done["id"], max_retries=2))
    finally:
        proxy.close()
    assert err.value.status == 0 and "event stream lost" in err.value.title
    assert proxy.connections == 3  # the first try and two retries


def test_download_subset_and_checksum_mismatch(
    client: Client, done: dict[str, Any], stack: ServiceStack, tmp_path: Path
) -> None:
    paths = client.download(done["id"], tmp_path / "subset", names=["manifest.json"])
    assert [p.name for p in paths] == ["manifest.json"]
    assert [p.name for p in (tmp_path / "subset").iterdir()] == ["manifest.json"]
    assert stat.S_IMODE(paths[0].stat().st_mode) == 0o644

    with pytest.raises(ApiError) as unknown:
        client.download(done["id"], tmp_path / "x", names=["../../etc/passwd"])
    assert unknown.value.status == 404

    # Corrupt the stored file: same size, one byte flipped. The listing (from the job record)
    # still has the true sha256, so the client must refuse the bytes and leave nothing behind.
    stored = stack.storage_dir / artifact_key(done["id"], "model.sparse.safetensors")
    original = stored.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    stored.write_bytes(bytes(flipped))
    try:
        with pytest.raises(DownloadError, match="sha256"):
            client.download(done["id"], tmp_path / "bad", names=["model.sparse.safetensors"])
        assert list((tmp_path / "bad").iterdir()) == []
    finally:
        stored.write_bytes(original)
    good = client.download(done["id"], tmp_path / "good", names=["model.sparse.safetensors"])
    assert hashlib.sha256(good[0].read_bytes()).hexdigest() == hashlib.sha256(original).hexdigest()


def test_list_follows_cursors_cancel_and_delete(stack: ServiceStack, client: Client, key: tuple[str, str],
                                                done: dict[str, Any]) -> None:
    # Queued jobs written straight into the store (never sent to the worker), newest last.
    created = []
    for seed in range(5):
        record = stack.store.create_job(key[0], JobSpec.from_dict(dict(TINY_SPEC, training={"seed": seed})).to_dict(),
                                        queue="cpu")
        created.append(record.id)
        time.sleep(0.002)  # distinct creation times
    newest_first = [*reversed(created), done["id"]]

    everything = [j["id"] for j in client.iter_jobs(page_size=2)]  # three pages
    assert everything == newest_first
    assert [j["id"] for j in client.list(limit=3)] == newest_first[:3]
    assert [j["id"] for j in client.list(status="queued", limit=100)] == list(reversed(created))
    items, cursor = client.list_page(limit=4)
    assert len(items) == 4 and cursor
    rest, last = client.list_page(limit=4, cursor=cursor)
    assert [j["id"] for j in items + rest] == newest_first and last is None

    for job_id in created:
        assert client.cancel(job_id)["status"] == "cancelled"  # queued: cancelled at once
    assert [j["id"] for j in client.list(status="cancelled", limit=100)] == list(reversed(created))
    stuck = _queued(stack, key[0])
    with pytest.raises(TimeoutError):
        client.wait(stuck, timeout=0.5, poll_s=0.1)
    client.cancel(stuck)
    assert client.wait(created[0], timeout=5)["status"] == "cancelled"

    client.delete(created[0])
    with pytest.raises(ApiError) as gone:
        client.status(created[0])
    assert gone.value.status == 404


def _queued(stack: ServiceStack, owner: str) -> str:
    """A job that stays queued (it is never sent to a worker)."""
    return stack.store.create_job(owner, JobSpec.from_dict(TINY_SPEC).to_dict(), queue="cpu").id


def test_kept_models_download_by_megabatch_or_bound_and_reproduce(
    client: Client, key: tuple[str, str], done: dict[str, Any], stack: ServiceStack, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A model at every megabatch: listed, chosen and downloaded by the client and the CLI; each
    loads and reproduces its recorded test accuracy."""
    import torch

    from anytime_prune.cli import main
    from app_common.megabatch_models import MegabatchModel, best_model
    from app_common.spec import DatasetSpec
    from app_engine.data import load_dataset
    from app_engine.export import load_model

    models = client.models(done["id"])
    assert [m["index"] for m in models] == [1, 2]
    assert [m["sha256"] for m in models] == [m["sha256"] for m in done["result"]["megabatch_models"]]
    kept = [MegabatchModel.model_validate(m) for m in done["result"]["megabatch_models"]]
    digits = load_dataset(DatasetSpec(name="digits"), seed=3)

    def cli(*args: str) -> int:
        return main(["download", done["id"], "--url", stack.url, "--api-key", key[1], *args])

    out = tmp_path / "models"
    assert cli("--out", str(out), "--megabatch", "1") == 0
    loose = max(m.density for m in kept)  # every model qualifies: the most accurate wins
    assert cli("--out", str(out), "--best", "--max-density", str(loose)) == 0
    floor = min(m.test_accuracy for m in kept)  # every model qualifies: the sparsest wins
    paths = client.download_model(done["id"], out, min_accuracy=floor)
    chosen = [best_model(kept, max_density=loose), best_model(kept, min_accuracy=floor)]
    assert chosen[1] is not None and chosen[1].index == 2 and paths[0] == out / chosen[1].name
    printed = capsys.readouterr().out.split()
    assert printed[:2] == [str(out / "megabatch-0001/model.sparse.safetensors"),
                           str(out / "megabatch-0001/manifest.json")]
    assert chosen[0] is not None and printed[2] == str(out / chosen[0].name)
    for m in kept:
        model = load_model(out, megabatch=m.index)
        with torch.no_grad():
            correct = int((model(digits.x_test).argmax(1) == digits.y_test).sum())
        assert correct / len(digits.y_test) == m.test_accuracy

    # Usage: one choice at a time, --best with a bound, bounds in 0..1; no such model: exit 4.
    for bad in (["--best"], ["--max-density", "0.5"], ["--megabatch", "1", "--best", "--max-density", "0.5"]):
        assert cli("--out", str(out), *bad) == 2, bad
    with pytest.raises(SystemExit):
        cli("--out", str(out), "--best", "--max-density", "1.5")
    assert cli("--out", str(out), "--megabatch", "9") == 4
    assert cli("--out", str(out), "--best", "--max-density", "0.01") == 4
    err = capsys.readouterr().err
    assert "kept no model of megabatch 9 (kept: 1, 2)" in err and "no-model-qualifies" not in err
    assert "none of the 2 kept models" in err
