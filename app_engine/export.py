"""Artifacts of a finished run: dense and sparse checkpoints, masks, report and a manifest.

Everything is written without pickle: tensors go into safetensors files, the rest into JSON.
``out_dir`` after :func:`export_artifacts`::

    model.safetensors          dense state dict, masks folded in (pruned weights are +0.0)
    masks.safetensors          one bool tensor per prunable parameter
    model.sparse.safetensors   the same state dict, pruned tensors as bitmask + non-zero values
    model.onnx                 only when asked for and the ``onnx`` package is installed
    report.png                 the anytime curves (see :mod:`app_engine.report`)
    manifest.json              spec, versions, model info, metrics, densities, sha256 of each file

The sparse file is an ordinary safetensors file, so any safetensors reader can open it; only its
layout is ours. A tensor worth compressing (floating point, not tiny, mostly zeros) is stored as

    <name>::bits    uint8 [ceil(numel / 8)]   bit i (little-endian within a byte) = element i != 0
    <name>::values  dtype [nnz]               the non-zero elements in flattened (row-major) order

and every other tensor under its own name, unchanged. The safetensors metadata entry
``anytime_prune.sparse`` records, per tensor and in state-dict order, its name, dtype, shape and
encoding, so :func:`load_sparse` rebuilds each tensor bit for bit (a stored -0.0 counts as zero and
comes back as +0.0; every non-zero value keeps its exact bits, NaN payloads included). On disk the
file costs about ``numel * (density * itemsize + 1/8)`` bytes per compressed tensor: at fp32 the
bitmask adds 1/32 of the dense size.

All files are written atomically (temporary file in the same folder, fsync, rename), so a reader
never sees half a file and a crash leaves the previous version in place.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import safetensors.torch
import torch
from torch import nn

from app_common.spec import JobSpec
from app_engine.models import create_model, prunable_parameters

logger = logging.getLogger(__name__)

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
MANIFEST_VERSION = 1

SPARSE_META_KEY = "anytime_prune.sparse"
SPARSE_FORMAT_VERSION = 1
# Separates a tensor name from its part in the sparse file; state-dict names use dots only.
PART_SEP = "::"
# Tensors smaller than this are stored whole: the saving would not pay for their header entry.
MIN_PACKED_NUMEL = 64
# Pack a tensor only when bitmask + values take at most this share of its dense bytes. At fp32
# that is density <= 0.9 - 1/32 ~ 0.87; at fp16 / bf16 density <= 0.9 - 1/16 ~ 0.84.
MAX_PACKED_SHARE = 0.9


# --- atomic files ---------------------------------------------------------------------------------


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The bytes go to a temporary file in the same folder (a rename is only atomic within one file
    system), are flushed and fsync'ed, and the temporary file then replaces ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates the file 0600; artifacts are meant to be read by others (API, downloads).
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a folder be opened for this.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- safetensors helpers --------------------------------------------------------------------------


def _to_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    # Cloning gives each tensor its own contiguous CPU storage: safetensors refuses tensors that
    # share memory (tied weights appear twice in a state dict) and views that are not contiguous.
    owned = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    return safetensors.torch.save(owned, metadata=dict(metadata) if metadata else None)


def _safetensors_metadata(data: bytes, source: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in ``data``.

    Layout: an 8-byte little-endian header length, then that many bytes of JSON header.
    """
    if len(data) < 8:
        raise ValueError(f"{source}: not a safetensors file (only {len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError(f"{source}: not a safetensors file (header of {size} bytes in a {len(data)}-byte file)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source}: unreadable safetensors header ({exc})") from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: safetensors metadata is not a mapping")
    return {str(k): str(v) for k, v in meta.items()}


def _load_safetensors(data: bytes, source: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError for bad files
        raise ValueError(f"{source}: unreadable safetensors file ({exc})") from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata stored in a safetensors file (``save_sparse``'s ``metadata`` included)."""
    path = Path(path)
    meta = _safetensors_metadata(path.read_bytes(), path.name)
    meta.pop(SPARSE_META_KEY, None)
    return meta


# --- sparse file ----------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _worth_packing(t: torch.Tensor, nnz: int) -> bool:
    if not t.is_floating_point() or t.numel() < MIN_PACKED_NUMEL:
        return False
    item = t.element_size()
    packed = math.ceil(t.numel() / 8) + nnz * item
    return packed <= MAX_PACKED_SHARE * t.numel() * item


def encode_sparse(
    state_dict: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None
) -> bytes:
    """The bytes of the sparse safetensors file for ``state_dict`` (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    for name, tensor in state_dict.items():
        if PART_SEP in name:
            raise ValueError(f"tensor name {name!r} contains {PART_SEP!r}, which the sparse format reserves")
        t = tensor.detach().to("cpu")
        entry: dict[str, Any] = {"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        flat = t.reshape(-1)
        # -0.0 == 0 is True, so negative zeros count as zeros and are dropped (restored as +0.0).
        keep = flat != 0 if t.is_floating_point() else None
        nnz = int(keep.sum()) if keep is not None else t.numel()
        if keep is not None and _worth_packing(t, nnz):
            bits = np.packbits(keep.numpy(), bitorder="little")  # uint8 [ceil(numel / 8)]
            tensors[f"{name}{PART_SEP}bits"] = torch.from_numpy(bits)
            tensors[f"{name}{PART_SEP}values"] = flat[keep]
            entry.update(encoding="bitmask", nnz=nnz)
        else:
            tensors[name] = t
            entry["encoding"] = "dense"
        entries.append(entry)
    meta = dict(metadata or {})
    if SPARSE_META_KEY in meta:
        raise ValueError(f"metadata key {SPARSE_META_KEY!r} is reserved for the sparse layout")
    meta[SPARSE_META_KEY] = json.dumps({"version": SPARSE_FORMAT_VERSION, "tensors": entries})
    return _to_safetensors(tensors, meta)


def decode_sparse(data: bytes, source: str = "sparse file") -> dict[str, torch.Tensor]:
    """Rebuild the state dict from the bytes of a sparse file; ``source`` names it in errors."""
    meta = _safetensors_metadata(data, source)
    if SPARSE_META_KEY not in meta:
        raise ValueError(f"{source}: not a sparse checkpoint (no {SPARSE_META_KEY!r} metadata)")
    try:
        layout = json.loads(meta[SPARSE_META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: unreadable sparse layout ({exc})") from None
    if not isinstance(layout, dict) or layout.get("version") != SPARSE_FORMAT_VERSION:
        raise ValueError(f"{source}: sparse format version {layout.get('version')!r} is not supported")
    stored = _load_safetensors(data, source)
    out: dict[str, torch.Tensor] = {}
    for entry in layout["tensors"]:
        try:
            out[entry["name"]] = _decode_entry(entry, stored)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: tensor {entry.get('name')!r}: {exc}") from None
    return out


def _decode_entry(entry: Mapping[str, Any], stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
    name, shape = entry["name"], tuple(int(s) for s in entry["shape"])
    dtype = getattr(torch, entry["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {entry['dtype']!r}")
    numel = math.prod(shape)
    if entry["encoding"] == "dense":
        t = stored[name]
    elif entry["encoding"] == "bitmask":
        bits = stored[f"{name}{PART_SEP}bits"].numpy()
        if bits.size != math.ceil(numel / 8):
            raise ValueError(f"bitmask of {bits.size} bytes for {numel} elements")
        keep = torch.from_numpy(np.unpackbits(bits, count=numel, bitorder="little").astype(bool))
        values = stored[f"{name}{PART_SEP}values"]
        if values.numel() != int(keep.sum()) or values.dtype != dtype:
            raise ValueError("bitmask and values do not agree")
        t = torch.zeros(numel, dtype=dtype)
        t[keep] = values
    else:
        raise ValueError(f"unknown encoding {entry['encoding']!r}")
    if t.dtype != dtype or t.numel() != numel:
        raise ValueError("stored tensor does not match its recorded dtype and shape")
    return t.reshape(shape)


def save_sparse(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write ``state_dict`` as a sparse safetensors file (atomically); returns its size in bytes.

    ``metadata`` (string keys and values) is kept in the file; read it back with
    :func:`read_metadata`.
    """
    data = encode_sparse(state_dict, metadata=metadata)
    write_atomic(path, data)
    return len(data)


def load_sparse(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_sparse`; every tensor comes back with its dtype and shape."""
    path = Path(path)
    return decode_sparse(path.read_bytes(), path.name)


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
    import app_engine

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
    """The folded model as ONNX, exported with a float input ``[batch, *input_shape]`` in 0..1."""
    export_model = copy.deepcopy(model).to("cpu")
    export_model.load_state_dict(dict(folded))
    export_model.eval()
    dummy = torch.zeros(1, *input_shape)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / ONNX_FILE
        # The exporters warn about their own future; those warnings are not about this run.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                export_model,
                (dummy,),
                str(target),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        return target.read_bytes()


def _json_default(obj: Any) -> Any:
    # Metrics may carry numpy or torch scalars / arrays.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


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
    out.mkdir(parents=True, exist_ok=True)
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
        put(MODEL_FILE, _to_safetensors(folded, {"model_info": info_json, "format": "dense"}))
    put(MASKS_FILE, _to_safetensors({n: m.to(torch.bool) for n, m in masks.items()}, {"model_info": info_json}))
    if "sparse" in wanted:
        put(SPARSE_FILE, encode_sparse(folded, metadata={"model_info": info_json}))
    if "onnx" in wanted:
        if importlib.util.find_spec("onnx") is None:
            reason = "the 'onnx' package is not installed"
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
        "manifest_version": MANIFEST_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "engine": {"name": "anytime-prune", "version": engine_version()},
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "spec": spec.to_dict(),
        "spec_fingerprint": spec.fingerprint(),
        "model_info": info,
        "metrics": dict(metrics),
        "density": density,
        "parameters": counts,
        "files": [{"name": n, **{k: v for k, v in e.items() if k != "path"}} for n, e in written.items()],
        "skipped": skipped,
    }
    put(MANIFEST_FILE, json.dumps(manifest, indent=2, default=_json_default).encode())
    return written


# --- load -----------------------------------------------------------------------------------------


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
    out_dir: str | os.PathLike[str], *, source: Literal["sparse", "safetensors"] = "sparse"
) -> nn.Module:
    """Rebuild the exported model from ``out_dir``, in eval mode, on the CPU.

    ``source`` picks the file: ``sparse`` (model.sparse.safetensors) or ``safetensors``
    (model.safetensors); both give the same weights bit for bit. The file's sha256 is checked
    against manifest.json first; a mismatch raises ``ValueError`` naming the file.
    """
    if source not in SOURCE_FILES:
        raise ValueError(f"source must be one of {', '.join(SOURCE_FILES)}, got {source!r}")
    manifest = read_manifest(out_dir)
    name = SOURCE_FILES[source]
    data = read_verified(out_dir, name, manifest)
    state = decode_sparse(data, name) if source == "sparse" else _load_safetensors(data, name)
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
