"""Megabatch checkpoints: atomic, checksummed, loaded without unpickling arbitrary objects.

Layout in the run folder::

    checkpoints/megabatch-0003.pt   torch.save of tensors and plain containers only
    checkpoint.json                 {"megabatch", "file", "sha256", "bytes", "spec_fingerprint"}

``checkpoint.json`` is the commit record: it is replaced (atomically) only after the checkpoint
file it names is completely on disk, so a crash at any moment leaves either the previous or the
new checkpoint valid. The previous checkpoint file is kept as a fallback in case the newest one
turns out to be damaged.
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from app_engine.errors import RunInputError
from app_engine.files import atomic_write_json, private_folder, sha256_file, sha256_hex, write_atomic

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "sha256_file"]

log = logging.getLogger(__name__)

RECORD = "checkpoint.json"
FOLDER = "checkpoints"
KEEP = 2


class CheckpointError(RunInputError):
    """A checkpoint that cannot be used (damaged, or written by a different run spec)."""


def save_checkpoint(out_dir: Path, megabatch: int, state: dict[str, Any], spec_fingerprint: str) -> Path:
    """Write the state after ``megabatch`` and commit it; returns the checkpoint file."""
    folder = out_dir / FOLDER
    private_folder(folder)
    path = folder / f"megabatch-{megabatch:04d}.pt"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    write_atomic(path, data)
    # Hashed from the bytes in hand: reading the file back would only repeat them.
    entry = {"megabatch": megabatch, "file": f"{FOLDER}/{path.name}", "sha256": sha256_hex(data), "bytes": len(data)}
    previous = [c for c in _read_record(out_dir).get("checkpoints", []) if c["megabatch"] < megabatch]
    kept = [*previous, entry][-KEEP:]
    atomic_write_json(out_dir / RECORD, {"spec_fingerprint": spec_fingerprint, "checkpoints": kept})
    names = {Path(c["file"]).name for c in kept}
    for old in folder.glob("megabatch-*.pt"):
        if old.name not in names:
            old.unlink(missing_ok=True)
    return path


def _read_record(out_dir: Path) -> dict[str, Any]:
    path = out_dir / RECORD
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint record ({exc})") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: not a checkpoint record (a JSON object is expected)")
    return record


def load_checkpoint(out_dir: Path, spec_fingerprint: str) -> dict[str, Any] | None:
    """The newest intact checkpoint of this run, or None when the folder has none.

    Every file is verified against the sha256 in the record before it is loaded; a damaged newest
    file falls back to the one before. Raises :class:`CheckpointError` when the folder belongs to
    a run with another spec or no recorded checkpoint is intact.
    """
    record = _read_record(out_dir)
    if not record:
        return None
    if record.get("spec_fingerprint") != spec_fingerprint:
        raise CheckpointError(
            f"{out_dir}: holds a run with a different spec (fingerprint {record.get('spec_fingerprint')}, "
            f"this run {spec_fingerprint}); use another output folder"
        )
    entries = record.get("checkpoints", [])
    if not isinstance(entries, list):
        raise CheckpointError(f"{out_dir / RECORD}: 'checkpoints' is not a list")
    problems: list[str] = []
    for entry in reversed(entries):
        try:
            return _load_entry(out_dir, entry)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("%s; trying the previous checkpoint", exc)
    raise CheckpointError(
        f"{out_dir / RECORD}: no recorded checkpoint is intact ({'; '.join(problems) or 'none recorded'})"
    )


def _load_entry(out_dir: Path, entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict) or not {"file", "sha256"} <= entry.keys():
        raise CheckpointError(f"{out_dir / RECORD}: malformed entry {entry!r}")
    path = out_dir / str(entry["file"])
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    data = path.read_bytes()  # once: hashed, then loaded from memory
    if sha256_hex(data) != entry["sha256"]:
        raise CheckpointError(f"{path}: sha256 does not match {RECORD} (damaged or changed after it was written)")
    return _load(path, data)


def _one_line(exc: BaseException) -> str:
    """The gist of a load error: torch's weights-only refusal is a paragraph of advice around one
    line that matters (``WeightsUnpickler error: Unsupported global: ...``)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    gist = found.group(1) if found else text
    gist = " ".join(gist.split())
    gist = gist.split(". ")[0]
    return f"{type(exc).__name__}: {gist[:200]}" if gist else type(exc).__name__


def _load(path: Path, data: bytes) -> dict[str, Any]:
    """Read one checkpoint file; any failure is one line naming the file (never torch's advice to
    unpickle arbitrary objects with ``weights_only=False``)."""
    try:
        # weights_only: tensors and plain containers only, never arbitrary objects.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and torch's own errors: the file is unusable either way
        raise CheckpointError(f"{path}: not a loadable checkpoint ({_one_line(exc)})") from None
    if not isinstance(state, dict) or not {"megabatch", "model", "masks", "rng", "metrics"} <= state.keys():
        raise CheckpointError(f"{path}: not a megabatch checkpoint (expected keys are missing)")
    return state
