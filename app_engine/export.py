"""Artifacts of a finished run: dense and sparse checkpoints, masks, report and a manifest.

Everything is written without pickle: tensors go into safetensors files, the rest into JSON.
``out_dir`` after :func:`export_artifacts`::

    model.safetensors          dense state dict, masks folded in (pruned weights are +0.0)
    masks.safetensors          one packed-bit mask per prunable parameter (see app_engine.sparse)
    model.sparse.safetensors   the same state dict, pruned tensors as bitmask + non-zero values
    model.onnx                 only when asked for and the ``onnx`` extra is installed: one file,
                               weights inside, checked under ONNX Runtime (app_engine.onnx_export)
    report.png                 the anytime curves (see :mod:`app_engine.report`)
    manifest.json              spec, versions, model info, metrics, densities, sha256 of each file

The file formats are in :mod:`app_engine.sparse`, reading them back in :mod:`app_engine.loading`
(``load_model`` is re-exported here), atomic writing in :mod:`app_engine.files`.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import os
import platform
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import app_engine
from app_common.spec import JobSpec
from app_engine import onnx_export
from app_engine.files import private_folder, sha256_hex, write_atomic
from app_engine.loading import (
    FILE_FORMATS,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    MASKS_FILE,
    MODEL_FILE,
    MODEL_INFO_KEYS,
    ONNX_FILE,
    REPORT_FILE,
    SOURCE_FILES,
    SPARSE_FILE,
    load_model,
    load_run_masks,
    read_manifest,
    read_verified,
)
from app_engine.models import prunable_parameters
from app_engine.sparse import (
    SPARSE_META_KEY,
    encode_masks,
    encode_sparse,
    load_masks,
    load_sparse,
    read_metadata,
    save_sparse,
    to_safetensors,
)

__all__ = [
    "FILE_FORMATS",
    "MANIFEST_FILE",
    "MANIFEST_VERSION",
    "MASKS_FILE",
    "MODEL_FILE",
    "ONNX_FILE",
    "REPORT_FILE",
    "SOURCE_FILES",
    "SPARSE_FILE",
    "SPARSE_META_KEY",
    "engine_version",
    "export_artifacts",
    "fold_masks",
    "load_masks",
    "load_model",
    "load_run_masks",
    "load_sparse",
    "read_manifest",
    "read_metadata",
    "read_verified",
    "save_sparse",
]

logger = logging.getLogger(__name__)


# --- export ---------------------------------------------------------------------------------------


def fold_masks(
    state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with every masked weight set to +0.0.

    ``torch.where`` rather than ``w * mask``: a product turns negative pruned weights into -0.0.
    Zeros that are already there (-0.0 left by an earlier ``mul_`` with the mask) become +0.0 as
    well, so a masked tensor holds no signed zeros and the dense and sparse files agree bit for bit.
    """
    out = {name: t.detach().to("cpu").clone() for name, t in state_dict.items()}
    for name, mask in masks.items():
        if name not in out:
            raise ValueError(f"mask {name!r} names no tensor of the model")
        if tuple(mask.shape) != tuple(out[name].shape):
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, the weight {tuple(out[name].shape)}")
        w = out[name]
        keep = mask.to(device="cpu", dtype=torch.bool) & (w != 0)
        out[name] = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
    return out


def engine_version() -> str:
    version = getattr(app_engine, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version("anytime-prune")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _check_model_info(model_info: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in MODEL_INFO_KEYS if k not in model_info]
    if missing:
        raise ValueError(f"model_info lacks {', '.join(missing)}")
    info = dict(model_info)
    for key in ("input_shape", "mean", "std", "classes"):
        info[key] = list(info[key])
    info["input_shape"] = [int(s) for s in info["input_shape"]]
    info["mean"] = [float(m) for m in info["mean"]]
    info["std"] = [float(s) for s in info["std"]]
    info["classes"] = [str(c) for c in info["classes"]]
    info["num_classes"] = int(info["num_classes"])
    info["architecture"] = str(info["architecture"])
    return info


def _density_summary(
    model: nn.Module, masks: Mapping[str, torch.Tensor], folded: Mapping[str, torch.Tensor], spec: JobSpec
) -> tuple[dict[str, Any], dict[str, int]]:
    """Target and measured density (from the masks) and the parameter counts.

    A prunable parameter without a mask counts as dense. Non-zero counts are taken from the folded
    weights, so they also see weights that training drove to exactly zero.
    """
    prunable = list(prunable_parameters(model))
    names = prunable + [n for n in masks if n not in prunable]
    per_layer: dict[str, dict[str, float | int]] = {}
    kept_total = numel_total = 0
    for name in names:
        numel = folded[name].numel()
        kept = int(masks[name].sum()) if name in masks else numel
        per_layer[name] = {"density": kept / numel if numel else 1.0, "kept": kept, "numel": numel}
        kept_total += kept
        numel_total += numel
    target = 1.0 if spec.method == "dense" else spec.sparsity.target_density
    density = {
        "target": target,
        "measured": kept_total / numel_total if numel_total else 1.0,
        "kept": kept_total,
        "prunable": numel_total,
        "per_layer": per_layer,
    }
    param_names = [n for n, _ in model.named_parameters()]
    counts = {
        "total": sum(folded[n].numel() for n in param_names),
        "prunable": numel_total,
        "nonzero": sum(int(torch.count_nonzero(folded[n])) for n in param_names),
        "nonzero_prunable": sum(int(torch.count_nonzero(folded[n])) for n in names),
    }
    return density, counts


def _onnx_bytes(model: nn.Module, folded: Mapping[str, torch.Tensor], input_shape: list[int]) -> bytes:
    """The folded model as one self-contained ONNX file, checked under ONNX Runtime (see
    :mod:`app_engine.onnx_export`): float input ``[batch, *input_shape]`` in 0..1, ``logits`` out."""
    export_model = copy.deepcopy(model).to("cpu")
    export_model.load_state_dict(dict(folded))
    export_model.eval()
    return onnx_export.onnx_bytes(export_model, input_shape)


# Measured, not reproduced: kept out of the hashed manifest (result.json still has them), so that
# two runs of one spec write identical files and the checksums prove it.
TIMING_KEYS = frozenset({"wall_time_s", "train_time_s", "images_per_s"})


def without_timings(value: Any) -> Any:
    """``value`` (the run's metrics) without the timing entries, at any depth."""
    if isinstance(value, Mapping):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list | tuple):
        return [without_timings(v) for v in value]
    return value


def _json_default(obj: Any) -> Any:
    # Metrics may carry numpy or torch scalars / arrays.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def manifest_header(spec: JobSpec, model_info: Mapping[str, Any]) -> dict[str, Any]:
    """The fields every manifest starts with: what wrote it, with which spec, for which model."""
    return {
        "manifest_version": MANIFEST_VERSION,
        "engine": {"name": "anytime-prune", "version": engine_version()},
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "spec": spec.to_dict(),
        "spec_fingerprint": spec.fingerprint(),
        "model_info": dict(model_info),
    }


def export_artifacts(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    spec: JobSpec,
    model_info: Mapping[str, Any],
    metrics: Mapping[str, Any],
    formats: Iterable[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write the artifacts of a run into ``out_dir`` and return name -> {path, format, bytes, sha256}.

    ``masks`` maps parameter names to bool tensors (``Masks`` holds such a dict); they are folded
    into the exported weights, the model itself is left untouched. ``model_info`` holds
    ``architecture``, ``input_shape``, ``num_classes``, ``mean``, ``std``, ``classes``: all
    :func:`load_model` needs to rebuild the model. ``metrics`` is the run's result dict; its
    ``megabatches`` list feeds the report. ``formats`` defaults to ``spec.export.formats``:
    "safetensors" writes model.safetensors, "sparse" model.sparse.safetensors, "onnx" model.onnx
    (skipped with a warning, and recorded in the manifest, where it cannot be produced). The masks,
    the report and the manifest are always written.
    """
    from app_engine import report  # matplotlib is only needed here, not to load a model

    out = Path(out_dir)
    private_folder(out)
    wanted = list(spec.export.formats if formats is None else formats)
    unknown = [f for f in wanted if f not in ("safetensors", "sparse", "onnx")]
    if unknown:
        raise ValueError(f"unknown export formats: {', '.join(unknown)}")
    info = _check_model_info(model_info)
    info_json = json.dumps(info)
    folded = fold_masks(model.state_dict(), masks)
    written: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, str]] = []

    def put(name: str, data: bytes) -> None:
        path = out / name
        write_atomic(path, data)
        written[name] = {
            "path": str(path),
            "format": FILE_FORMATS[name],
            "bytes": len(data),
            "sha256": sha256_hex(data),
        }
        logger.info("wrote %s (%d bytes)", path, len(data))

    if "safetensors" in wanted:
        put(MODEL_FILE, to_safetensors(folded, {"model_info": info_json, "format": "dense"}))
    put(MASKS_FILE, encode_masks(masks, metadata={"model_info": info_json}))
    if "sparse" in wanted:
        put(SPARSE_FILE, encode_sparse(folded, metadata={"model_info": info_json}))
    if "onnx" in wanted:
        missing = onnx_export.missing_packages()
        if missing:
            reason = f"the 'onnx' extra is not installed (missing {', '.join(missing)})"
            logger.warning("skipping %s: %s", ONNX_FILE, reason)
            skipped.append({"name": ONNX_FILE, "format": "onnx", "reason": reason})
        else:
            try:
                put(ONNX_FILE, _onnx_bytes(model, folded, info["input_shape"]))
            except Exception as exc:  # an exporter failure must not lose the other artifacts
                reason = f"export failed: {type(exc).__name__}: {exc}"
                logger.warning("skipping %s: %s", ONNX_FILE, reason)
                skipped.append({"name": ONNX_FILE, "format": "onnx", "reason": reason})

    title = f"{info['architecture']} / {spec.method} / {spec.dataset.name}"
    put(REPORT_FILE, report.render_run(list(metrics.get("megabatches", [])), title=title))

    density, counts = _density_summary(model, masks, folded, spec)
    manifest = {
        **manifest_header(spec, info),
        "metrics": without_timings(metrics),
        "density": density,
        "parameters": counts,
        "files": [{"name": n, **{k: v for k, v in e.items() if k != "path"}} for n, e in written.items()],
        "skipped": skipped,
    }
    put(MANIFEST_FILE, json.dumps(manifest, indent=2, default=_json_default).encode())
    return written
