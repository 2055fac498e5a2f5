"""A failed job's error names no absolute server path (issue 11, item 6)."""

from __future__ import annotations

from pathlib import Path

from app_common.settings import Settings
from worker.job import public_reason


def test_public_reason_hides_server_folders(tmp_path: Path) -> None:
    settings = Settings(redis_url="redis://unused", data_dir=tmp_path / "data", artifacts_dir=tmp_path / "art",
                        cache_dir=tmp_path / "cache")
    data = (tmp_path / "data").resolve()
    assert public_reason(f"no such file: {data}/cifar/train.npz", settings) == "no such file: cifar/train.npz"
    assert public_reason(f"FileNotFoundError: '{tmp_path}/art/abc/ckpt.pt'", settings) == (
        "FileNotFoundError: '<work>/abc/ckpt.pt'"
    )
    message = public_reason("OSError: [Errno 28] No space left: '/var/lib/x/y.bin' (see http://h/a/b)", settings)
    assert message == "OSError: [Errno 28] No space left: '<server>/y.bin' (see http://h/a/b)"
    assert public_reason("training.epochs: at most 20", settings) == "training.epochs: at most 20"
    assert public_reason("a/b/c relative stays", settings) == "a/b/c relative stays"
