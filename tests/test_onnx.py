"""Tests for app_engine.onnx_export and the model.onnx of a run: one self-contained file, masks
folded in, whose logits under ONNX Runtime match PyTorch's within 1e-4 on real data.

Every registry architecture is built fresh, its batch norms set to the statistics of real digits
(so the logits have a trained model's scale), pruned at random to density 0.3, masks folded,
exported, and compared on images of the digits test set: 8x8 grey images, the same upsampled to
CIFAR's 3x32x32 (3x64x64 for the ImageNet stem), or flattened into 64 features for the mlp.
Architectures whose export repeats the operators of a tested one at several seconds' cost are
skipped, naming the one that covers them. Tests that need the ``onnx`` extra skip without it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app_common.spec import DatasetSpec, JobSpec
from app_engine import onnx_export
from app_engine.data import Dataset, load_dataset
from app_engine.export import export_artifacts, fold_masks, load_model
from app_engine.loading import MANIFEST_FILE, ONNX_FILE, SPARSE_FILE
from app_engine.models import create_model, list_models, prunable_parameters
from app_engine.onnx_export import (
    OnnxExportError,
    inference_session,
    onnx_bytes,
    run_onnx,
    verify_onnx,
)
from app_engine.pruning import Masks, prune
from app_engine.runner import model_info, run

ATOL = 1e-4
DENSITY = 0.3

# Export time on a CPU (torch.export's tracing and decomposition, 2-8 s each) grows with depth.
# These repeat the operators of an architecture tested here and are left out to keep the file
# near half a minute; APP_TEST_ONNX_ALL=1 runs them too.
SLOW_EXPORTS = {
    "resnet20": "resnet20_a is the same network with the pad shortcut; resnet18_imagenet has projection shortcuts",
    "resnet32": "resnet20_a's blocks, deeper (export ~4-8 s on a CPU)",
    "resnet56": "resnet20_a's blocks, deeper (export ~7-15 s on a CPU)",
    "resnet18": "resnet18_imagenet has the same blocks and widths (export ~4-8 s on a CPU)",
    "resnet34": "resnet18_imagenet's blocks, deeper (export ~5-10 s on a CPU)",
    "resnet50": "bottleneck blocks: convolutions, batch norms and ReLUs as tested (export ~6-12 s on a CPU)",
    "vgg16_bn": "cnn_small has its operators: convolution, batch norm, ReLU, ceil-mode max-pool (export ~3-6 s)",
    "resnet50_imagenet": "bottleneck blocks with the ImageNet stem of resnet18_imagenet (export ~6-12 s on a CPU)",
}
RUN_ALL = os.environ.get("APP_TEST_ONNX_ALL") == "1"
# Which real inputs each architecture is checked on: digits' own 8x8 by default (a wide network
# costs 16 times less there than at 32x32), CIFAR's size for the paper's CIFAR network, 64x64 for
# the ImageNet-stem ResNets (``*_imagenet``), which need at least that.
INPUTS = {"mlp": "features", "resnet20_a": "cifar"}
SIZES = {"cifar": 32, "imagenet": 64}
# The first images of the test set (the run's test below takes all 359): 64, or 32 at 64x64 where
# the ImageNet ResNet-18 costs ~0.3 GFLOP an image.
SAMPLES = {"imagenet": 32}


def input_kind(arch: str) -> str:
    return "imagenet" if arch.endswith("_imagenet") else INPUTS.get(arch, "digits")


@pytest.fixture
def onnx_extra() -> None:
    for name in onnx_export.REQUIRED_PACKAGES:
        pytest.importorskip(name, reason=f"the 'onnx' extra is not installed (no {name})")


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DatasetSpec(name="digits"), seed=0)


def real_inputs(digits: Dataset, kind: str, split: str) -> torch.Tensor:
    """Digits images as ``kind``: uint8 [N, 1, 8, 8], uint8 [N, 3, S, S] (S = 32 or 64) or float
    [N, 64] in 0..1."""
    x = digits.x_train if split == "train" else digits.x_test
    assert x.dtype == torch.uint8 and x.shape[1:] == (1, 8, 8)
    if kind == "digits":
        return x
    if kind in SIZES:
        size = SIZES[kind]
        big = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
        return big.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    assert kind == "features"
    return x.float().div(255).reshape(len(x), -1)


def calibrate_batch_norms(model: nn.Module, x: torch.Tensor) -> None:
    """Set every batch norm's running statistics to those of ``x``, as training would approach."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def pruned_model(arch: str, digits: Dataset) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """A fresh ``arch`` with real batch-norm statistics, pruned to DENSITY, masks folded in (eval
    mode); its masks; and the test inputs to compare it on."""
    kind = input_kind(arch)
    x_train = real_inputs(digits, kind, "train")
    torch.manual_seed(0)
    model = create_model(
        arch,
        input_shape=tuple(x_train.shape[1:]),
        num_classes=digits.num_classes,
        mean=(digits.mean[0],),
        std=(digits.std[0],),
    )
    calibrate_batch_norms(model, x_train[:16])
    # Random masks: what the file must show is zeros where they are off, whatever chose them (and a
    # global magnitude sort of a ResNet-18's 11 M weights costs more than its export).
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=gen) < DENSITY for n, p in prunable_parameters(model).items()}
    model.load_state_dict(fold_masks(model.state_dict(), masks))
    return model, masks, real_inputs(digits, kind, "test")[: SAMPLES.get(kind, 64)]


def registry_params() -> list[Any]:
    out = []
    for arch in list_models():
        marks = []
        if arch in SLOW_EXPORTS and not RUN_ALL:
            marks.append(pytest.mark.skip(reason=f"{arch} left out: {SLOW_EXPORTS[arch]}; APP_TEST_ONNX_ALL=1 runs it"))
        out.append(pytest.param(arch, marks=marks, id=arch))
    return out


# --- every architecture ---------------------------------------------------------------------------


@pytest.mark.usefixtures("onnx_extra")
@pytest.mark.parametrize("arch", registry_params())
def test_registry_model_exports_one_file_that_reproduces_it(arch: str, digits: Dataset, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    model, masks, x = pruned_model(arch, digits)
    state = model.state_dict()
    path = tmp_path / ONNX_FILE
    path.write_bytes(onnx_bytes(model, x.shape[1:]))

    # One self-contained file: no side file, no tensor pointing outside, valid for onnx.checker.
    proto = onnx.load(str(path))
    assert [p.name for p in tmp_path.iterdir()] == [ONNX_FILE]
    assert not [t.name for t in proto.graph.initializer if uses_external_data(t)]
    onnx.checker.check_model(str(path), full_check=True)

    # The masks are folded in: each prunable weight is in the file, zero wherever its mask is off
    # and only there. (The exporter's optimiser may fold a batch norm's scale into a convolution's
    # weight: the values can differ from PyTorch's, the zeros cannot.)
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert set(masks) <= set(weights)
    for name, mask in masks.items():
        assert weights[name].shape == tuple(mask.shape), name
        np.testing.assert_array_equal(weights[name] != 0, state[name].numpy() != 0, err_msg=name)
        assert not weights[name][~mask.numpy()].any(), name
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert kept == pytest.approx(DENSITY, abs=0.02)

    # A free batch dimension: one sample, and the test inputs in batches of 20 (uneven tail).
    session = inference_session(path)
    (graph_input,) = session.get_inputs()
    assert isinstance(graph_input.shape[0], str) and graph_input.shape[1:] == list(x.shape[1:])
    assert run_onnx(path, x[:1], session=session).shape == (1, digits.num_classes)
    check = verify_onnx(path, model, x, atol=ATOL, batch_size=20)
    assert check.ok, str(check)
    assert check.samples == len(x) and check.max_abs_diff <= ATOL
    assert check.agreement >= 0.99


# --- a run ----------------------------------------------------------------------------------------

RUN_SPEC = {
    "dataset": {"name": "digits"},
    "architecture": "mlp",
    "method": "app",
    "sparsity": {"target": 0.5},
    "stream": {"megabatches": 2},
    "training": {"epochs": 1, "precision": "fp32", "device": "cpu", "seed": 3},
    "export": {"formats": ["safetensors", "sparse", "onnx"], "keep_every_megabatch": False},
}


@pytest.mark.usefixtures("onnx_extra")
def test_a_trained_run_writes_a_model_onnx_that_matches_on_the_test_set(digits: Dataset, tmp_path: Path) -> None:
    result = run(JobSpec.from_dict(RUN_SPEC), tmp_path)
    data = (tmp_path / ONNX_FILE).read_bytes()
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_bytes())
    listed = {f["name"]: f for f in manifest["files"]}
    assert listed[ONNX_FILE] == {
        "name": ONNX_FILE,
        "format": "onnx",
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert manifest["skipped"] == []
    assert result.artifacts[ONNX_FILE]["sha256"] == listed[ONNX_FILE]["sha256"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(ONNX_FILE) and p.name != ONNX_FILE]

    model = load_model(tmp_path)  # the sparse file, sha256-checked: the model the run kept
    check = verify_onnx(tmp_path / ONNX_FILE, model, digits.x_test, atol=ATOL)
    assert check.ok and check.samples == len(digits.x_test), str(check)
    onnx_accuracy = float((run_onnx(data, digits.x_test).argmax(1) == digits.y_test.numpy()).mean())
    assert abs(onnx_accuracy - result.result["final_test_accuracy"]) <= 1 / len(digits.x_test)


# --- failures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_mlp(digits: Dataset) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    model = create_model("mlp", input_shape=(1, 8, 8), num_classes=10, mean=digits.mean, std=digits.std).eval()
    params = prunable_parameters(model)
    masks = prune(model, params, Masks.ones(params), pruner="magnitude", keep=0.5).state_dict()
    return model, masks


@pytest.fixture(scope="module")
def small_mlp_onnx(small_mlp: tuple[nn.Module, dict[str, torch.Tensor]]) -> bytes:
    for name in onnx_export.REQUIRED_PACKAGES:
        pytest.importorskip(name, reason=f"the 'onnx' extra is not installed (no {name})")
    return onnx_bytes(small_mlp[0], (1, 8, 8))


def export_run(model: nn.Module, masks: dict[str, torch.Tensor], digits: Dataset, out: Path) -> dict[str, Any]:
    spec = JobSpec.from_dict({**RUN_SPEC, "export": {"formats": ["sparse", "onnx"]}})
    export_artifacts(model, masks, out, spec=spec, model_info=model_info(spec, digits), metrics={"megabatches": []})
    manifest: dict[str, Any] = json.loads((out / MANIFEST_FILE).read_bytes())
    return manifest


def test_export_is_byte_for_byte_reproducible(
    small_mlp: tuple[nn.Module, dict[str, torch.Tensor]], small_mlp_onnx: bytes
) -> None:
    # The manifest's sha256 proves a rerun only if the same model gives the same bytes.
    assert onnx_bytes(small_mlp[0], (1, 8, 8)) == small_mlp_onnx


def test_a_file_that_does_not_reproduce_the_model_is_refused(
    small_mlp: tuple[nn.Module, dict[str, torch.Tensor]], small_mlp_onnx: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(small_mlp_onnx)
    (bias,) = [t for t in proto.graph.initializer if t.name == "classifier.bias"]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 0.01, bias.name))
    tampered = proto.SerializeToString()
    monkeypatch.setattr(onnx_export, "_export", lambda *args: tampered)
    with pytest.raises(OnnxExportError, match="does not reproduce the model"):
        onnx_bytes(small_mlp[0], (1, 8, 8))
    check = verify_onnx(tampered, small_mlp[0], torch.rand(4, 1, 8, 8))
    assert not check.ok and check.max_abs_diff == pytest.approx(0.01, rel=1e-3) and check.samples == 4


@pytest.mark.usefixtures("onnx_extra")
def test_a_failed_export_is_recorded_and_leaves_no_file(
    small_mlp: tuple[nn.Module, dict[str, torch.Tensor]],
    digits: Dataset,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object) -> bytes:
        raise RuntimeError("the exporter cannot translate aten::frobnicate")

    monkeypatch.setattr(onnx_export, "_export", broken)
    manifest = export_run(*small_mlp, digits, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(ONNX_FILE)]
    (skipped,) = manifest["skipped"]
    assert skipped["name"] == ONNX_FILE and skipped["format"] == "onnx"
    assert "export failed" in skipped["reason"] and "aten::frobnicate" in skipped["reason"]
    assert SPARSE_FILE in {f["name"] for f in manifest["files"]}  # the other artifacts are kept


def test_without_the_extra_onnx_is_skipped_with_a_reason(
    small_mlp: tuple[nn.Module, dict[str, torch.Tensor]],
    digits: Dataset,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(onnx_export, "missing_packages", lambda: ["onnxscript", "onnxruntime"])
    manifest = export_run(*small_mlp, digits, tmp_path)
    assert not (tmp_path / ONNX_FILE).exists()
    assert manifest["skipped"] == [
        {
            "name": ONNX_FILE,
            "format": "onnx",
            "reason": "the 'onnx' extra is not installed (missing onnxscript, onnxruntime)",
        }
    ]
