"""Uploading datasets with the client (``anytime_prune.client``, ``anytime_prune.upload``) and the
``anytime-prune datasets`` verbs.

The API side is a scripted transport that follows the HTTP contract (create, streamed PUT or
presigned POST + complete, polling); the presigned POST form is also sent to the real S3 server
of the session, which checks its signature and size policy. The client against the real service
is in test_datasets_e2e.py.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from anytime_prune import client_cli
from anytime_prune.cli import build_parser
from anytime_prune.client import ApiError, Client, DatasetInvalid
from anytime_prune.upload import file_chunks, file_digest, multipart_form

DATASET_ID = "d" * 32


def write_file(path: Path, size: int) -> bytes:
    data = bytes((i * 7 + i // 251) % 256 for i in range(size))
    path.write_bytes(data)
    return data


def parse_form(content_type: str, body: bytes) -> list[tuple[str, str | None, bytes]]:
    """(name, filename, value) of each part, in order."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    assert message.is_multipart()
    parts = []
    for part in message.iter_parts():
        disposition = part.get("Content-Disposition")
        assert disposition is not None and disposition.startswith("form-data")
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        parts.append((str(part.get_param("name", header="content-disposition")),
                      part.get_filename(), payload))
    return parts


# --- pure ----------------------------------------------------------------------------------------


def test_file_digest_reads_in_chunks_and_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    data = write_file(path, 10_000)
    digest = file_digest(path, chunk_bytes=999)
    assert digest.sha256 == hashlib.sha256(data).hexdigest() and digest.bytes == 10_000
    seen: list[tuple[int, int]] = []
    chunks = list(file_chunks(path, chunk_bytes=4096, progress=lambda s, t: seen.append((s, t))))
    assert [len(c) for c in chunks] == [4096, 4096, 1808] and b"".join(chunks) == data
    assert seen == [(4096, 10_000), (8192, 10_000), (10_000, 10_000)]


def test_multipart_form_puts_the_fields_first_and_the_file_last(tmp_path: Path) -> None:
    path = tmp_path / 'my "data".npz'
    data = write_file(path, 5000)
    fields = {"key": "datasets/x/content", "policy": "eyJ4Ijo=", "x-amz-signature": "abc"}
    form = multipart_form(fields, path, boundary="b0undary")
    body = b"".join(form.chunks())
    assert form.length == len(body)
    assert form.content_type == "multipart/form-data; boundary=b0undary"
    parts = parse_form(form.content_type, body)
    assert [p[0] for p in parts] == ["key", "policy", "x-amz-signature", "file"]
    assert [p[2] for p in parts[:3]] == [v.encode() for v in fields.values()]
    assert parts[-1][2] == data
    assert parts[-1][1] == "my %22data%22.npz"  # a quote cannot end the header early


# --- the client against a scripted API ---------------------------------------------------------


class FakeApi:
    """The datasets routes of the HTTP contract, in memory. ``post``: offer a presigned POST to
    http://store.test; ``settle``: the status validation ends in (after ``polls`` GETs)."""

    def __init__(self, *, post: bool = False, settle: str = "ready", polls: int = 2, put_status: int = 202):
        self.post, self.settle, self.polls, self.put_status = post, settle, polls, put_status
        self.requests: list[httpx.Request] = []
        self.bodies: dict[str, bytes] = {}
        self.record: dict[str, Any] = {}
        self.deleted = False

    def _answer(self, status: int, body: Any = None) -> httpx.Response:
        return httpx.Response(status, json=body)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = request.read()  # drains a streamed body
        self.bodies[f"{request.method} {request.url.host}{request.url.path}"] = body
        path = request.url.path
        base = f"/api/v1/datasets/{DATASET_ID}"
        if request.url.host == "store.test":
            return httpx.Response(204)
        if request.method == "POST" and path == "/api/v1/datasets":
            created = json.loads(body)
            self.record = {"id": DATASET_ID, "status": "uploading", "error": None, "info": None,
                           "created_at": "2026-01-01T00:00:00Z", **created}
            post = {"url": "http://store.test/bucket", "fields": {"key": "k", "policy": "p"},
                    "expires_at": "2026-01-01T01:00:00Z"}
            return self._answer(201, {**self.record, "upload": {"put_url": f"{base}/content",
                                                                 "post": post if self.post else None}})
        if path in (f"{base}/content", f"{base}/complete"):
            if self.put_status >= 400:
                return self._answer(self.put_status, {"title": "Unprocessable", "detail": "sha256 differs",
                                                      "errors": [{"field": "sha256", "reason": "differs"}]})
            self.record["status"] = "validating"
            return self._answer(202, self.record)
        if request.method == "GET" and path == base:
            gets = sum(r.method == "GET" and r.url.path == base for r in self.requests)
            if gets > self.polls:
                self.record["status"] = self.settle
                if self.settle == "invalid":
                    self.record["error"] = "npz: member 'x_train' is missing"
                else:
                    self.record["info"] = {"train_samples": 8, "test_samples": 2, "num_classes": 2,
                                           "classes": ["0", "1"], "input_shape": [4]}
            return self._answer(200, self.record)
        if request.method == "DELETE" and path == base:
            self.deleted = True
            return httpx.Response(204)
        return self._answer(404, {"title": "Not Found", "detail": path})


def fake_client(api: FakeApi) -> Client:
    return Client("http://api.test", "ap_secret", transport=httpx.MockTransport(api))


@pytest.fixture
def npz(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "my.npz"
    return path, write_file(path, 3 * (1 << 20) + 5)  # more than one chunk


def test_upload_streams_a_put_through_the_api_and_waits_until_ready(npz: tuple[Path, bytes]) -> None:
    path, data = npz
    api = FakeApi()
    progress: list[tuple[int, int]] = []
    with fake_client(api) as client:
        record = client.upload_dataset(path, "npz", progress=lambda s, t: progress.append((s, t)), poll_s=0.01)
    assert record["status"] == "ready" and record["info"]["num_classes"] == 2
    create = json.loads(api.bodies["POST api.test/api/v1/datasets"])
    assert create == {"format": "npz", "name": "my.npz", "sha256": hashlib.sha256(data).hexdigest(),
                      "bytes": len(data)}
    put = next(r for r in api.requests if r.method == "PUT")
    assert put.url.path == f"/api/v1/datasets/{DATASET_ID}/content"
    assert put.headers["Content-Length"] == str(len(data)) and "Transfer-Encoding" not in put.headers
    assert put.headers["Authorization"] == "Bearer ap_secret"
    assert api.bodies[f"PUT api.test/api/v1/datasets/{DATASET_ID}/content"] == data
    assert progress[-1] == (len(data), len(data)) and len(progress) == 4
    assert [r.method for r in api.requests] == ["POST", "PUT", "GET", "GET", "GET"]
    assert not api.deleted


def test_upload_with_a_presigned_post_goes_to_the_store_without_the_api_key(npz: tuple[Path, bytes]) -> None:
    path, data = npz
    api = FakeApi(post=True, polls=0)
    with fake_client(api) as client:
        record = client.upload_dataset(path, "npz", name="digits as npz")
    assert record["status"] == "ready" and record["name"] == "digits as npz"
    to_store = next(r for r in api.requests if r.url.host == "store.test")
    assert "Authorization" not in to_store.headers
    parts = parse_form(to_store.headers["Content-Type"], api.bodies["POST store.test/bucket"])
    assert [(p[0], p[2]) for p in parts] == [("key", b"k"), ("policy", b"p"), ("file", data)]
    assert int(to_store.headers["Content-Length"]) == len(api.bodies["POST store.test/bucket"])
    assert [(r.method, r.url.path) for r in api.requests][2] == ("POST", f"/api/v1/datasets/{DATASET_ID}/complete")


def test_invalid_dataset_raises_with_the_reason(npz: tuple[Path, bytes]) -> None:
    api = FakeApi(settle="invalid", polls=1)
    with fake_client(api) as client, pytest.raises(DatasetInvalid) as caught:
        client.upload_dataset(npz[0], "npz", poll_s=0.01)
    assert caught.value.reason == "npz: member 'x_train' is missing"
    assert "x_train" in str(caught.value) and caught.value.dataset["id"] == DATASET_ID
    assert isinstance(caught.value, ApiError)


def test_a_refused_upload_deletes_its_record(npz: tuple[Path, bytes]) -> None:
    api = FakeApi(put_status=422)
    with fake_client(api) as client, pytest.raises(ApiError) as caught:
        client.upload_dataset(npz[0], "npz")
    assert caught.value.status == 422 and caught.value.errors[0].field == "sha256"
    assert api.deleted


def test_no_wait_returns_once_the_bytes_are_in(npz: tuple[Path, bytes]) -> None:
    api = FakeApi()
    with fake_client(api) as client:
        assert client.upload_dataset(npz[0], "npz", wait=False)["status"] == "validating"
    assert [r.method for r in api.requests] == ["POST", "PUT"]


def test_wait_gives_up_after_its_timeout(npz: tuple[Path, bytes]) -> None:
    api = FakeApi(polls=10**6)
    with fake_client(api) as client, pytest.raises(TimeoutError, match="still validating"):
        client.upload_dataset(npz[0], "npz", timeout_s=0.05, poll_s=0.01)


def test_submit_names_the_dataset_by_id() -> None:
    seen: list[dict[str, Any]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.read()))
        return httpx.Response(201, json={"id": "j", "status": "queued"})

    with Client("http://api.test", "k", transport=httpx.MockTransport(handle)) as client:
        client.submit({"architecture": "mlp"}, dataset_id=DATASET_ID)
        client.submit({"dataset": {"name": "npz", "few_shot": 5}}, dataset_id=DATASET_ID)
    assert seen[0] == {"architecture": "mlp", "dataset": {"id": DATASET_ID}}
    assert seen[1] == {"dataset": {"name": "npz", "few_shot": 5, "id": DATASET_ID}}


def test_list_datasets_follows_cursors() -> None:
    pages = {None: (["a", "b"], "c1"), "c1": (["c"], None)}

    def handle(request: httpx.Request) -> httpx.Response:
        items, cursor = pages[request.url.params.get("cursor")]
        return httpx.Response(200, json={"items": [{"id": i} for i in items], "next_cursor": cursor})

    with Client("http://api.test", "k", transport=httpx.MockTransport(handle)) as client:
        assert [d["id"] for d in client.list_datasets()] == ["a", "b", "c"]
        assert [d["id"] for d in client.list_datasets(limit=2)] == ["a", "b"]


# --- the presigned form against a real S3 server -----------------------------------------------


def test_the_form_is_accepted_by_a_real_s3_server_within_its_size_policy(
    s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=s3_server.access_key,
                      aws_secret_access_key=s3_server.secret_key, region_name=s3_server.region,
                      config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    path = tmp_path / "up.npz"
    data = write_file(path, 300_000)
    post = s3.generate_presigned_post(s3_bucket, "datasets/up", Conditions=[["content-length-range", 1, len(data)]],
                                      ExpiresIn=60)
    form = multipart_form(post["fields"], path)
    headers = {"Content-Type": form.content_type, "Content-Length": str(form.length)}
    answer = httpx.post(post["url"], content=form.chunks(), headers=headers, timeout=30)
    assert answer.status_code < 300, answer.text
    assert s3.get_object(Bucket=s3_bucket, Key="datasets/up")["Body"].read() == data

    bigger = tmp_path / "big.npz"
    write_file(bigger, len(data) + 1)
    form = multipart_form(post["fields"], bigger)
    headers = {"Content-Type": form.content_type, "Content-Length": str(form.length)}
    refused = httpx.post(post["url"], content=form.chunks(), headers=headers, timeout=30)
    assert refused.status_code == 400 and "EntityTooLarge" in refused.text


# --- the verbs ----------------------------------------------------------------------------------


def test_datasets_verbs_parse() -> None:
    parser = build_parser()
    args = parser.parse_args(["datasets", "upload", "my.npz", "--format", "cifar10", "--name", "mine"])
    assert (args.file, args.format, args.name, args.no_wait) == ("my.npz", "cifar10", "mine", False)
    assert parser.parse_args(["datasets", "list", "--status", "ready"]).status == "ready"
    assert parser.parse_args(["datasets", "show", DATASET_ID]).dataset_id == DATASET_ID
    assert parser.parse_args(["datasets", "delete", DATASET_ID, "--json"]).json
    for bad in (["datasets", "upload", "x.npz"], ["datasets", "upload", "x", "--format", "csv"],
                ["datasets", "list", "--status", "done"], ["datasets"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def run_verb(argv: list[str], api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(client_cli, "_client", lambda args: fake_client(api))
    args: argparse.Namespace = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


def test_upload_prints_the_id_alone_and_invalid_exits_1_with_the_reason(
    npz: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_verb(["datasets", "upload", str(npz[0]), "--format", "npz"], FakeApi(polls=0), monkeypatch) == 0
    out, err = capsys.readouterr()
    assert out == DATASET_ID + "\n"
    assert "8 train / 2 test samples, 2 classes, input 4" in err
    assert run_verb(["datasets", "upload", str(npz[0]), "--format", "npz"], FakeApi(settle="invalid", polls=0),
                    monkeypatch) == 1
    out, err = capsys.readouterr()
    assert out == "" and f"dataset {DATASET_ID} is invalid: npz: member 'x_train' is missing" in err
    assert run_verb(["datasets", "upload", str(npz[0].with_name("none.npz")), "--format", "npz"], FakeApi(),
                    monkeypatch) == 2
    assert "no such file" in capsys.readouterr().err


def test_show_list_and_delete_output(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                     npz: tuple[Path, bytes]) -> None:
    api = FakeApi(polls=0)
    with fake_client(api) as client:
        client.upload_dataset(npz[0], "npz")
    assert run_verb(["datasets", "show", DATASET_ID], api, monkeypatch) == 0
    out = capsys.readouterr().out
    assert f"dataset   {DATASET_ID}" in out and "classes   0, 1" in out and "status    8 train" in out
    assert run_verb(["datasets", "show", DATASET_ID, "--json"], api, monkeypatch) == 0
    assert json.loads(capsys.readouterr().out)["id"] == DATASET_ID
    assert run_verb(["datasets", "delete", DATASET_ID], api, monkeypatch) == 0 and api.deleted
    assert run_verb(["datasets", "show", "e" * 32], api, monkeypatch) == 4
    assert "404" in capsys.readouterr().err
