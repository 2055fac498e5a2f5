"""app_engine.files: atomic, private writes (issue 11, item 6: nothing world-readable)."""

from __future__ import annotations

import stat
from pathlib import Path

from app_common.spec import JobSpec
from app_engine.files import atomic_write_json, private_folder, sha256_file, write_atomic
from app_engine.runner import run


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_replaces_whole_files_privately(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    write_atomic(target, b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]  # no temporary left behind
    atomic_write_json(tmp_path / "a.json", {"k": 1})
    assert (tmp_path / "a.json").read_text() == '{\n  "k": 1\n}\n'
    assert sha256_file(target) == "11507a0e2f5e69d5dfa40a62a1bd7b6ee57e6bcd85c67c9b8431b36fff21c437"


def test_private_folder(tmp_path: Path) -> None:
    folder = private_folder(tmp_path / "a" / "b")
    assert folder.is_dir() and mode(folder) == 0o700


def test_a_run_leaves_nothing_world_readable(tmp_path: Path) -> None:
    spec = JobSpec.from_dict({"dataset": {"name": "digits"}, "architecture": "mlp", "stream": {"megabatches": 2},
                              "sparsity": {"target": 0.5}, "training": {"epochs": 1, "precision": "fp32"}})
    out = tmp_path / "run"
    run(spec, out)
    paths = [out, *out.rglob("*")]
    assert len(paths) > 6
    loose = {str(p.relative_to(tmp_path)): oct(mode(p)) for p in paths if mode(p) & 0o077}
    assert not loose
