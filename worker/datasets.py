"""Validate an uploaded dataset: the work behind the control queue's task, testable without Celery.

:func:`validate_dataset` takes a dataset the API moved to ``validating`` and ends it ``ready``
(with what the engine's loader found: sample counts, classes, input shape) or ``invalid`` (with
the reason, one line naming the problem, never a path of this host):

1. download the uploaded file from the object store into a private temporary folder;
2. recompute its sha256 (a presigned upload reaches the store without the API seeing the bytes);
3. unpack it with the upload limits (:func:`app_engine.data.archive.unpack_dataset`);
4. read it as the loader of its format will on a training worker
   (:func:`app_engine.data.check_dataset`): an image folder is decoded one image at a time, so a
   folder far larger than this worker's memory is checked all the same, and its first unreadable
   member is the one named.

A dataset deleted meanwhile, or no longer ``validating`` (a redelivered message), is left alone.
The engine (torch) is imported inside :func:`inspect_upload` only, so the control worker's main
process never loads it.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

from redis.exceptions import RedisError

from app_common.datasets import READY, VALIDATING, DatasetInfo, DatasetRecord
from app_common.settings import Settings
from app_common.storage import ObjectNotFound, Storage, StorageError, dataset_key
from app_common.store import JobStore

log = logging.getLogger(__name__)

OUTCOME_SKIPPED = "skipped"  # deleted, or not validating (any more): nothing to do
MAX_REASON_CHARS = 500
_CHUNK = 1024 * 1024


class InvalidDataset(Exception):
    """The upload is not a usable dataset; the message is the reason users see."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def work_folder(settings: Settings) -> Path:
    """Where downloads and unpacking happen: beside the dataset cache, on the worker's own disk
    (a 2 GiB upload should not land in a RAM-backed /tmp)."""
    folder = Path(settings.cache_dir) / ".tmp"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def validate_dataset(dataset_id: str, *, store: JobStore, storage: Storage, settings: Settings) -> str:
    """Validate dataset ``dataset_id``; returns its status afterwards, or ``OUTCOME_SKIPPED``.

    Raises (so that the task retries) when the store or Redis fails: the dataset stays
    ``validating`` until a delivery gets through.
    """
    record = store.get_dataset(dataset_id)
    if record is None or record.status != VALIDATING:
        log.info("dataset %s: %s; nothing to validate", dataset_id, "gone" if record is None else record.status)
        return OUTCOME_SKIPPED
    with tempfile.TemporaryDirectory(dir=work_folder(settings), prefix="validate-") as tmp:
        try:
            info = inspect_upload(record, storage, settings, Path(tmp))
        except ObjectNotFound:
            if store.get_dataset(dataset_id) is None:  # deleted meanwhile, its file with it
                return OUTCOME_SKIPPED
            return _invalid(store, dataset_id, "the uploaded file is missing from the object store")
        except InvalidDataset as exc:
            return _invalid(store, dataset_id, str(exc))
        except (StorageError, RedisError, OSError):
            raise  # the store, Redis or this host's disk: worth another delivery
        except Exception as exc:  # a loader tripping over the content: reading it again will too
            log.exception("dataset %s: validation raised", dataset_id)
            reason = public_reason(f"the dataset could not be read ({type(exc).__name__}: {exc})", Path(tmp), Path(tmp))
            return _invalid(store, dataset_id, reason)
    if store.set_dataset_ready(dataset_id, info):
        log.info("dataset %s: ready (%s)", dataset_id, info)
        return READY
    return OUTCOME_SKIPPED  # deleted (or moved by someone else) while it was being read


def _invalid(store: JobStore, dataset_id: str, reason: str) -> str:
    log.info("dataset %s: invalid: %s", dataset_id, reason)
    return "invalid" if store.set_dataset_invalid(dataset_id, reason) else OUTCOME_SKIPPED


def inspect_upload(record: DatasetRecord, storage: Storage, settings: Settings, work: Path) -> DatasetInfo:
    """Download, check, unpack and read ``record``'s upload inside ``work``; what the loader finds.

    Raises :class:`InvalidDataset` for anything wrong with the upload itself, ObjectNotFound when
    it is not in the store; other errors (the store, the disk) propagate.
    """
    # The engine (and torch) only here: the control worker's main process never imports it.
    from app_common.spec import DatasetSpec
    from app_engine.data import check_dataset
    from app_engine.data.archive import unpack_dataset
    from app_engine.errors import RunInputError

    # Named for what users read in a reason ("dataset.npz: array 'x_train' ...").
    content = work / ("dataset.npz" if record.format == "npz" else "archive")
    storage.get_file(dataset_key(record.id), content)
    digest = sha256_file(content)
    if digest != record.sha256:
        raise InvalidDataset(f"sha256 mismatch: the uploaded file's sha256 is {digest}, not the declared "
                             f"{record.sha256}")
    unpacked = work / "unpacked"
    try:
        path = unpack_dataset(record.format, content, unpacked, max_bytes=settings.max_dataset_extracted_bytes,
                              max_members=settings.max_dataset_members)
        content.unlink()  # the unpacked copy is all that is needed from here on
        summary = check_dataset(DatasetSpec(name=record.format, path=str(path)))
    except RunInputError as exc:
        raise InvalidDataset(public_reason(str(exc), unpacked, work)) from None
    except MemoryError:
        raise InvalidDataset("the dataset does not fit in the validating worker's memory") from None
    return DatasetInfo(
        train_samples=summary.train_samples,
        test_samples=summary.test_samples,
        num_classes=summary.num_classes,
        classes=list(summary.classes),
        input_shape=list(summary.input_shape),
    )


def public_reason(message: str, unpacked: Path, work: Path) -> str:
    """A loader's message as users may read it: one line, paths relative to the archive
    (``cifar-10-batches-py/data_batch_3: truncated pickle``), no folder of this host."""
    line = message.strip().splitlines()[0] if message.strip() else "unreadable dataset"
    for folder, shown in ((unpacked, "the archive"), (work, "the upload")):
        line = line.replace(f"{folder}/", "").replace(str(folder), shown)
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 3] + "..."
