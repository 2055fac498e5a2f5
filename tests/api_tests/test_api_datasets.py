"""api/routes/datasets.py: announce, streamed upload (size, sha256, cut-off, retry), presigned upload
and complete (SeaweedFS), read, list, delete, isolation between keys, the validation task queued."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from api_support import Api, assert_problem, closed_port, make_api

from api.main import create_app
from api.queue import create_celery
from app_common.datasets import DatasetInfo
from app_common.settings import Settings
from app_common.storage import LocalStorage, StorageError, StoredObject, dataset_key
from app_common.tasks import CONTROL_QUEUE, VALIDATE_DATASET_TASK

pytestmark = pytest.mark.anyio

PAYLOAD = os.urandom(300_000)  # larger than the 4 KiB JSON body limit of the test settings
SHA = hashlib.sha256(PAYLOAD).hexdigest()
INFO = DatasetInfo(train_samples=8, test_samples=2, num_classes=2, classes=["a", "b"], input_shape=[4])


def announce_body(payload: bytes = PAYLOAD, **changes: Any) -> dict[str, Any]:
    return {"format": "npz", "name": "my data", "sha256": hashlib.sha256(payload).hexdigest(),
            "bytes": len(payload)} | changes


async def announce(
    api: Api, payload: bytes = PAYLOAD, headers: dict[str, str] | None = None, **changes: Any
) -> dict[str, Any]:
    r = await api.client.post("/api/v1/datasets", json=announce_body(payload, **changes), headers=headers or api.a)
    assert r.status_code == 201, r.text
    return dict(r.json())


def validations_queued(api: Api) -> list[str]:
    """Dataset ids in the control queue's Celery messages (where the control worker looks)."""
    assert api.store.celery_queue_length(CONTROL_QUEUE, api.settings.celery_key_prefix) >= 0
    out = []
    for raw in api.store.redis.lrange(f"{api.settings.celery_key_prefix}{CONTROL_QUEUE}", 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == VALIDATE_DATASET_TASK
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        assert kwargs == {}
        out += args
    return out


def stored_files(settings: Settings) -> list[Path]:
    """Every file in the local store, temporary ones included."""
    root = settings.storage_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def make_ready(api: Api, dataset_id: str) -> None:
    assert api.store.move_dataset(dataset_id, "validating", allowed_from={"uploading"})
    assert api.store.set_dataset_ready(dataset_id, INFO)


async def test_announce_answers_201_with_how_to_upload(api: Api) -> None:
    body = await announce(api)
    assert body["status"] == "uploading" and body["format"] == "npz" and body["name"] == "my data"
    assert body["sha256"] == SHA and body["bytes"] == len(PAYLOAD)
    assert body["error"] is None and body["info"] is None and "owner" not in body
    assert body["urls"] == {
        "self": f"/api/v1/datasets/{body['id']}",
        "content": f"/api/v1/datasets/{body['id']}/content",
        "complete": f"/api/v1/datasets/{body['id']}/complete",
    }
    assert body["upload"] == {"put_url": f"http://testserver/api/v1/datasets/{body['id']}/content", "post": None}
    got = await api.client.get(body["urls"]["self"], headers=api.a)
    assert got.status_code == 200 and got.json() == body
    assert validations_queued(api) == []


BAD_ANNOUNCEMENTS = [
    ({"format": "digits"}, "format"),
    ({"format": "zip"}, "format"),
    ({"name": ""}, "name"),
    ({"name": "x" * 201}, "name"),
    ({"sha256": "AB" * 32}, "sha256"),
    ({"sha256": "abc"}, "sha256"),
    ({"bytes": 0}, "bytes"),
    ({"bytes": 2**40}, "bytes"),  # over APP_MAX_DATASET_BYTES
    ({"path": "x.npz"}, "path"),
]


@pytest.mark.parametrize(("change", "field"), BAD_ANNOUNCEMENTS, ids=[f"{f}-{i}" for i, (_, f) in
                                                                       enumerate(BAD_ANNOUNCEMENTS)])
async def test_bad_announcement_is_422_naming_the_field(api: Api, change: dict[str, Any], field: str) -> None:
    r = await api.client.post("/api/v1/datasets", json=announce_body(**change), headers=api.a)
    problem = assert_problem(r, 422)
    assert field in {e["field"] for e in problem["errors"]}, problem
    assert api.store.list_datasets(api.owner_a) == ([], None)


async def test_streamed_upload_stores_the_file_and_queues_validation(api: Api) -> None:
    created = await announce(api)
    r = await api.client.put(created["urls"]["content"], content=PAYLOAD, headers=api.a)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "validating" and body["upload"] is None
    storage = api.settings.open_storage()
    assert storage.stat(dataset_key(created["id"])) is not None
    assert b"".join(storage.iter_chunks(dataset_key(created["id"]))) == PAYLOAD
    assert validations_queued(api) == [created["id"]]
    again = await api.client.put(created["urls"]["content"], content=PAYLOAD, headers=api.a)
    assert assert_problem(again, 409)["type"].endswith("dataset-not-uploading")
    complete = await api.client.post(created["urls"]["complete"], headers=api.a)
    assert_problem(complete, 409)
    assert validations_queued(api) == [created["id"]]


async def chunks_of(payload: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for start in range(0, len(payload), size):
        yield payload[start:start + size]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    ("sent", "status", "field"),
    [
        (PAYLOAD + b"x", 413, None),
        (PAYLOAD[:-1], 422, "bytes"),
        (b"", 422, "bytes"),
        (PAYLOAD[:-1] + b"\x00", 422, "sha256"),
    ],
    ids=["over", "short", "empty", "wrong-sha256"],
)
async def test_refused_upload_stores_nothing_and_may_be_retried(
    api: Api, sent: bytes, status: int, field: str | None, chunked: bool
) -> None:
    created = await announce(api)
    content: Any = chunks_of(sent) if chunked else sent
    r = await api.client.put(created["urls"]["content"], content=content, headers=api.a)
    problem = assert_problem(r, status)
    if field is not None:
        assert [e["field"] for e in problem["errors"]] == [field]
    assert stored_files(api.settings) == []
    assert validations_queued(api) == []
    record = api.store.get_dataset(created["id"])
    assert record is not None and record.status == "uploading"
    retry = await api.client.put(created["urls"]["content"], content=PAYLOAD, headers=api.a)
    assert retry.status_code == 202, retry.text


async def test_another_key_sees_no_dataset(api: Api) -> None:
    created = await announce(api)
    for method, url in [
        ("GET", created["urls"]["self"]),
        ("PUT", created["urls"]["content"]),
        ("POST", created["urls"]["complete"]),
        ("DELETE", created["urls"]["self"]),
    ]:
        r = await api.client.request(method, url, headers=api.b, content=PAYLOAD if method == "PUT" else None)
        assert assert_problem(r, 404)["type"].endswith("dataset-not-found"), (method, url)
    listed = await api.client.get("/api/v1/datasets", headers=api.b)
    assert listed.json() == {"items": [], "next_cursor": None}
    assert stored_files(api.settings) == []
    for missing in ["0" * 32, "not-an-id"]:
        assert_problem(await api.client.get(f"/api/v1/datasets/{missing}", headers=api.a), 404)


async def test_list_pages_newest_first_and_filters_by_status(api: Api) -> None:
    made = [(await announce(api, name=f"d{i}"))["id"] for i in range(5)]
    make_ready(api, made[1])
    seen: list[str] = []
    url = "/api/v1/datasets?limit=2"
    while True:
        page = (await api.client.get(url, headers=api.a)).json()
        assert len(page["items"]) <= 2
        seen += [d["id"] for d in page["items"]]
        if page["next_cursor"] is None:
            break
        url = f"/api/v1/datasets?limit=2&cursor={page['next_cursor']}"
    records = [api.store.get_dataset(i) for i in made]
    newest_first = sorted(records, key=lambda d: (d.created_at, d.id), reverse=True)  # type: ignore[union-attr]
    assert seen == [d.id for d in newest_first]  # type: ignore[union-attr]
    ready = (await api.client.get("/api/v1/datasets?status=ready", headers=api.a)).json()["items"]
    assert [d["id"] for d in ready] == [made[1]]
    assert ready[0]["info"] == INFO.model_dump() and ready[0]["upload"] is None
    assert_problem(await api.client.get("/api/v1/datasets?cursor=nope", headers=api.a), 422)
    assert_problem(await api.client.get("/api/v1/datasets?status=done", headers=api.a), 422)


async def test_delete_frees_the_file_and_is_refused_while_a_job_uses_it(api: Api) -> None:
    created = await announce(api)
    assert (await api.client.put(created["urls"]["content"], content=PAYLOAD, headers=api.a)).status_code == 202
    api.store.set_dataset_ready(created["id"], INFO)
    job = await api.submit({"dataset": {"id": created["id"]}, "training": {"epochs": 1}}, headers=api.a)
    r = await api.client.delete(created["urls"]["self"], headers=api.a)
    problem = assert_problem(r, 409)
    assert problem["type"].endswith("dataset-in-use") and job["id"] in problem["detail"]
    assert api.settings.open_storage().stat(dataset_key(created["id"])) is not None
    assert (await api.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=api.a)).status_code == 200
    assert (await api.client.delete(created["urls"]["self"], headers=api.a)).status_code == 204
    assert api.settings.open_storage().stat(dataset_key(created["id"])) is None
    assert [p for p in stored_files(api.settings) if ".tmp" not in p.parts] == []
    assert_problem(await api.client.get(created["urls"]["self"], headers=api.a), 404)
    assert_problem(await api.client.delete(created["urls"]["self"], headers=api.a), 404)


async def test_complete_without_a_stored_file_is_422_bytes(api: Api) -> None:
    created = await announce(api)
    problem = assert_problem(await api.client.post(created["urls"]["complete"], headers=api.a), 422)
    assert [e["field"] for e in problem["errors"]] == ["bytes"]
    # A file of the wrong size (written straight to the store, as a presigned POST would) is removed.
    api.settings.open_storage().put_stream(dataset_key(created["id"]), [PAYLOAD[:10]])
    problem = assert_problem(await api.client.post(created["urls"]["complete"], headers=api.a), 422)
    assert "10 bytes" in problem["errors"][0]["reason"]
    assert api.settings.open_storage().stat(dataset_key(created["id"])) is None
    api.settings.open_storage().put_stream(dataset_key(created["id"]), [PAYLOAD])
    r = await api.client.post(created["urls"]["complete"], headers=api.a)
    assert r.status_code == 202 and r.json()["status"] == "validating"
    assert validations_queued(api) == [created["id"]]


async def test_queue_down_is_503_and_keeps_the_dataset_uploading(api: Api, settings: Settings) -> None:
    app = api.client._transport.app  # type: ignore[attr-defined]
    created = await announce(api)
    working = app.state.celery
    app.state.celery = create_celery(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{closed_port()}/0"}))
    r = await api.client.put(created["urls"]["content"], content=PAYLOAD, headers=api.a)
    assert_problem(r, 503)
    record = api.store.get_dataset(created["id"])
    assert record is not None and record.status == "uploading"
    app.state.celery.close()
    # The file was kept: completing the upload once the queue is back goes through.
    app.state.celery = working
    r = await api.client.post(created["urls"]["complete"], headers=api.a)
    assert r.status_code == 202 and validations_queued(api) == [created["id"]]


class UnreachableStorage(LocalStorage):
    """A store that fails half way through a write (as an unreachable S3 would)."""

    def put_stream(self, key: str, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> StoredObject:
        next(iter(chunks))
        raise StorageError("connection refused")


async def test_store_failure_during_upload_is_503_and_keeps_the_dataset_uploading(api: Api) -> None:
    app = api.client._transport.app  # type: ignore[attr-defined]
    app.state.storage = UnreachableStorage(api.settings.storage_dir)
    created = await announce(api)
    r = await api.client.put(created["urls"]["content"], content=PAYLOAD, headers=api.a)
    assert assert_problem(r, 503)["type"].endswith("storage-unavailable") and r.headers["retry-after"]
    record = api.store.get_dataset(created["id"])
    assert record is not None and record.status == "uploading" and validations_queued(api) == []


# --- the S3 backend: a presigned POST straight to the store, then complete --------------------
@pytest.fixture
async def s3_api(
    settings: Settings, s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Api]:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    async for api in make_api(settings.model_copy(update={"storage_url": f"s3://{s3_bucket}/service"})):
        yield api


async def presigned_post(created: dict[str, Any], payload: bytes) -> httpx.Response:
    post = created["upload"]["post"]
    async with httpx.AsyncClient() as store_client:
        # The policy's fields first, the file last (what the store expects of a browser form).
        return await store_client.post(post["url"], data=post["fields"], files={"file": ("data.npz", payload)})


async def test_presigned_post_then_complete(s3_api: Api) -> None:
    created = await announce(s3_api)
    post = created["upload"]["post"]
    assert post is not None and post["url"].startswith("http://127.0.0.1") and post["fields"]
    assert created["upload"]["put_url"].endswith(created["urls"]["content"])
    r = await presigned_post(created, PAYLOAD)
    assert r.status_code in (200, 201, 204), r.text
    done = await s3_api.client.post(created["urls"]["complete"], headers=s3_api.a)
    assert done.status_code == 202, done.text
    assert done.json()["status"] == "validating" and done.json()["upload"] is None
    assert validations_queued(s3_api) == [created["id"]]
    storage = s3_api.settings.open_storage()
    assert b"".join(storage.iter_chunks(dataset_key(created["id"]))) == PAYLOAD


async def test_presigned_post_over_the_declared_size_is_refused_by_the_store(s3_api: Api) -> None:
    created = await announce(s3_api)
    r = await presigned_post(created, PAYLOAD + b"x")
    assert r.status_code == 400 and "EntityTooLarge" in r.text
    problem = assert_problem(await s3_api.client.post(created["urls"]["complete"], headers=s3_api.a), 422)
    assert [e["field"] for e in problem["errors"]] == ["bytes"]
    assert s3_api.settings.open_storage().stat(dataset_key(created["id"])) is None
    record = s3_api.store.get_dataset(created["id"])
    assert record is not None and record.status == "uploading" and validations_queued(s3_api) == []


async def test_streamed_put_with_the_s3_backend(s3_api: Api) -> None:
    created = await announce(s3_api)
    wrong = await s3_api.client.put(created["urls"]["content"], content=PAYLOAD[::-1], headers=s3_api.a)
    assert [e["field"] for e in assert_problem(wrong, 422)["errors"]] == ["sha256"]
    storage = s3_api.settings.open_storage()
    assert storage.list("datasets/") == []
    r = await s3_api.client.put(created["urls"]["content"], content=chunks_of(PAYLOAD), headers=s3_api.a)
    assert r.status_code == 202, r.text
    assert b"".join(storage.iter_chunks(dataset_key(created["id"]))) == PAYLOAD
    assert (await s3_api.client.delete(created["urls"]["self"], headers=s3_api.a)).status_code == 204
    assert storage.list("datasets/") == []


# --- a real HTTP server: cut-off connections and a large streamed upload ---------------------------
@contextlib.contextmanager
def served(settings: Settings) -> Iterator[str]:
    app = create_app(settings)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def wait_for(condition: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_upload_cut_off_midway_stores_nothing(settings: Settings, chunked: bool) -> None:
    api_settings = settings
    with served(api_settings) as url, httpx.Client(base_url=url) as client:
        owner, secret = _key(api_settings)
        headers = {"Authorization": f"Bearer {secret}"}
        payload = os.urandom(3 << 20)  # several pieces: the store has part of it when the client goes
        created = client.post("/api/v1/datasets", json=announce_body(payload), headers=headers).json()
        host, port = url.removeprefix("http://").split(":")
        request_head = (
            f"PUT {created['urls']['content']} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {secret}\r\n"
            + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {len(payload)}\r\n")
            + "\r\n"
        ).encode()
        part = payload[: len(payload) * 5 // 6]
        store = _store(api_settings)
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(request_head)
            sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n" if chunked else part)
            # The store is writing the first pieces to a temporary file.
            wait_for(lambda: any(".tmp" in p.parts for p in stored_files(api_settings)))
        # The server notices the disconnect, and the store discards what it had received.
        wait_for(lambda: stored_files(api_settings) == [])
        time.sleep(0.2)
        assert stored_files(api_settings) == []
        record = store.get_dataset(created["id"])
        assert record is not None and record.status == "uploading" and record.owner == owner
        # The client may send it again, whole this time.
        r = client.put(created["urls"]["content"], content=payload, headers=headers)
        assert r.status_code == 202, r.text
        store.close()


def test_large_streamed_upload_through_a_real_server(settings: Settings) -> None:
    """64 MiB streamed from a generator (no file) arrive whole with the right sha256."""
    block = os.urandom(1 << 20)
    blocks = 64
    digest = hashlib.sha256()
    for _ in range(blocks):
        digest.update(block)
    big = settings.model_copy(update={"max_dataset_bytes": blocks << 20})
    with served(big) as url, httpx.Client(base_url=url, timeout=120) as client:
        _, secret = _key(big)
        headers = {"Authorization": f"Bearer {secret}"}
        body = {"format": "npz", "name": "big", "sha256": digest.hexdigest(), "bytes": blocks << 20}
        created = client.post("/api/v1/datasets", json=body, headers=headers).json()
        r = client.put(created["upload"]["put_url"], content=(block for _ in range(blocks)), headers=headers)
        assert r.status_code == 202, r.text
        storage = big.open_storage()
        check = hashlib.sha256()
        for chunk in storage.iter_chunks(dataset_key(created["id"])):
            check.update(chunk)
        assert check.hexdigest() == digest.hexdigest()


def _store(settings: Settings) -> Any:
    from app_common.store import JobStore, make_redis

    return JobStore(make_redis(settings.redis_url or ""), prefix=settings.redis_prefix)


def _key(settings: Settings) -> tuple[str, str]:
    store = _store(settings)
    try:
        return store.create_key("uploader")  # type: ignore[no-any-return]
    finally:
        store.close()
