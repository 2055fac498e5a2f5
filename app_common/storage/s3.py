"""The S3-compatible backend (AWS S3, SeaweedFS, MinIO, ...) on boto3.

Configured the AWS way: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
``AWS_REGION`` are read by boto3 itself unless a client is given. Path-style addressing
(``http://host/bucket/key``), because self-hosted stores rarely have per-bucket DNS names, and
signature v4, the one every S3-compatible store checks.

All-or-nothing writes: ``put_stream`` is a multipart upload that becomes an object only when it
is completed; any error on the way (the size limit, the chunks' own iterator, the backend) aborts
it, so the store keeps no parts. Presigned links are signed for ``public_url`` when clients reach
the store at another address than the workers (a second client with that endpoint: the host is
part of the v4 signature).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.client import Config
from botocore.exceptions import BotoCoreError, ClientError

from app_common.storage.base import (
    CHUNK_BYTES,
    ObjectNotFound,
    PresignedPost,
    Storage,
    StorageError,
    StoredObject,
    check_key,
    check_prefix,
    limited,
)

log = logging.getLogger(__name__)

# S3's smallest part (all but the last) is 5 MiB; 8 MiB parts keep memory flat and requests few.
PART_BYTES = 8 * 1024 * 1024
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})


def _client(endpoint_url: str | None = None, *, like: Any = None) -> Any:
    """A boto3 S3 client (path-style, v4); with ``like``, one with that client's credentials,
    region and (unless ``endpoint_url`` is given) endpoint: botocore keeps them on the client."""
    config = Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"mode": "standard"})
    if like is None:
        return boto3.client("s3", endpoint_url=endpoint_url, config=config)
    creds = like._request_signer._credentials
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or like.meta.endpoint_url,
        region_name=like.meta.region_name,
        aws_access_key_id=creds.access_key if creds else None,
        aws_secret_access_key=creds.secret_key if creds else None,
        aws_session_token=creds.token if creds else None,
        config=config,
    )


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Storage(Storage):
    kind = "s3"
    #: Keys per listing request (S3 answers at most 1000).
    page_size = 1000

    def __init__(self, bucket: str, prefix: str = "", *, public_url: str | None = None, client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self._client = client if client is not None else _client()
        # Links are signed for the address clients use (the host is part of the v4 signature):
        # a second client with the same credentials and region and that endpoint.
        self._signer = self._client if not public_url else _client(public_url, like=self._client)

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _fail(self, what: str, key: str, exc: Exception) -> StorageError:
        if isinstance(exc, ClientError) and _code(exc) in _MISSING:
            return ObjectNotFound(f"no object {key!r}")
        return StorageError(f"s3://{self.bucket}/{self.prefix}{key}: {what} failed ({exc})")

    def put_file(self, key: str, path: Path) -> StoredObject:
        name = self._name(key)
        try:
            self._client.upload_file(str(path), self.bucket, name)
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise self._fail("upload", key, exc) from exc
        return StoredObject(key, Path(path).stat().st_size)

    def put_stream(self, key: str, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> StoredObject:
        name = self._name(key)
        try:
            upload_id = str(self._client.create_multipart_upload(Bucket=self.bucket, Key=name)["UploadId"])
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("upload", key, exc) from exc
        try:
            parts: list[dict[str, Any]] = []
            total = 0
            for part in _parts(limited(chunks, max_bytes)):
                total += len(part)
                answer = self._client.upload_part(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=len(parts) + 1, Body=part
                )
                parts.append({"PartNumber": len(parts) + 1, "ETag": answer["ETag"]})
            if not parts:  # S3 refuses to complete an upload without parts
                parts.append(self._empty_part(name, upload_id))
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException as exc:
            self._abort(name, upload_id)
            if isinstance(exc, BotoCoreError | ClientError):
                raise self._fail("upload", key, exc) from exc
            raise
        return StoredObject(key, total)

    def _empty_part(self, name: str, upload_id: str) -> dict[str, Any]:
        answer = self._client.upload_part(Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=1, Body=b"")
        return {"PartNumber": 1, "ETag": answer["ETag"]}

    def _abort(self, name: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
        except (BotoCoreError, ClientError) as exc:  # the store's lifecycle rules are the last resort
            log.warning("s3://%s/%s: could not abort multipart upload %s (%s)", self.bucket, name, upload_id, exc)

    def get_file(self, key: str, dest: Path) -> StoredObject:
        name = self._name(key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            self._client.download_file(self.bucket, name, str(tmp))
            os.replace(tmp, dest)
        except (BotoCoreError, ClientError) as exc:
            tmp.unlink(missing_ok=True)
            raise self._fail("download", key, exc) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StoredObject(key, dest.stat().st_size)

    def iter_chunks(self, key: str, *, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        name = self._name(key)
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=name)["Body"]
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("download", key, exc) from exc
        try:
            while chunk := body.read(chunk_bytes):
                yield bytes(chunk)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("download", key, exc) from exc
        finally:
            body.close()

    def stat(self, key: str) -> StoredObject | None:
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._name(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise self._fail("stat", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("stat", key, exc) from exc
        return StoredObject(key, int(head["ContentLength"]))

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._name(key))
        except (BotoCoreError, ClientError) as exc:
            if isinstance(exc, ClientError) and _code(exc) in _MISSING:
                return
            raise self._fail("delete", key, exc) from exc

    def list(self, prefix: str) -> list[StoredObject]:
        full = self.prefix + check_prefix(prefix)
        found: list[StoredObject] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, PaginationConfig={"PageSize": self.page_size}
            ):
                for item in page.get("Contents", []):
                    found.append(StoredObject(str(item["Key"])[len(self.prefix):], int(item["Size"])))
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("list", prefix, exc) from exc
        return sorted(found, key=lambda o: o.key)

    def presigned_get(self, key: str, *, expires_s: int, filename: str | None = None) -> str | None:
        params: dict[str, str] = {"Bucket": self.bucket, "Key": self._name(key)}
        if filename is not None:
            params["ResponseContentDisposition"] = f'attachment; filename="{_quoted(filename)}"'
        try:
            url = self._signer.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("signing", key, exc) from exc
        return str(url)

    def presigned_post(self, key: str, *, max_bytes: int, expires_s: int) -> PresignedPost | None:
        expires_at = datetime.now(UTC) + timedelta(seconds=expires_s)
        try:
            post = self._signer.generate_presigned_post(
                self.bucket, self._name(key), Conditions=[["content-length-range", 0, max_bytes]], ExpiresIn=expires_s
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("signing", key, exc) from exc
        fields = {str(k): str(v) for k, v in post["fields"].items()}
        return PresignedPost(url=str(post["url"]), fields=fields, expires_at=expires_at)


def _quoted(filename: str) -> str:
    """A file name safe inside a quoted Content-Disposition parameter (keys are ASCII already)."""
    return filename.replace("\\", "_").replace('"', "_")


def _parts(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``chunks`` regrouped into parts of ``PART_BYTES`` (the last one may be smaller)."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= PART_BYTES:
            yield bytes(buffer[:PART_BYTES])
            del buffer[:PART_BYTES]
    if buffer:
        yield bytes(buffer)
