"""A job's run folder, mirrored between this host and the object store.

The engine is storage-agnostic: it writes checkpoints and exported files into a local folder
(``{artifacts_dir}/{job_id}``). :class:`RunFolderMirror` makes the store the folder's source of
truth, so that a worker on any host resumes the job:

- before the run, :meth:`~RunFolderMirror.fetch` empties the local folder and copies the
  checkpoints that the store's ``checkpoint.json`` names, then that record itself;
- after each ``CheckpointWritten`` event (it is one of the engine's callbacks) it uploads the new
  checkpoint file, then ``checkpoint.json`` (data before its commit record: a worker that dies in
  between leaves the previous record valid), then deletes the store's checkpoints the record no
  longer names;
- after each ``ModelWritten`` event (``export.keep_every_megabatch``) it uploads that megabatch's
  model and manifest as artifacts (``megabatch-0003/...``), then rewrites the job's model index
  (:func:`~app_common.storage.models_index_key`, read back by :meth:`~RunFolderMirror.fetch` on
  resume), so the models of a running job are listed and downloadable as soon as they exist;
- after a completed run, :meth:`~RunFolderMirror.upload_artifacts` stores each exported file at
  :func:`~app_common.storage.artifact_key` (the job's ``artifacts``: the final files; the kept
  megabatch models are listed by the model index, not there).

A storage error raises out of the callback and so out of the run: the delivery is retried, and
the retry resumes from the last checkpoint in the store.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from app_common.events import CheckpointWritten, Event, ModelWritten
from app_common.jobs import ArtifactInfo
from app_common.megabatch_models import MegabatchModel, ModelIndex, megabatch_of, read_model_index
from app_common.storage import Storage, StorageError, artifact_key, job_work_prefix, models_index_key
from app_common.storage.base import check_key

log = logging.getLogger(__name__)


def _layout() -> tuple[str, str]:
    """The engine's names for the commit record and the checkpoint folder (imported here, not at
    module level: the engine imports torch, which only the process running a job loads)."""
    from app_engine.checkpoint import FOLDER, RECORD

    return RECORD, FOLDER


class RunFolderMirror:
    """The store's copy of one job's run folder (see the module docstring).

    ``interrupt`` is the same check the progress sink makes: while it gives a reason (the lease
    was lost, the run is being terminated) nothing more is uploaded, because the job is no longer
    this worker's to write.
    """

    def __init__(
        self, storage: Storage, job_id: str, out_dir: Path, *, interrupt: Callable[[], str | None] | None = None
    ) -> None:
        self.storage = storage
        self.job_id = job_id
        self.out_dir = Path(out_dir)
        self.prefix = job_work_prefix(job_id)
        self.interrupt = interrupt
        self.uploads = 0
        self.models = ModelIndex()

    def fetch(self) -> int | None:
        """Start from the store's checkpoints in an empty local folder; returns the newest
        megabatch fetched, or None when the store has none (a fresh start)."""
        record_name, folder = _layout()
        discard_local(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.models = read_model_index(self.storage, self.job_id)
        except ValueError as exc:  # the models are optional: a damaged list must not fail the job
            log.warning("%s; it will list the models kept from now on", exc)
            self.models = ModelIndex()
        try:
            raw = b"".join(self.storage.iter_chunks(self.prefix + record_name))
        except KeyError:  # ObjectNotFound: nothing was checkpointed yet
            return None
        entries = _entries(raw, folder)
        for entry in entries:
            self.storage.get_file(self.prefix + entry, self.out_dir / entry)
        # The record last: locally too, it never names a file that is not there.
        (self.out_dir / record_name).write_bytes(raw)
        newest = json.loads(raw)["checkpoints"][-1]["megabatch"] if entries else None
        log.info("job %s: fetched %d checkpoint(s) from the store (newest: megabatch %s)",
                 self.job_id, len(entries), newest)
        return int(newest) if newest is not None else None

    def __call__(self, event: Event) -> None:
        if not isinstance(event, CheckpointWritten | ModelWritten):
            return
        if self.interrupt is not None and self.interrupt() is not None:
            return  # the sink stops the run at this very event
        if isinstance(event, ModelWritten):
            self.push_model(event)
        else:
            self.push_checkpoint(Path(event.path))

    def push_model(self, event: ModelWritten) -> None:
        """Upload a megabatch's kept files, then the model index naming them (data before the
        record that lists it: a listed model is always in the store)."""
        files = [ArtifactInfo.model_validate(f) for f in event.files]
        for info in files:
            if megabatch_of(info.name) != event.megabatch:
                raise StorageError(f"megabatch {event.megabatch}: {info.name!r} is not one of its model's files")
            self.storage.put_file(artifact_key(self.job_id, info.name), self.out_dir / info.name)
        entry = MegabatchModel(index=event.megabatch, density=event.density, target_density=event.target_density,
                               test_accuracy=event.test_accuracy, name=event.name, bytes=event.bytes,
                               sha256=event.sha256, files=files)
        self.models = self.models.with_model(entry)
        self.storage.put_stream(models_index_key(self.job_id), [self.models.model_dump_json(indent=1).encode()])

    def push_checkpoint(self, newest: Path) -> None:
        """Upload ``newest`` (a file in the folder's checkpoint folder), any other checkpoint the
        local record names that the store lacks, then the record; prune what it no longer names."""
        record_name, folder = _layout()
        raw = (self.out_dir / record_name).read_bytes()
        named = _entries(raw, folder)
        stored = {o.key for o in self.storage.list(f"{self.prefix}{folder}/")}
        newest_entry = f"{folder}/{newest.name}"
        for entry in named:
            key = self.prefix + entry
            # The newest always: an earlier attempt may have left a file of that name unrecorded.
            if entry == newest_entry or key not in stored:
                self.storage.put_file(key, self.out_dir / entry)
        self.storage.put_stream(self.prefix + record_name, [raw])
        for key in stored - {self.prefix + entry for entry in named}:
            self.storage.delete(key)
        self.uploads += 1

    def upload_artifacts(self, artifacts: Mapping[str, Mapping[str, Any]]) -> None:
        """Store each exported file (``name -> {"path", ...}`` as the engine returns them)."""
        for name, info in artifacts.items():
            self.storage.put_file(artifact_key(self.job_id, name), Path(info["path"]))


def _entries(raw: bytes, folder: str) -> list[str]:
    """The checkpoint files a commit record names (relative paths such as
    ``checkpoints/megabatch-0003.pt``), refusing any that would leave the checkpoint folder."""
    try:
        record = json.loads(raw)
        files = [str(entry["file"]) for entry in record.get("checkpoints", [])]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise StorageError(f"the stored checkpoint record is unreadable ({exc})") from None
    for file in files:
        try:
            check_key(file)
        except ValueError:
            raise StorageError(f"the stored checkpoint record names {file!r}, not a file name") from None
        if not file.startswith(f"{folder}/") or file.count("/") != 1:
            raise StorageError(f"the stored checkpoint record names {file!r}, outside {folder}/")
    return files


def discard_local(out_dir: Path) -> None:
    """Remove a job's local work folder (the store holds what is worth keeping)."""
    shutil.rmtree(out_dir, ignore_errors=True)


def discard_work(storage: Storage, job_id: str, out_dir: Path) -> None:
    """After a terminal outcome: the checkpoints will never be resumed, here or in the store."""
    discard_local(out_dir)
    try:
        storage.delete_prefix(job_work_prefix(job_id))
    except StorageError as exc:  # only space is lost; deleting the job frees it too
        log.warning("job %s: could not delete its checkpoints from the store (%s)", job_id, exc)
