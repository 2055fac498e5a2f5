"""The sparse checkpoint format and packed masks: ordinary safetensors files with our layout.

Any safetensors reader can open these files; only their layout is ours.

**Sparse state dict** (``model.sparse.safetensors``, format version 2). A tensor worth compressing
(floating point, not tiny, mostly zeros) is *packed*: a bitmask of its non-zeros plus the non-zero
values; every other tensor is stored whole. To keep the JSON header small, tensors are concatenated
into a few stored tensors instead of one or two header entries each::

    bits            uint8 [sum ceil(numel / 8)]  the packed tensors' bitmasks, in state-dict order;
                                                 bit i (little-endian within a byte) = element i != 0
    values.<dtype>  dtype [sum nnz]              their non-zero elements (row-major), per dtype
    dense.<dtype>   dtype [sum numel]            the other tensors, flattened, per dtype

The metadata entry ``anytime_prune.sparse`` is ``{"v": 2, "t": [[name, dtype, shape, nnz], ...]}``
in state-dict order, ``nnz = -1`` meaning "stored whole"; each tensor's slice of the stored tensors
follows from the sizes of the entries before it. :func:`decode_sparse` rebuilds every tensor bit
for bit (a stored -0.0 counts as zero and comes back as +0.0; every non-zero value keeps its exact
bits, NaN payloads included). It also reads version 1 files (one entry per tensor,
``<name>::bits`` / ``<name>::values`` parts). On disk a packed tensor costs about
``numel * (density * itemsize + 1/8)`` bytes: at fp32 the bitmask adds 1/32 of the dense size.

**Masks** (``masks.safetensors``): each boolean mask as ``uint8 [ceil(numel / 8)]`` packed bits
under its parameter name, the shapes in the metadata entry ``anytime_prune.masks``
(``{"v": 1, "shapes": {name: shape}}``); :func:`decode_masks` returns boolean tensors. An eighth of
the one-byte-per-weight bool tensors.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from app_engine.files import write_atomic

SPARSE_META_KEY = "anytime_prune.sparse"
MASKS_META_KEY = "anytime_prune.masks"
SPARSE_FORMAT_VERSION = 2
MASKS_FORMAT_VERSION = 1
# Version 1 separated a tensor name from its part; read-only support.
PART_SEP = "::"
# Tensors smaller than this are stored whole: packing would not pay for the bookkeeping.
MIN_PACKED_NUMEL = 64
# Pack a tensor only when bitmask + values take at most this share of its dense bytes. At fp32
# that is density <= 0.9 - 1/32 ~ 0.87; at fp16 / bf16 density <= 0.9 - 1/16 ~ 0.84.
MAX_PACKED_SHARE = 0.9
STORED_DENSE = -1


# --- safetensors helpers --------------------------------------------------------------------------


def to_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    # Cloning gives each tensor its own contiguous CPU storage: safetensors refuses tensors that
    # share memory (tied weights appear twice in a state dict) and views that are not contiguous.
    owned = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    return canonical_header(safetensors.torch.save(owned, metadata=dict(metadata) if metadata else None))


def canonical_header(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header written in one fixed order.

    safetensors writes ``__metadata__`` from a Rust hash map, whose order changes from one call to
    the next, so equal tensors and metadata gave files with different sha256. The header is
    rewritten with sorted keys and padded with spaces to a multiple of 8 bytes (as safetensors
    aligns it); tensor offsets count from the end of the header, so the data is unchanged.
    """
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def safetensors_metadata(data: bytes, source: str) -> dict[str, str]:
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


def load_safetensors(data: bytes, source: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError for bad files
        raise ValueError(f"{source}: unreadable safetensors file ({exc})") from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata stored in a safetensors file (``save_sparse``'s ``metadata`` included),
    without the layout entries of this module."""
    path = Path(path)
    meta = safetensors_metadata(path.read_bytes(), path.name)
    meta.pop(SPARSE_META_KEY, None)
    meta.pop(MASKS_META_KEY, None)
    return meta


def _reserve(metadata: Mapping[str, str] | None, key: str) -> dict[str, str]:
    meta = dict(metadata or {})
    if key in meta:
        raise ValueError(f"metadata key {key!r} is reserved for the file's layout")
    return meta


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """bool ``[numel]`` -> uint8 ``[ceil(numel / 8)]``, bit i little-endian within its byte."""
    return torch.from_numpy(np.packbits(keep.reshape(-1).numpy(), bitorder="little"))


def _unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    if bits.dtype != torch.uint8 or bits.numel() != math.ceil(numel / 8):
        raise ValueError(f"bitmask of {bits.numel()} {bits.dtype} elements for {numel} elements")
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=numel, bitorder="little").astype(bool))


# --- sparse state dict ----------------------------------------------------------------------------


def _worth_packing(t: torch.Tensor, nnz: int) -> bool:
    if not t.is_floating_point() or t.numel() < MIN_PACKED_NUMEL:
        return False
    item = t.element_size()
    packed = math.ceil(t.numel() / 8) + nnz * item
    return packed <= MAX_PACKED_SHARE * t.numel() * item


def encode_sparse(state_dict: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of the sparse safetensors file for ``state_dict`` (see the module docstring)."""
    meta = _reserve(metadata, SPARSE_META_KEY)
    rows: list[list[Any]] = []
    bits: list[torch.Tensor] = []
    groups: dict[str, list[torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu")
        flat = t.reshape(-1)
        dtype = _dtype_name(t.dtype)
        nnz = STORED_DENSE
        if t.is_floating_point():
            # -0.0 == 0 is True, so negative zeros count as zeros and are dropped (restored as +0.0).
            keep = flat != 0
            if _worth_packing(t, int(keep.sum())):
                nnz = int(keep.sum())
                bits.append(_pack_bits(keep))
                groups.setdefault(f"values.{dtype}", []).append(flat[keep])
        if nnz == STORED_DENSE:
            groups.setdefault(f"dense.{dtype}", []).append(flat)
        rows.append([name, dtype, list(t.shape), nnz])
    stored = {key: torch.cat(parts) for key, parts in groups.items()}
    if bits:
        stored["bits"] = torch.cat(bits)
    meta[SPARSE_META_KEY] = json.dumps({"v": SPARSE_FORMAT_VERSION, "t": rows}, separators=(",", ":"))
    return to_safetensors(stored, meta)


def sparse_layout(data: bytes, source: str = "sparse file") -> list[dict[str, Any]]:
    """Per tensor, in state-dict order: ``name``, ``dtype``, ``shape``, ``encoding`` (``bitmask``
    or ``dense``) and, for packed tensors, ``nnz``."""
    return _layout(data, source)[1]


def _layout(data: bytes, source: str) -> tuple[int, list[dict[str, Any]]]:
    meta = safetensors_metadata(data, source)
    if SPARSE_META_KEY not in meta:
        raise ValueError(f"{source}: not a sparse checkpoint (no {SPARSE_META_KEY!r} metadata)")
    try:
        layout = json.loads(meta[SPARSE_META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: unreadable sparse layout ({exc})") from None
    version = layout.get("v", layout.get("version")) if isinstance(layout, dict) else None
    try:
        if version == 1:
            return 1, [dict(e) for e in layout["tensors"]]
        if version != SPARSE_FORMAT_VERSION:
            raise ValueError(f"sparse format version {version!r} is not supported")
        out = []
        for name, dtype, shape, nnz in layout["t"]:
            entry: dict[str, Any] = {"name": name, "dtype": dtype, "shape": list(shape), "encoding": "dense"}
            if nnz != STORED_DENSE:
                entry.update(encoding="bitmask", nnz=int(nnz))
            out.append(entry)
        return version, out
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{source}: malformed sparse layout ({exc})") from None


class _Cursor:
    """Hands out consecutive slices of one flat stored tensor."""

    def __init__(self, tensor: torch.Tensor | None, what: str):
        self.tensor, self.what, self.at = tensor, what, 0

    def take(self, n: int) -> torch.Tensor:
        if self.tensor is None or self.at + n > self.tensor.numel():
            raise ValueError(f"stored tensor {self.what!r} is missing or too short")
        part = self.tensor[self.at : self.at + n]
        self.at += n
        return part

    def check_used(self) -> None:
        if self.tensor is not None and self.at != self.tensor.numel():
            raise ValueError(f"stored tensor {self.what!r} has {self.tensor.numel() - self.at} elements no entry uses")


def decode_sparse(data: bytes, source: str = "sparse file") -> dict[str, torch.Tensor]:
    """Rebuild the state dict from the bytes of a sparse file; ``source`` names it in errors."""
    version, layout = _layout(data, source)
    stored = load_safetensors(data, source)
    if version == 1:
        return _decode_v1(layout, stored, source)
    cursors: dict[str, _Cursor] = {key: _Cursor(t, key) for key, t in stored.items()}
    out: dict[str, torch.Tensor] = {}
    for entry in layout:
        name = entry["name"]
        try:
            dtype = _dtype(entry["dtype"])
            shape = tuple(int(s) for s in entry["shape"])
            numel = math.prod(shape)
            if entry["encoding"] == "dense":
                t = cursors.setdefault(f"dense.{entry['dtype']}", _Cursor(None, f"dense.{entry['dtype']}")).take(numel)
            else:
                keep = _unpack_bits(cursors.setdefault("bits", _Cursor(None, "bits")).take(math.ceil(numel / 8)), numel)
                nnz = int(entry["nnz"])
                if nnz != int(keep.sum()):
                    raise ValueError("bitmask and values do not agree")
                values = cursors.setdefault(f"values.{entry['dtype']}", _Cursor(None, f"values.{entry['dtype']}"))
                t = torch.zeros(numel, dtype=dtype)
                t[keep] = values.take(nnz)
            if t.dtype != dtype:
                raise ValueError("stored tensor does not match its recorded dtype")
            out[name] = t.clone().reshape(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: tensor {name!r}: {exc}") from None
    try:
        for cursor in cursors.values():
            cursor.check_used()
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    return out


def _decode_v1(
    layout: list[dict[str, Any]], stored: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for entry in layout:
        try:
            name, shape = entry["name"], tuple(int(s) for s in entry["shape"])
            dtype, numel = _dtype(entry["dtype"]), math.prod(shape)
            if entry["encoding"] == "dense":
                t = stored[name]
            elif entry["encoding"] == "bitmask":
                keep = _unpack_bits(stored[f"{name}{PART_SEP}bits"], numel)
                values = stored[f"{name}{PART_SEP}values"]
                if values.numel() != int(keep.sum()) or values.dtype != dtype:
                    raise ValueError("bitmask and values do not agree")
                t = torch.zeros(numel, dtype=dtype)
                t[keep] = values
            else:
                raise ValueError(f"unknown encoding {entry['encoding']!r}")
            if t.dtype != dtype or t.numel() != numel:
                raise ValueError("stored tensor does not match its recorded dtype and shape")
            out[name] = t.reshape(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: tensor {entry.get('name')!r}: {exc}") from None
    return out


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


# --- masks ----------------------------------------------------------------------------------------


def encode_masks(masks: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a masks file: packed bits per mask, shapes in the metadata."""
    meta = _reserve(metadata, MASKS_META_KEY)
    shapes = {name: list(m.shape) for name, m in masks.items()}
    meta[MASKS_META_KEY] = json.dumps({"v": MASKS_FORMAT_VERSION, "shapes": shapes}, separators=(",", ":"))
    packed = {name: _pack_bits(m.detach().to(device="cpu", dtype=torch.bool)) for name, m in masks.items()}
    return to_safetensors(packed, meta)


def decode_masks(data: bytes, source: str = "masks file") -> dict[str, torch.Tensor]:
    """Boolean masks (their recorded shapes) from the bytes of a masks file."""
    meta = safetensors_metadata(data, source)
    try:
        layout = json.loads(meta[MASKS_META_KEY])
        shapes = layout["shapes"]
        if layout.get("v") != MASKS_FORMAT_VERSION:
            raise ValueError(f"masks format version {layout.get('v')!r} is not supported")
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source}: not a masks file ({type(exc).__name__}: {exc})") from None
    stored = load_safetensors(data, source)
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        try:
            size = tuple(int(s) for s in shape)
            out[name] = _unpack_bits(stored[name], math.prod(size)).reshape(size)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: mask {name!r}: {exc}") from None
    return out


def load_masks(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a masks file (``masks.safetensors`` of a run): parameter name -> bool tensor."""
    path = Path(path)
    return decode_masks(path.read_bytes(), path.name)
