"""The model kept after each megabatch (``export.keep_every_megabatch``, on by default).

After megabatch ``t`` the runner writes, inside the run folder::

    megabatch-000t/model.sparse.safetensors   the sparse model, masks folded in (app_engine.sparse)
    megabatch-000t/manifest.json              model info, that megabatch's metrics, density, sha256

The folder is a small run folder of its own: ``load_model(run_dir / "megabatch-0003")`` (or
``load_model(run_dir, megabatch=3)``) rebuilds the model, checked against its manifest. The
service spells the same names in :mod:`app_common.megabatch_models` (a test checks they agree).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app_common.events import MegabatchMetrics
from app_common.spec import JobSpec
from app_engine.export import (
    _check_model_info,
    _density_summary,
    _json_default,
    fold_masks,
    manifest_header,
    without_timings,
)
from app_engine.files import private_folder, sha256_hex, write_atomic
from app_engine.loading import FILE_FORMATS, MANIFEST_FILE, SPARSE_FILE, megabatch_folder
from app_engine.sparse import encode_sparse


def export_megabatch_model(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    record: MegabatchMetrics,
    spec: JobSpec,
    model_info: Mapping[str, Any],
) -> dict[str, Any]:
    """Write megabatch ``record.index``'s model and manifest under ``out_dir``; returns its entry:
    ``{index, density, target_density, test_accuracy, name, bytes, sha256, files}`` with ``name``
    the model file and ``files`` both files (``{name, format, bytes, sha256}``), names relative to
    ``out_dir`` (the shape of :class:`app_common.megabatch_models.MegabatchModel`)."""
    folder_name = megabatch_folder(record.index)
    folder = private_folder(Path(out_dir) / folder_name)
    info = _check_model_info(model_info)
    folded = fold_masks(model.state_dict(), masks)
    data = encode_sparse(folded, metadata={"model_info": json.dumps(info)})
    write_atomic(folder / SPARSE_FILE, data)
    model_file = {"name": SPARSE_FILE, "format": FILE_FORMATS[SPARSE_FILE], "bytes": len(data),
                  "sha256": sha256_hex(data)}

    density, counts = _density_summary(model, masks, folded, spec)
    density["target"] = record.target_density  # the schedule's, at this megabatch
    manifest = {
        **manifest_header(spec, info),
        "megabatch": record.index,
        "metrics": without_timings(record.to_dict()),
        "density": density,
        "parameters": counts,
        "files": [model_file],
        "skipped": [],
    }
    raw = json.dumps(manifest, indent=2, default=_json_default).encode()
    write_atomic(folder / MANIFEST_FILE, raw)
    manifest_file = {"name": MANIFEST_FILE, "format": FILE_FORMATS[MANIFEST_FILE], "bytes": len(raw),
                     "sha256": sha256_hex(raw)}
    files = [{**f, "name": f"{folder_name}/{f['name']}"} for f in (model_file, manifest_file)]
    return {
        "index": record.index,
        "density": record.density,
        "target_density": record.target_density,
        "test_accuracy": record.test_accuracy,
        "name": files[0]["name"],
        "bytes": model_file["bytes"],
        "sha256": model_file["sha256"],
        "files": files,
    }
