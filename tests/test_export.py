"""Tests for app_engine.export: the sparse file, the artifacts of a run and the model loader.

One ResNet-20 is trained briefly on the digits (8x8 grey images) with masks at the paper's final
density 0.8 ** 4.5 = 0.366, so the weights, the batch-norm statistics and the masks are those of a
real (if short) run; every test exports or re-masks that model.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import app_engine
from app_common.spec import DatasetSpec, JobSpec
from app_engine.data import Dataset, load_dataset
from app_engine.export import export_artifacts, fold_masks, load_model
from app_engine.loading import MANIFEST_FILE, MASKS_FILE, MODEL_FILE, REPORT_FILE, SPARSE_FILE, load_run_masks
from app_engine.models import create_model, prunable_parameters
from app_engine.sparse import (
    MASKS_META_KEY,
    SPARSE_META_KEY,
    encode_sparse,
    load_masks,
    load_sparse,
    read_metadata,
    save_sparse,
    sparse_layout,
)

TAU = 4.5
DENSITY = 0.8**TAU  # 0.3664
STEPS = 60


def magnitude_masks(model: nn.Module, density: float) -> dict[str, torch.Tensor]:
    """Global magnitude masks keeping exactly round(density * n) of the prunable weights."""
    params = prunable_parameters(model)
    scores = torch.cat([p.detach().abs().reshape(-1) for p in params.values()])
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.topk(scores, round(density * scores.numel())).indices] = True
    out, start = {}, 0
    for name, p in params.items():
        out[name] = keep[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DatasetSpec(name="digits"), seed=0)


@pytest.fixture(scope="module")
def dense_and_trained(digits: Dataset) -> tuple[dict[str, torch.Tensor], nn.Module, dict[str, torch.Tensor], float]:
    """ResNet-20 trained dense for STEPS // 2 steps (that state is kept), then pruned by magnitude
    to DENSITY and trained STEPS // 2 more steps with the masks held (the model returned)."""
    torch.manual_seed(0)
    model = create_model(
        "resnet20", input_shape=digits.input_shape, num_classes=digits.num_classes, mean=digits.mean, std=digits.std
    )
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    masks: dict[str, torch.Tensor] = {}
    dense_state: dict[str, torch.Tensor] = {}
    model.train()
    for step in range(STEPS):
        if step == STEPS // 2:
            dense_state = copy.deepcopy(model.state_dict())
            masks = magnitude_masks(model, DENSITY)
        idx = torch.randint(0, len(digits.y_train), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(mask)
    acc = accuracy(model, digits.x_test, digits.y_test)
    return dense_state, model, masks, acc


@pytest.fixture(scope="module")
def trained(
    dense_and_trained: tuple[dict[str, torch.Tensor], nn.Module, dict[str, torch.Tensor], float],
) -> tuple[nn.Module, dict[str, torch.Tensor], float]:
    return dense_and_trained[1:]


@pytest.fixture(scope="module")
def dense_model(
    dense_and_trained: tuple[dict[str, torch.Tensor], nn.Module, dict[str, torch.Tensor], float],
) -> nn.Module:
    model = copy.deepcopy(dense_and_trained[1])
    model.load_state_dict(dense_and_trained[0])
    return model


def spec_for(formats: list[str]) -> JobSpec:
    return JobSpec.from_dict(
        {
            "architecture": "resnet20",
            "dataset": {"name": "digits"},
            "sparsity": {"tau": TAU},
            "export": {"formats": formats},
        }
    )


def info_for(digits: Dataset) -> dict[str, Any]:
    return {
        "architecture": "resnet20",
        "input_shape": list(digits.input_shape),
        "num_classes": digits.num_classes,
        "mean": list(digits.mean),
        "std": list(digits.std),
        "classes": list(digits.classes),
    }


def megabatch_metrics(acc: float) -> list[dict[str, Any]]:
    # The shape of result.json's megabatch entries; only the final accuracy comes from a model.
    keeps = [0.8 ** (1 + (TAU - 1) * i / 3) for i in range(4)]
    return [
        {"index": i + 1, "test_accuracy": acc * (0.7 + 0.1 * i), "density": k, "generalization_gap": 4.0 - i}
        for i, k in enumerate(keeps)
    ]


@pytest.fixture(scope="module")
def exported(
    trained: tuple[nn.Module, dict[str, torch.Tensor], float], digits: Dataset, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, dict[str, Any]], dict[str, Any]]:
    model, masks, acc = trained
    out = tmp_path_factory.mktemp("run")
    metrics = {"megabatches": megabatch_metrics(acc), "cer": 123, "final_test_accuracy": acc}
    spec = spec_for(["safetensors", "sparse", "onnx"])
    files = export_artifacts(model, masks, out, spec=spec, model_info=info_for(digits), metrics=metrics)
    return out, files, metrics


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (stricter than torch.equal: -0.0 != +0.0, NaN == NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


# --- sparse file ----------------------------------------------------------------------------------


def test_trained_model_learned(trained: tuple[nn.Module, dict[str, torch.Tensor], float]) -> None:
    model, masks, acc = trained
    assert acc > 0.5  # 10 classes: chance is 0.1
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert kept == round(DENSITY * total)
    params = dict(model.named_parameters())
    assert all(int(torch.count_nonzero(params[n][~m])) == 0 for n, m in masks.items())


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1])
def test_sparse_round_trip_is_bit_identical(dense_model: nn.Module, tmp_path: Path, density: float) -> None:
    model = dense_model
    state = fold_masks(model.state_dict(), magnitude_masks(model, density))
    path = tmp_path / "m.sparse.safetensors"
    size = save_sparse(state, path, metadata={"note": "hello"})
    assert size == path.stat().st_size
    loaded = load_sparse(path)
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert same_bits(loaded[name], tensor), name
    # Batch-norm counters are int64 and count the training steps.
    counters = [n for n in state if n.endswith("num_batches_tracked")]
    assert counters and all(int(loaded[n]) == STEPS // 2 for n in counters)
    assert read_metadata(path) == {"note": "hello"}
    layout = sparse_layout(path.read_bytes())
    packed = {e["name"] for e in layout if e["encoding"] == "bitmask"}
    # A tensor is packed exactly when bitmask + values are smaller than 0.9 of its dense bytes (fp32:
    # density below 0.9 - 1/32). Global masks leave some small layers denser than the overall figure.
    expected = {
        n for n in prunable_parameters(model)
        if float((state[n] != 0).float().mean()) <= 0.9 - 1 / 32
    }
    assert packed == expected
    if density == 1.0:
        assert packed == set()
    if density < 1.0:
        assert packed, "nothing was packed"


def _raw_metadata(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])["__metadata__"]


def test_sparse_keeps_dtypes_special_values_and_odd_shapes(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)

    def sparse(shape: tuple[int, ...], dtype: torch.dtype, density: float) -> torch.Tensor:
        values = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        return torch.where(torch.rand(shape, generator=gen) < density, values, torch.zeros((), dtype=dtype))

    special = sparse((300,), torch.float32, 0.2)
    special[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45, -7.5])
    state = {
        "fp16": sparse((7, 13), torch.float16, 0.3),
        "bf16": sparse((5, 5, 5), torch.bfloat16, 0.3),
        "fp64": sparse((129,), torch.float64, 0.3),
        "special": special,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "all_zero": torch.zeros(10, 10),
        "ints": torch.randint(-5, 5, (100,), generator=gen),
        "flags": torch.rand(100, generator=gen) < 0.1,
        "u8": torch.randint(0, 255, (3, 3), generator=gen, dtype=torch.uint8),
    }
    save_sparse(state, tmp_path / "s.safetensors")
    loaded = load_sparse(tmp_path / "s.safetensors")
    for name, tensor in state.items():
        assert same_bits(loaded[name], tensor), name
    layout = sparse_layout((tmp_path / "s.safetensors").read_bytes())
    encodings = {e["name"]: e["encoding"] for e in layout}
    assert {n for n, e in encodings.items() if e == "bitmask"} == {"fp16", "bf16", "fp64", "special", "all_zero"}

    # A negative zero is a zero: it is not stored and comes back as +0.0; its neighbours keep their bits.
    neg = torch.zeros(200)
    neg[::7] = -0.0
    neg[1::50] = -3.25
    save_sparse({"neg": neg}, tmp_path / "neg.safetensors")
    back = load_sparse(tmp_path / "neg.safetensors")["neg"]
    assert torch.equal(back, neg)
    assert not torch.signbit(back[::7]).any()
    assert same_bits(back[1::50], neg[1::50])


def test_sparse_rejects_reserved_names_and_broken_files(tmp_path: Path) -> None:
    # Stored tensors no longer carry the state-dict names, so no name is reserved.
    save_sparse({"a::bits": torch.zeros(3)}, tmp_path / "x.safetensors")
    assert list(load_sparse(tmp_path / "x.safetensors")) == ["a::bits"]
    with pytest.raises(ValueError, match=SPARSE_META_KEY):
        save_sparse({"a": torch.zeros(3)}, tmp_path / "x.safetensors", metadata={SPARSE_META_KEY: "x"})
    path = tmp_path / "cut.safetensors"
    save_sparse({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_sparse(path)


def test_sparse_size_scales_with_density(dense_model: nn.Module, tmp_path: Path) -> None:
    model = dense_model
    sizes = {}
    for density in (1.0, 0.5, DENSITY, 0.1):
        state = fold_masks(model.state_dict(), magnitude_masks(model, density))
        sizes[density] = save_sparse(state, tmp_path / f"{density}.safetensors")
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert sizes[1.0] < 1.05 * dense_bytes  # nothing to compress: stored whole, plus the layout
    assert sizes[1.0] > sizes[0.5] > sizes[DENSITY] > sizes[0.1]
    # fp32 weights cost 4 bytes per kept value + 1 bit per element: about density + 1/32 of dense.
    prunable = sum(p.numel() for p in prunable_parameters(model).values())
    assert sizes[0.5] - sizes[0.1] == pytest.approx(4 * (0.5 - 0.1) * prunable, rel=0.01)


def test_fold_masks_zeroes_pruned_weights_without_signed_zeros() -> None:
    w = torch.tensor([[-1.5, 2.0, -0.0], [0.0, -3.0, 4.0]])
    mask = torch.tensor([[True, False, True], [True, False, True]])
    folded = fold_masks({"w": w, "b": torch.tensor([-0.0])}, {"w": mask})
    assert torch.equal(folded["w"], torch.tensor([[-1.5, 0.0, 0.0], [0.0, 0.0, 4.0]]))
    assert not torch.signbit(folded["w"][folded["w"] == 0]).any()  # -3.0 * 0 and the kept -0.0
    assert torch.signbit(folded["b"]).all()  # unmasked tensors are copied as they are
    assert w[0, 0] == -1.5 and torch.signbit(w[0, 2])  # the input is not modified


# --- export_artifacts -----------------------------------------------------------------------------


def test_artifacts_match_the_files_on_disk(exported: tuple[Path, dict[str, dict[str, Any]], dict[str, Any]]) -> None:
    out, files, _ = exported
    expected = {MODEL_FILE, MASKS_FILE, SPARSE_FILE, REPORT_FILE, MANIFEST_FILE}
    onnx_available = importlib.util.find_spec("onnx") is not None
    assert set(files) == expected | ({"model.onnx"} if onnx_available else set())
    for name, entry in files.items():
        data = (out / name).read_bytes()
        assert entry["path"] == str(out / name)
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    manifest = json.loads((out / MANIFEST_FILE).read_bytes())
    listed = {f["name"]: f for f in manifest["files"]}
    assert set(listed) == set(files) - {MANIFEST_FILE}
    for name, entry in listed.items():
        assert entry == {k: v for k, v in files[name].items() if k != "path"} | {"name": name}
    if not onnx_available:
        assert [s["name"] for s in manifest["skipped"]] == ["model.onnx"]
        assert "onnx" in manifest["skipped"][0]["reason"]
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in out.iterdir()) == sorted(files)


def test_sparse_file_is_small_next_to_the_dense_one(
    exported: tuple[Path, dict[str, dict[str, Any]], dict[str, Any]],
) -> None:
    _, files, _ = exported
    ratio = files[SPARSE_FILE]["bytes"] / files[MODEL_FILE]["bytes"]
    assert ratio <= 0.45
    assert ratio >= DENSITY  # the kept values alone take that share


def test_manifest_contents(
    exported: tuple[Path, dict[str, dict[str, Any]], dict[str, Any]],
    trained: tuple[nn.Module, dict[str, torch.Tensor], float],
    digits: Dataset,
) -> None:
    out, _, metrics = exported
    model, masks, _ = trained
    manifest = json.loads((out / MANIFEST_FILE).read_bytes())
    spec = spec_for(["safetensors", "sparse", "onnx"])
    assert manifest["spec"] == spec.to_dict()
    assert manifest["spec_fingerprint"] == spec.fingerprint()
    assert manifest["engine"]["version"] == app_engine.__version__
    assert manifest["torch_version"] == torch.__version__
    assert manifest["model_info"] == info_for(digits)
    assert manifest["metrics"] == metrics

    density = manifest["density"]
    assert density["target"] == pytest.approx(DENSITY)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert density["kept"] == kept and density["prunable"] == total
    assert density["measured"] == pytest.approx(kept / total)
    assert abs(density["measured"] - DENSITY) < 1 / total + 1e-12
    assert list(density["per_layer"]) == list(prunable_parameters(model))
    for name, layer in density["per_layer"].items():
        assert layer["kept"] == int(masks[name].sum())
        assert layer["density"] == pytest.approx(layer["kept"] / masks[name].numel())

    counts = manifest["parameters"]
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["prunable"] == total
    assert counts["nonzero_prunable"] <= kept  # training may leave a kept weight at exactly 0
    assert counts["nonzero"] == sum(int(torch.count_nonzero(p)) for p in model.parameters())


def test_saved_files_hold_the_masked_weights(
    exported: tuple[Path, dict[str, dict[str, Any]], dict[str, Any]],
    trained: tuple[nn.Module, dict[str, torch.Tensor], float],
) -> None:
    out, _, _ = exported
    model, masks, _ = trained
    from safetensors.torch import load_file

    dense = load_file(out / MODEL_FILE)
    sparse = load_sparse(out / SPARSE_FILE)
    state = model.state_dict()
    assert set(dense) == set(sparse) == set(state)
    for name in state:
        assert same_bits(dense[name], sparse[name]), name
        assert torch.equal(dense[name], state[name]), name
    # On disk: packed bits, one uint8 per 8 weights; read back: the boolean masks.
    on_disk = load_file(out / MASKS_FILE)
    assert set(on_disk) == set(masks)
    assert all(on_disk[n].dtype == torch.uint8 and on_disk[n].numel() == math.ceil(masks[n].numel() / 8) for n in masks)
    for saved_masks in (load_masks(out / MASKS_FILE), load_run_masks(out)):
        assert set(saved_masks) == set(masks)
        assert all(saved_masks[n].dtype == torch.bool and torch.equal(saved_masks[n], masks[n]) for n in masks)
    assert MASKS_META_KEY in _raw_metadata(out / MASKS_FILE)
    assert json.loads(read_metadata(out / MODEL_FILE)["model_info"])["architecture"] == "resnet20"


@pytest.mark.parametrize("source", ["sparse", "safetensors"])
def test_load_model_predicts_like_the_exported_model(
    exported: tuple[Path, dict[str, dict[str, Any]], dict[str, Any]],
    trained: tuple[nn.Module, dict[str, torch.Tensor], float],
    digits: Dataset,
    source: str,
) -> None:
    out, _, _ = exported
    model, _, acc = trained
    loaded = load_model(out, source=source)  # type: ignore[arg-type]
    assert not loaded.training
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(digits.x_test), model(digits.x_test))
    assert accuracy(loaded, digits.x_test, digits.y_test) == acc


@pytest.mark.parametrize("name,source", [(SPARSE_FILE, "sparse"), (MODEL_FILE, "safetensors")])
def test_tampered_file_is_refused(
    exported: tuple[Path, dict[str, dict[str, Any]], dict[str, Any]], tmp_path: Path, name: str, source: str
) -> None:
    out, files, _ = exported
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for file in files:
        (copy_dir / file).write_bytes((out / file).read_bytes())
    data = bytearray((copy_dir / name).read_bytes())
    data[-3] ^= 0x01  # one bit of one stored value
    (copy_dir / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{name.replace('.', '[.]')}: contents do not match manifest[.]json"):
        load_model(copy_dir, source=source)  # type: ignore[arg-type]


def test_export_leaves_the_model_alone_and_checks_its_inputs(
    trained: tuple[nn.Module, dict[str, torch.Tensor], float], digits: Dataset, tmp_path: Path
) -> None:
    model, masks, _ = trained
    before = copy.deepcopy(model.state_dict())
    # Masks more aggressive than the ones trained with: the export must fold them, not the model.
    tighter = magnitude_masks(model, 0.1)
    files = export_artifacts(
        model, tighter, tmp_path, spec=spec_for(["sparse"]), model_info=info_for(digits), metrics={"megabatches": []}
    )
    assert set(files) == {MASKS_FILE, SPARSE_FILE, REPORT_FILE, MANIFEST_FILE}
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    reloaded = load_model(tmp_path)
    nonzero = sum(int(torch.count_nonzero(p)) for n, p in reloaded.named_parameters() if n in tighter)
    assert nonzero <= sum(int(m.sum()) for m in tighter.values())
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_bytes())
    assert manifest["density"]["measured"] == pytest.approx(0.1, abs=1e-5)
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path, source="safetensors")

    bad_shape = dict(masks)
    first = next(iter(bad_shape))
    bad_shape[first] = bad_shape[first].reshape(-1)
    with pytest.raises(ValueError, match=first):
        export_artifacts(
            model, bad_shape, tmp_path / "a", spec=spec_for(["sparse"]), model_info=info_for(digits), metrics={}
        )
    with pytest.raises(ValueError, match="classes"):
        info = {k: v for k, v in info_for(digits).items() if k != "classes"}
        export_artifacts(model, masks, tmp_path / "b", spec=spec_for(["sparse"]), model_info=info, metrics={})


def test_default_formats_come_from_the_spec(
    trained: tuple[nn.Module, dict[str, torch.Tensor], float], digits: Dataset, tmp_path: Path
) -> None:
    model, masks, acc = trained
    files = export_artifacts(
        model, masks, tmp_path, spec=spec_for(["safetensors"]), model_info=info_for(digits),
        metrics={"megabatches": megabatch_metrics(acc)},
    )
    assert set(files) == {MODEL_FILE, MASKS_FILE, REPORT_FILE, MANIFEST_FILE}
    assert math.isclose(json.loads((tmp_path / MANIFEST_FILE).read_bytes())["density"]["target"], DENSITY)
    assert (tmp_path / REPORT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sparse_header_is_compact(trained: tuple[nn.Module, dict[str, torch.Tensor], float]) -> None:
    """One layout row per tensor and a few concatenated stored tensors: for a ResNet-20 at the
    paper's final density the JSON header stays under 2.5 % of the file (it was 6 % with one
    verbose entry and two stored parts per tensor)."""
    model, masks, _ = trained
    data = encode_sparse(fold_masks(model.state_dict(), masks))
    header = int.from_bytes(data[:8], "little")
    assert header / len(data) < 0.025
    stored = json.loads(data[8 : 8 + header])
    assert {k for k in stored if k != "__metadata__"} <= {"bits", "values.float32", "dense.float32", "dense.int64"}


def test_version_1_sparse_files_still_load(dense_model: nn.Module, tmp_path: Path) -> None:
    """Files written before the compact header (one entry and two parts per tensor) keep loading."""
    from safetensors.torch import save

    state = fold_masks(dense_model.state_dict(), magnitude_masks(dense_model, 0.3))
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for name, t in state.items():
        entry: dict[str, Any] = {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        if t.is_floating_point() and t.numel() >= 64:
            keep = t.reshape(-1) != 0
            tensors[f"{name}::bits"] = torch.from_numpy(np.packbits(keep.numpy(), bitorder="little"))
            tensors[f"{name}::values"] = t.reshape(-1)[keep].clone()
            entry.update(encoding="bitmask", nnz=int(keep.sum()))
        else:
            tensors[name] = t.clone()
            entry["encoding"] = "dense"
        entries.append(entry)
    path = tmp_path / "v1.safetensors"
    path.write_bytes(save(tensors, metadata={SPARSE_META_KEY: json.dumps({"version": 1, "tensors": entries})}))
    loaded = load_sparse(path)
    assert list(loaded) == list(state)
    assert all(same_bits(loaded[n], state[n]) for n in state)
