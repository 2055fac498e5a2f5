"""Reading a run's artifacts back: the manifest, checksum-verified files, the model and the masks.

The file names of a run folder live here (the export writes them, the loader and the API read them).
Every artifact read through :func:`read_verified` is checked against the size and sha256 that
``manifest.json`` records, so a damaged or replaced file is refused with its name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from app_engine.files import sha256_hex
from app_engine.models import create_model
from app_engine.sparse import decode_masks, decode_sparse, load_safetensors

MODEL_FILE = "model.safetensors"
MASKS_FILE = "masks.safetensors"
SPARSE_FILE = "model.sparse.safetensors"
ONNX_FILE = "model.onnx"
REPORT_FILE = "report.png"
MANIFEST_FILE = "manifest.json"

# The ``format`` each artifact is listed under (manifest, API artifact listing).
FILE_FORMATS = {
    MODEL_FILE: "safetensors",
    MASKS_FILE: "masks",
    SPARSE_FILE: "sparse",
    ONNX_FILE: "onnx",
    REPORT_FILE: "png",
    MANIFEST_FILE: "json",
}
# load_model(source=...) -> the file it reads.
SOURCE_FILES = {"sparse": SPARSE_FILE, "safetensors": MODEL_FILE}
MODEL_INFO_KEYS = ("architecture", "input_shape", "num_classes", "mean", "std", "classes")
# The model kept after each megabatch lives in its own folder (app_engine.megabatch_export), named
# like the checkpoints; the service spells the same names in app_common.megabatch_models.
MEGABATCH_FOLDER_PREFIX = "megabatch-"


def megabatch_folder(index: int) -> str:
    """``megabatch-0003``: the folder of megabatch 3's kept model, inside the run folder."""
    if index < 1:
        raise ValueError(f"megabatch must be at least 1, got {index}")
    return f"{MEGABATCH_FOLDER_PREFIX}{index:04d}"
MANIFEST_VERSION = 1


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{MANIFEST_FILE}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or "files" not in manifest or "model_info" not in manifest:
        raise ValueError(f"{MANIFEST_FILE}: not an anytime-prune manifest")
    return manifest


def read_verified(out_dir: str | os.PathLike[str], name: str, manifest: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of artifact ``name``, after checking size and sha256 against the manifest.

    Raises ``ValueError`` naming the file when it is not in the manifest or its bytes differ.
    """
    manifest = read_manifest(out_dir) if manifest is None else manifest
    entry = next((f for f in manifest["files"] if f.get("name") == name), None)
    if entry is None:
        raise ValueError(f"{name}: not listed in {MANIFEST_FILE} (was its format exported?)")
    data = (Path(out_dir) / name).read_bytes()
    digest = sha256_hex(data)
    if len(data) != entry["bytes"] or digest != entry["sha256"]:
        raise ValueError(
            f"{name}: contents do not match {MANIFEST_FILE} "
            f"(sha256 {digest[:12]}..., {len(data)} bytes; expected {entry['sha256'][:12]}..., {entry['bytes']} bytes)"
        )
    return data


def load_model(
    out_dir: str | os.PathLike[str],
    *,
    source: Literal["sparse", "safetensors"] = "sparse",
    megabatch: int | None = None,
) -> nn.Module:
    """Rebuild the exported model from ``out_dir``, in eval mode, on the CPU.

    ``source`` picks the file: ``sparse`` (model.sparse.safetensors) or ``safetensors``
    (model.safetensors); both give the same weights bit for bit. The file's sha256 is checked
    against manifest.json first; a mismatch raises ``ValueError`` naming the file.

    ``megabatch`` loads the model kept after that megabatch instead of the final one: the folder
    ``out_dir/megabatch-0003`` for 3 (``export.keep_every_megabatch``; only its sparse file is
    kept). Such a folder, or one downloaded from the service, can also be given as ``out_dir``.
    """
    if source not in SOURCE_FILES:
        raise ValueError(f"source must be one of {', '.join(SOURCE_FILES)}, got {source!r}")
    if megabatch is not None:
        folder = Path(out_dir) / megabatch_folder(megabatch)
        if not (folder / MANIFEST_FILE).is_file():
            kept = sorted(p.parent.name for p in Path(out_dir).glob(f"{MEGABATCH_FOLDER_PREFIX}*/{MANIFEST_FILE}"))
            raise FileNotFoundError(
                f"{folder}: no model kept for megabatch {megabatch} "
                f"(kept: {', '.join(kept) or 'none'}; was export.keep_every_megabatch off?)"
            )
        out_dir = folder
    manifest = read_manifest(out_dir)
    name = SOURCE_FILES[source]
    data = read_verified(out_dir, name, manifest)
    state = decode_sparse(data, name) if source == "sparse" else load_safetensors(data, name)
    info = manifest["model_info"]
    model = create_model(
        info["architecture"],
        input_shape=tuple(info["input_shape"]),
        num_classes=int(info["num_classes"]),
        mean=tuple(info["mean"]),
        std=tuple(info["std"]),
    )
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_run_masks(out_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The boolean masks of an exported run (checked against the manifest): name -> bool tensor."""
    return decode_masks(read_verified(out_dir, MASKS_FILE), MASKS_FILE)
