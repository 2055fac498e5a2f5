"""app_common/paths.py: the dataset path policy the API and the worker share."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from app_common.paths import DataPathError, resolve_data_path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "cifar").mkdir(parents=True)
    (root / "cifar" / "train.npz").write_bytes(b"x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.npz").write_bytes(b"secret")
    return root


def test_files_and_folders_inside_are_accepted(data: Path) -> None:
    assert resolve_data_path(data, "cifar/train.npz") == (data / "cifar" / "train.npz").resolve()
    assert resolve_data_path(data, "cifar") == (data / "cifar").resolve()
    # A symlink that stays inside the folder is followed.
    (data / "alias").symlink_to(data / "cifar")
    assert resolve_data_path(data, "alias/train.npz") == (data / "cifar" / "train.npz").resolve()


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/etc/passwd", "must be relative"),
        ("C:\\data\\x.npz", "must be relative"),
        ("~/x.npz", "must be relative"),
        ("../outside/secret.npz", "must not contain '..'"),
        ("cifar/../../outside/secret.npz", "must not contain '..'"),
        ("nul\x00byte", "NUL"),
        ("missing.npz", "does not exist"),
    ],
)
def test_refused_paths(data: Path, path: str, reason: str) -> None:
    with pytest.raises(DataPathError, match=reason):
        resolve_data_path(data, path)


def test_symlink_escaping_the_folder_is_refused(data: Path, tmp_path: Path) -> None:
    (data / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(DataPathError, match="leads outside"):
        resolve_data_path(data, "link/secret.npz")


def test_symlink_loop_is_refused(data: Path) -> None:
    (data / "loop").symlink_to(data / "loop")
    with pytest.raises(DataPathError):
        resolve_data_path(data, "loop")


def test_fifo_and_socket_are_refused(data: Path) -> None:
    os.mkfifo(data / "pipe")
    with pytest.raises(DataPathError, match="not a regular file or folder"):
        resolve_data_path(data, "pipe")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(data / "sock"))
        with pytest.raises(DataPathError, match="not a regular file or folder"):
            resolve_data_path(data, "sock")


def test_devices_are_refused(data: Path) -> None:
    (data / "null").symlink_to("/dev/null")  # leaves the folder: refused before its type matters
    with pytest.raises(DataPathError):
        resolve_data_path(data, "null")


def test_the_error_is_a_value_error() -> None:
    assert issubclass(DataPathError, ValueError)
