"""Object storage for datasets, checkpoints and exported files (see :mod:`.base`).

:func:`open_storage` picks the backend from the settings: ``APP_STORAGE_URL=s3://bucket/prefix``
for an S3-compatible store (configured the AWS way: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), otherwise a local folder (``APP_STORAGE_DIR``).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from app_common.storage.base import (
    ObjectNotFound,
    ObjectTooLarge,
    PresignedPost,
    Storage,
    StorageError,
    StoredObject,
)
from app_common.storage.keys import artifact_key, dataset_key, job_prefix, job_work_prefix, models_index_key
from app_common.storage.local import LocalStorage

__all__ = [
    "LocalStorage",
    "ObjectNotFound",
    "ObjectTooLarge",
    "PresignedPost",
    "Storage",
    "StorageError",
    "StoredObject",
    "artifact_key",
    "dataset_key",
    "job_prefix",
    "job_work_prefix",
    "models_index_key",
    "open_storage",
]


def open_storage(url: str | None, *, local_dir: Path, public_url: str | None = None) -> Storage:
    """The store named by ``url`` (``s3://bucket[/prefix]`` or ``file:///path``); with no URL, a
    local folder at ``local_dir``. ``public_url`` is the store's address as clients reach it,
    when that differs from the workers' (presigned links are signed for it)."""
    if not url:
        return LocalStorage(Path(local_dir))
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalStorage(Path(parts.path))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"APP_STORAGE_URL {url!r} names no bucket (s3://bucket/prefix)")
        try:
            from app_common.storage.s3 import S3Storage
        except ImportError as exc:  # boto3 missing
            raise StorageError(f"APP_STORAGE_URL is s3:// but {exc.name} is not installed: "
                               "pip install 'anytime-prune[s3]'") from None
        return S3Storage(parts.netloc, parts.path.strip("/"), public_url=public_url)
    raise ValueError(f"APP_STORAGE_URL must be s3://bucket/prefix or file:///path, got {url!r}")
