"""The storage interface: one suite over both backends (a local folder, and S3Storage on a real
SeaweedFS server), plus what only S3 has (presigned links checked by the store itself)."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from s3_server import S3Server

from app_common.storage import (
    LocalStorage,
    ObjectNotFound,
    ObjectTooLarge,
    Storage,
    StorageError,
    open_storage,
)
from app_common.storage.s3 import PART_BYTES, S3Storage


def s3_client(server: S3Server) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
    )


def s3_storage(server: S3Server, bucket: str, prefix: str = "", public_url: str | None = None) -> S3Storage:
    from app_common.storage.s3 import _client

    # The service's own client settings (path-style, v4), with the test server's credentials.
    client = _client(None, like=s3_client(server))
    return S3Storage(bucket, prefix, public_url=public_url, client=client)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return s3_storage(server, bucket, prefix="svc")


def leftovers(storage: Storage) -> list[str]:
    """Partial writes the backend might keep: temporary files, unfinished multipart uploads."""
    if isinstance(storage, LocalStorage):
        return [p.name for p in (storage.root / ".tmp").iterdir()]
    assert isinstance(storage, S3Storage)
    answer = storage._client.list_multipart_uploads(Bucket=storage.bucket)
    return [str(u["Key"]) for u in answer.get("Uploads", [])]


def nothing_stored(storage: Storage) -> bool:
    return storage.list("jobs/") == [] and leftovers(storage) == []


def test_put_file_get_file_round_trip(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    stored = storage.put_file("jobs/a/work/checkpoint.json", src)
    assert stored.bytes == 3000
    dest = tmp_path / "out" / "copy.bin"
    got = storage.get_file("jobs/a/work/checkpoint.json", dest)
    assert got.bytes == 3000 and dest.read_bytes() == src.read_bytes()
    assert b"".join(storage.iter_chunks("jobs/a/work/checkpoint.json", chunk_bytes=1000)) == src.read_bytes()
    assert storage.stat("jobs/a/work/checkpoint.json") is not None
    assert storage.stat("jobs/a/work/none") is None
    # Replacing an object is allowed.
    src.write_bytes(b"new")
    storage.put_file("jobs/a/work/checkpoint.json", src)
    assert b"".join(storage.iter_chunks("jobs/a/work/checkpoint.json")) == b"new"


def test_put_stream_of_several_parts_and_an_empty_one(storage: Storage) -> None:
    block = os.urandom(1024 * 1024)
    chunks = [block] * (PART_BYTES // len(block) + 1) + [b"", b"tail"]
    stored = storage.put_stream("jobs/a/big", iter(chunks), max_bytes=PART_BYTES * 2)
    expected = b"".join(chunks)
    assert stored.bytes == len(expected)
    got = hashlib.sha256()
    for chunk in storage.iter_chunks("jobs/a/big"):
        got.update(chunk)
    assert got.hexdigest() == hashlib.sha256(expected).hexdigest()
    assert storage.put_stream("jobs/a/empty", iter([])).bytes == 0
    assert storage.stat("jobs/a/empty") is not None
    assert b"".join(storage.iter_chunks("jobs/a/empty")) == b""
    assert leftovers(storage) == []


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", "a/../b", "", "a/", "a b", "a/.."])
def test_bad_keys_are_refused(storage: Storage, key: str, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError):
        storage.put_file(key, tmp_path / "f")
    with pytest.raises(ValueError):
        storage.put_stream(key, iter([b"x"]))
    with pytest.raises(ValueError):
        storage.stat(key)
    with pytest.raises(ValueError):
        storage.get_file(key, tmp_path / "dest")


def test_put_stream_over_the_limit_stores_nothing(storage: Storage) -> None:
    block = b"x" * (1024 * 1024)
    with pytest.raises(ObjectTooLarge):
        storage.put_stream("jobs/a/big", iter([block] * (PART_BYTES // len(block) + 2)), max_bytes=PART_BYTES + 10)
    assert storage.stat("jobs/a/big") is None
    assert nothing_stored(storage)
    # Exactly the limit is fine.
    assert storage.put_stream("jobs/a/ok", iter([b"12345"]), max_bytes=5).bytes == 5


def test_put_stream_whose_chunks_raise_midway_stores_nothing(storage: Storage) -> None:
    class ClientWentAway(Exception):
        pass

    def chunks() -> Iterator[bytes]:
        yield os.urandom(PART_BYTES)  # one whole part reached the store already
        yield b"more"
        raise ClientWentAway

    with pytest.raises(ClientWentAway):
        storage.put_stream("jobs/a/cut", chunks())
    assert storage.stat("jobs/a/cut") is None
    assert nothing_stored(storage)


def test_get_file_of_a_missing_key(storage: Storage, tmp_path: Path) -> None:
    dest = tmp_path / "dl" / "file"
    with pytest.raises(ObjectNotFound):
        storage.get_file("jobs/a/missing", dest)
    assert not dest.exists()
    assert list((tmp_path / "dl").iterdir()) == []
    with pytest.raises(ObjectNotFound):
        next(iter(storage.iter_chunks("jobs/a/missing")))
    storage.delete("jobs/a/missing")  # a missing object is fine to delete


def test_list_and_delete_prefix(storage: Storage) -> None:
    for key in ["jobs/a/work/checkpoint.json", "jobs/a/work/checkpoints/megabatch-0001.pt",
                "jobs/a/artifacts/model.safetensors", "jobs/ab/x", "datasets/d/content"]:
        storage.put_stream(key, iter([key.encode()]))
    assert [o.key for o in storage.list("jobs/a/")] == [
        "jobs/a/artifacts/model.safetensors", "jobs/a/work/checkpoint.json",
        "jobs/a/work/checkpoints/megabatch-0001.pt",
    ]
    assert storage.list("jobs/a/work/checkpoints/")[0].bytes == len(b"jobs/a/work/checkpoints/megabatch-0001.pt")
    with pytest.raises(ValueError):
        storage.list("jobs/a")  # prefixes are whole folders
    storage.delete("jobs/a/work/checkpoint.json")
    assert storage.stat("jobs/a/work/checkpoint.json") is None
    assert storage.delete_prefix("jobs/a/") == 2
    assert storage.list("jobs/a/") == []
    assert [o.key for o in storage.list("jobs/")] == ["jobs/ab/x"]
    assert storage.stat("datasets/d/content") is not None


def test_s3_list_follows_pages(s3_server: S3Server, s3_bucket: str) -> None:
    storage = s3_storage(s3_server, s3_bucket)
    storage.page_size = 2
    for i in range(5):
        storage.put_stream(f"jobs/p/{i}", iter([b"x"]))
    assert [o.key for o in storage.list("jobs/p/")] == [f"jobs/p/{i}" for i in range(5)]


def test_s3_prefix_keeps_objects_apart(s3_server: S3Server, s3_bucket: str) -> None:
    one, two = s3_storage(s3_server, s3_bucket, "one"), s3_storage(s3_server, s3_bucket, "two/deep")
    one.put_stream("jobs/a/x", iter([b"1"]))
    two.put_stream("jobs/a/x", iter([b"2"]))
    assert b"".join(one.iter_chunks("jobs/a/x")) == b"1"
    assert [o.key for o in two.list("jobs/")] == ["jobs/a/x"]
    raw = s3_client(s3_server).list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert sorted(o["Key"] for o in raw) == ["one/jobs/a/x", "two/deep/jobs/a/x"]


def test_s3_backend_errors_are_storage_errors(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    import boto3

    from app_common.storage.s3 import _client

    wrong = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=s3_server.access_key,
                         aws_secret_access_key="not-the-secret", region_name=s3_server.region)
    storage = S3Storage(s3_bucket, client=_client(None, like=wrong))
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(StorageError):
        storage.put_file("jobs/a/x", tmp_path / "f")
    with pytest.raises(StorageError):
        storage.put_stream("jobs/a/x", iter([b"x"]))
    with pytest.raises(StorageError):
        storage.list("jobs/")
    with pytest.raises(StorageError) as refused:
        storage.get_file("jobs/a/x", tmp_path / "dest")
    assert not isinstance(refused.value, ObjectNotFound)
    assert not (tmp_path / "dest").exists()


def test_open_storage_reads_the_aws_environment(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    storage = open_storage(f"s3://{s3_bucket}/pre", local_dir=tmp_path)
    assert isinstance(storage, S3Storage) and storage.kind == "s3"
    storage.put_stream("jobs/a/x", iter([b"hello"]))
    assert s3_client(s3_server).get_object(Bucket=s3_bucket, Key="pre/jobs/a/x")["Body"].read() == b"hello"


# --- presigned links: the store checks them itself -------------------------------------------


def test_local_backend_has_no_presigned_links(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    assert storage.presigned_get("jobs/a/x", expires_s=60) is None
    assert storage.presigned_post("jobs/a/x", max_bytes=10, expires_s=60) is None
    assert storage.local_path("jobs/a/x") == tmp_path / "store" / "jobs" / "a" / "x"


def _tamper(url: str) -> str:
    """The same link asking for another object (the signature no longer matches)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.replace("model.bin", "other.bin")))


def test_presigned_get_valid_tampered_and_expired(s3_server: S3Server, s3_bucket: str) -> None:
    storage = s3_storage(s3_server, s3_bucket, "svc")
    storage.put_stream("jobs/a/artifacts/model.bin", iter([b"weights"]))
    storage.put_stream("jobs/a/artifacts/other.bin", iter([b"secret"]))
    url = storage.presigned_get("jobs/a/artifacts/model.bin", expires_s=60, filename="model.bin")
    assert url is not None
    ok = httpx.get(url)
    assert ok.status_code == 200 and ok.content == b"weights"
    assert ok.headers["content-disposition"] == 'attachment; filename="model.bin"'
    assert httpx.get(_tamper(url)).status_code == 403
    assert httpx.get(url.replace("X-Amz-Expires=60", "X-Amz-Expires=6000")).status_code == 403
    short = storage.presigned_get("jobs/a/artifacts/model.bin", expires_s=1)
    assert short is not None
    time.sleep(2.2)
    assert httpx.get(short).status_code == 403


def test_presigned_links_are_signed_for_the_public_url(s3_server: S3Server, s3_bucket: str) -> None:
    # Clients reach the store as "localhost", the workers as 127.0.0.1: the host is signed.
    public = s3_server.endpoint_url.replace("127.0.0.1", "localhost")
    storage = s3_storage(s3_server, s3_bucket, public_url=public)
    storage.put_stream("jobs/a/artifacts/model.bin", iter([b"weights"]))
    url = storage.presigned_get("jobs/a/artifacts/model.bin", expires_s=60)
    assert url is not None and url.startswith(public + "/")
    assert httpx.get(url).content == b"weights"
    post = storage.presigned_post("jobs/a/up", max_bytes=10, expires_s=60)
    assert post is not None and post.url.startswith(public)


def test_presigned_post_within_and_over_the_limit(s3_server: S3Server, s3_bucket: str) -> None:
    storage = s3_storage(s3_server, s3_bucket, "svc")
    signed_after = time.time()
    post = storage.presigned_post("jobs/a/upload", max_bytes=100, expires_s=60)
    # The policy's expiry is the asked-for 60 s after signing (an outcome, not a speed).
    assert post is not None and post.expires_at.timestamp() >= signed_after + 59
    ok = httpx.post(post.url, data=post.fields, files={"file": ("data.npz", b"x" * 100)})
    assert ok.status_code == 204, ok.text
    assert b"".join(storage.iter_chunks("jobs/a/upload")) == b"x" * 100

    post = storage.presigned_post("jobs/b/upload", max_bytes=100, expires_s=60)
    assert post is not None
    big = httpx.post(post.url, data=post.fields, files={"file": ("data.npz", b"x" * 101)})
    assert big.status_code == 400 and "EntityTooLarge" in big.text
    assert storage.stat("jobs/b/upload") is None
    assert storage.list("jobs/b/") == []


# --- local files are private ---------------------------------------------------------------


def test_local_files_are_private(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    src = tmp_path / "src"
    src.write_bytes(b"x")
    src.chmod(0o644)
    storage.put_file("jobs/a/work/checkpoints/one", src)
    storage.put_stream("jobs/a/artifacts/two", iter([b"y"]))
    for key in ["jobs/a/work/checkpoints/one", "jobs/a/artifacts/two"]:
        path = storage.local_path(key)
        assert path is not None
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        folder = path.parent
        while folder != storage.root:
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
            folder = folder.parent
