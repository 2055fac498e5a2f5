"""The checkpoint module: atomic commit, sha256 check, fallback, spec refusal, one-line errors."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from app_engine.checkpoint import FOLDER, KEEP, RECORD, CheckpointError, load_checkpoint, save_checkpoint, sha256_file
from app_engine.errors import RunInputError

FP = "0123456789abcdef"


def state(megabatch: int) -> dict[str, Any]:
    return {
        "megabatch": megabatch,
        "model": {"w": torch.full((3, 2), float(megabatch))},
        "optimizer": None,
        "masks": {"w": torch.ones(3, 2, dtype=torch.bool)},
        "rng": {"torch": torch.get_rng_state()},
        "metrics": json.dumps([{"index": t} for t in range(1, megabatch + 1)]),
    }


class Payload:
    """Any class outside torch's weights-only allow-list."""


def record(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / RECORD).read_text())
    return data


def test_empty_folder_has_no_checkpoint(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path, FP) is None


def test_save_commits_and_load_returns_the_newest(tmp_path: Path) -> None:
    for t in (1, 2, 3):
        path = save_checkpoint(tmp_path, t, state(t), FP)
        assert path == tmp_path / FOLDER / f"megabatch-{t:04d}.pt"
    rec = record(tmp_path)
    assert rec["spec_fingerprint"] == FP
    assert [c["megabatch"] for c in rec["checkpoints"]] == [2, 3][-KEEP:]
    for c in rec["checkpoints"]:
        assert sha256_file(tmp_path / c["file"]) == c["sha256"]
        assert (tmp_path / c["file"]).stat().st_size == c["bytes"]
    # Only the recorded files remain, and no temporary file is left behind.
    assert sorted(p.name for p in (tmp_path / FOLDER).iterdir()) == ["megabatch-0002.pt", "megabatch-0003.pt"]
    assert not [p for p in tmp_path.rglob("*.tmp")]
    loaded = load_checkpoint(tmp_path, FP)
    assert loaded is not None and loaded["megabatch"] == 3
    assert torch.equal(loaded["model"]["w"], torch.full((3, 2), 3.0))


def test_another_spec_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, state(1), FP)
    with pytest.raises(CheckpointError, match="different spec") as info:
        load_checkpoint(tmp_path, "fedcba9876543210")
    assert isinstance(info.value, RunInputError)


def test_checksum_mismatch_falls_back_to_the_previous_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_checkpoint(tmp_path, 1, state(1), FP)
    newest = save_checkpoint(tmp_path, 2, state(2), FP)
    blob = bytearray(newest.read_bytes())
    blob[-10] ^= 0xFF
    newest.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="app_engine.checkpoint"):
        loaded = load_checkpoint(tmp_path, FP)
    assert loaded is not None and loaded["megabatch"] == 1
    assert "sha256 does not match" in caplog.text and "megabatch-0002.pt" in caplog.text


def test_tampered_file_with_a_matching_record_fails_in_one_line(tmp_path: Path) -> None:
    """A file whose sha256 was updated with it (so the check passes) but that holds a pickled
    object: torch refuses it, and the error names the file in one line instead of torch's advice."""
    save_checkpoint(tmp_path, 1, state(1), FP)

    buffer = io.BytesIO()
    torch.save({**state(1), "extra": Payload()}, buffer)
    path = tmp_path / FOLDER / "megabatch-0001.pt"
    path.write_bytes(buffer.getvalue())
    rec = record(tmp_path)
    rec["checkpoints"][0]["sha256"] = sha256_file(path)
    (tmp_path / RECORD).write_text(json.dumps(rec))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, FP)
    message = str(info.value)
    assert "\n" not in message
    assert "megabatch-0001.pt" in message and "not a loadable checkpoint" in message
    assert "Unsupported global" in message
    assert "weights_only` set to `False`" not in message


def test_unloadable_newest_falls_back(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, state(1), FP)
    newest = save_checkpoint(tmp_path, 2, state(2), FP)
    newest.write_bytes(b"not a zip file at all" * 4)
    rec = record(tmp_path)
    rec["checkpoints"][-1]["sha256"] = sha256_file(newest)
    (tmp_path / RECORD).write_text(json.dumps(rec))
    loaded = load_checkpoint(tmp_path, FP)
    assert loaded is not None and loaded["megabatch"] == 1


def test_no_intact_checkpoint_and_unreadable_record(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, state(1), FP)
    path.unlink()
    with pytest.raises(CheckpointError, match="no recorded checkpoint is intact"):
        load_checkpoint(tmp_path, FP)
    (tmp_path / RECORD).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable checkpoint record"):
        load_checkpoint(tmp_path, FP)
