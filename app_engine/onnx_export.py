"""ONNX export of a model, and its check under ONNX Runtime (the optional ``onnx`` extra).

The exported graph takes ``input``: float32 ``[batch, *input_shape]`` on the 0..1 scale (uint8
images divided by 255; float features as they are), the batch size free; it returns ``logits``:
float32 ``[batch, num_classes]``. Normalisation is part of the model, as in PyTorch.

The file is self-contained: torch's exporter (``dynamo=True``) would put the weights in a
``model.onnx.data`` side file when asked to write a path; here the in-memory ``ModelProto`` is
serialised instead, weights included, and refused if any tensor still points at external data.
:func:`onnx_bytes` checks every file it returns against the PyTorch model on a few inputs;
:func:`verify_onnx` does the same on any inputs (the test set, in the tests).

onnx, onnxscript and onnxruntime are imported only inside these functions: the engine runs
without them, and :func:`missing_packages` says what an export would lack.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Everything an export needs: onnx + onnxscript for torch's exporter, onnxruntime for the check.
REQUIRED_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# One protobuf message holds at most 2 GiB; a model near that would need the external-data layout.
MAX_SINGLE_FILE_BYTES = 2**31 - 64 * 2**20
# The check inside onnx_bytes: a few seeded uniform inputs. Its tolerance is the 1e-4 the tests
# hold on the test set, loosened by a relative term so that the float32 rounding of very large
# logits (an untrained deep network reaches 1e3) does not refuse a correct file.
SELF_CHECK_SAMPLES = 8
SELF_CHECK_ATOL = 1e-4
SELF_CHECK_RTOL = 1e-5


def missing_packages() -> list[str]:
    """The packages of the ``onnx`` extra that are not installed (empty when an export can run)."""
    return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]


class OnnxExportError(RuntimeError):
    """The model could not be exported, or the exported file does not reproduce it."""


@dataclass(frozen=True)
class OnnxCheck:
    """ONNX Runtime's logits against PyTorch's on the same ``samples`` inputs.

    ``ok`` when every logit satisfies ``|onnx - torch| <= atol + rtol * |torch|`` (numpy's
    ``allclose``); ``agreement`` is the share of samples whose predicted class is the same.
    """

    samples: int
    max_abs_diff: float
    agreement: float
    atol: float
    rtol: float
    ok: bool

    def __str__(self) -> str:
        verdict = "match" if self.ok else "differ"
        return (
            f"onnxruntime and PyTorch logits {verdict} on {self.samples} samples: max |diff| "
            f"{self.max_abs_diff:.3g} (tolerance {self.atol:g} + {self.rtol:g} * |logit|), "
            f"same class for {self.agreement:.2%}"
        )


def as_onnx_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the exported graph takes it: uint8 images / 255, floating point as float32."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255.0
    if not x.is_floating_point():
        raise TypeError(f"model input must be uint8 or floating point, got {x.dtype}")
    return x.to(torch.float32)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporter warns about its own future and logs which torchvision ops it skips (torchvision
    # is not used here), its optimiser every pass it applies; none of it is about this model, and
    # pytest treats warnings as errors. Failures still raise.
    levels = {"torch.onnx": logging.ERROR, "onnxscript": logging.WARNING, "onnx_ir": logging.WARNING}
    loggers = {logging.getLogger(name): level for name, level in levels.items()}
    saved = {log: log.level for log in loggers}
    for log, level in loggers.items():
        log.setLevel(max(level, log.level))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in saved.items():
            log.setLevel(level)


def _export(model: nn.Module, input_shape: Sequence[int], opset_version: int | None) -> bytes:
    import onnx
    from onnx.external_data_helper import uses_external_data

    # A batch of 2: torch.export specialises a dimension of size 1 to a constant.
    example = torch.zeros(2, *input_shape)
    with _quiet_exporter():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset_version,
            verbose=False,
        )
    if program is None:  # only the TorchScript exporter writes a file and returns nothing
        raise OnnxExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    external = [t.name for t in proto.graph.initializer if uses_external_data(t)]
    if external:
        raise OnnxExportError(f"the exported graph keeps {len(external)} tensors outside the file: {external[:3]}")
    onnx.checker.check_model(proto)
    data: bytes = proto.SerializeToString()
    return data


def onnx_bytes(model: nn.Module, input_shape: Sequence[int], *, opset_version: int | None = None) -> bytes:
    """``model`` as one self-contained ONNX file, checked against PyTorch under ONNX Runtime.

    ``model`` is used as it is (fold the masks into its weights first), in eval mode on the CPU (a
    copy when it is not so already); it is left untouched. ``input_shape`` is one sample's shape. Raises
    ``OnnxExportError`` (or the exporter's own error) saying why when no correct file comes out;
    ``ModuleNotFoundError`` when a package of the ``onnx`` extra is missing.
    """
    missing = missing_packages()
    if missing:
        raise ModuleNotFoundError(f"the 'onnx' extra is not installed (missing {', '.join(missing)})")
    shape = [int(s) for s in input_shape]
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weight_bytes > MAX_SINGLE_FILE_BYTES:
        raise OnnxExportError(
            f"the weights take {weight_bytes / 2**30:.2f} GiB, more than one ONNX file can hold (2 GiB)"
        )
    export_model = model if _is_cpu_eval(model) else _cpu_eval_copy(model)
    data = _export(export_model, shape, opset_version)
    # Seeded, so that two exports of one model run the same check.
    gen = torch.Generator().manual_seed(0)
    probe = torch.rand(SELF_CHECK_SAMPLES, *shape, generator=gen)
    check = verify_onnx(data, export_model, probe, atol=SELF_CHECK_ATOL, rtol=SELF_CHECK_RTOL)
    if not check.ok:
        raise OnnxExportError(f"the exported file does not reproduce the model: {check}")
    logger.info("exported ONNX (%d bytes); %s", len(data), check)
    return data


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model).to("cpu")
    out.eval()
    return out


def inference_session(onnx_model: bytes | str | os.PathLike[str]) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU for a file's bytes or its path."""
    import onnxruntime  # type: ignore[import-untyped]

    source = onnx_model if isinstance(onnx_model, bytes) else str(Path(onnx_model))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the runtime's notices are not about the model
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnx(
    onnx_model: bytes | str | os.PathLike[str], x: torch.Tensor, *, batch_size: int = 256, session: Any = None
) -> np.ndarray:
    """Logits of the ONNX model for ``x`` (uint8 images or float input, any number of samples),
    computed in batches of ``batch_size``: float32 ``[len(x), num_classes]``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    sess = session if session is not None else inference_session(onnx_model)
    inputs = as_onnx_input(x.detach().cpu())
    parts = [
        np.asarray(sess.run([OUTPUT_NAME], {INPUT_NAME: inputs[i : i + batch_size].numpy()})[0])
        for i in range(0, len(inputs), batch_size)
    ]
    if not parts:
        raise ValueError("no samples to run")
    return np.concatenate(parts)


def verify_onnx(
    onnx_model: bytes | str | os.PathLike[str],
    model: nn.Module,
    x: torch.Tensor,
    *,
    atol: float = 1e-4,
    rtol: float = 0.0,
    batch_size: int = 256,
) -> OnnxCheck:
    """Compare the ONNX model's logits under ONNX Runtime with ``model``'s (in eval mode, on the
    CPU, without gradients) on the inputs ``x``, batch by batch. ``model`` is not modified."""
    ref_model = model if _is_cpu_eval(model) else _cpu_eval_copy(model)
    inputs = as_onnx_input(x.detach().cpu())
    got = run_onnx(onnx_model, inputs, batch_size=batch_size)
    with torch.no_grad():
        want = np.concatenate(
            [ref_model(inputs[i : i + batch_size]).numpy() for i in range(0, len(inputs), batch_size)]
        )
    if got.shape != want.shape:
        return OnnxCheck(len(inputs), math.inf, 0.0, atol, rtol, False)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    ok = bool(np.all(diff <= atol + rtol * np.abs(want.astype(np.float64))))
    agreement = float(np.mean(got.argmax(axis=1) == want.argmax(axis=1)))
    return OnnxCheck(len(inputs), float(diff.max()), agreement, atol, rtol, ok)


def _is_cpu_eval(model: nn.Module) -> bool:
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    return on_cpu and not any(m.training for m in model.modules())
