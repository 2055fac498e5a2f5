"""Tests for app_engine.models: every registered architecture, on tiny inputs, on CPU.

The per-model tests are parametrised over ``list_models()``, so a newly registered architecture is
tested without touching this file. The large networks (ResNet-18/34/50, VGG-16) run at 8x8 only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from app_common.spec import ARCHITECTURES
from app_engine.models import (
    MODEL_REGISTRY,
    Normalize,
    PadShortcut,
    create_model,
    list_models,
    prunable_parameters,
    register_model,
)

LARGE = {"resnet18", "resnet34", "resnet50", "vgg16_bn"}
# Shapes every model must take; the small models also get CIFAR-sized and odd-sized input.
SHAPES_ALL = [(3, 8, 8), (1, 8, 8), (4, 9, 11)]
SHAPES_SMALL = [(3, 32, 32), (2, 15, 12)]
# Number of 1x1 projection shortcuts: one per stage whose first block changes the shape.
SHORTCUTS = {"resnet20": 2, "resnet32": 2, "resnet56": 2, "resnet18": 3, "resnet34": 3, "resnet50": 4}


def build(name: str, shape: tuple[int, ...] = (3, 8, 8), num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    c = shape[0]
    mean = tuple(0.3 + 0.1 * i for i in range(c))
    std = tuple(0.2 + 0.05 * i for i in range(c))
    return create_model(name, input_shape=shape, num_classes=num_classes, mean=mean, std=std)


def images(shape: tuple[int, ...], n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)


def shape_cases() -> list[tuple[str, tuple[int, ...]]]:
    cases = [(name, s) for name in small_input_models() for s in SHAPES_ALL]
    cases += [(name, s) for name in small_input_models() if name not in LARGE for s in SHAPES_SMALL]
    return cases


def small_input_models() -> list[str]:
    """Models that take 8x8 input: all but the ImageNet-stem ResNets (64 px and up), which
    tests/test_imagenet_models.py covers."""
    return [n for n in list_models() if not n.endswith("_imagenet")]


def conv_models() -> list[str]:
    return [n for n in small_input_models() if n != "mlp"]


def test_registry_matches_spec() -> None:
    assert tuple(list_models()) == ARCHITECTURES
    assert set(MODEL_REGISTRY) == set(ARCHITECTURES)


def test_register_model_adds_and_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(MODEL_REGISTRY["mlp"])

    @register_model("_test_tiny")
    def tiny(
        *, input_shape: tuple[int, ...], num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> nn.Module:
        return nn.Sequential(Normalize(mean, std, image=False), nn.Linear(input_shape[0], num_classes))

    try:
        assert list_models()[-1] == "_test_tiny"
        model = create_model("_test_tiny", input_shape=(5,), num_classes=3, mean=(0.0,), std=(1.0,))
        assert model(torch.zeros(2, 5)).shape == (2, 3)
        # Without a ``classifier`` attribute the last linear layer is the classifier: nothing to prune.
        assert prunable_parameters(model) == {}
    finally:
        del MODEL_REGISTRY["_test_tiny"]
    assert tuple(list_models()) == ARCHITECTURES


@pytest.mark.parametrize(("name", "shape"), shape_cases())
def test_forward_shape(name: str, shape: tuple[int, int, int]) -> None:
    model = build(name, shape, num_classes=7)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.out_features == 7
    out = model(images(shape))
    assert out.shape == (2, 7)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_mlp_takes_feature_vectors() -> None:
    torch.manual_seed(0)
    model = create_model("mlp", input_shape=(20,), num_classes=4, mean=(1.0,) * 20, std=(2.0,) * 20)
    x = torch.randn(6, 20)
    assert model(x).shape == (6, 4)
    # Per-feature normalisation happens inside the model.
    assert torch.allclose(model.normalize(x), (x - 1.0) / 2.0)
    # A single mean/std applies to every feature.
    model1 = create_model("mlp", input_shape=(20,), num_classes=4, mean=(1.0,), std=(2.0,))
    assert torch.allclose(model1.normalize(x), (x - 1.0) / 2.0)


def test_mlp_takes_any_image_size() -> None:
    model = build("mlp", (3, 4, 4))
    assert model(images((3, 4, 4))).shape == (2, 10)


@pytest.mark.parametrize("name", small_input_models())
def test_backward_reaches_every_prunable_weight(name: str) -> None:
    model = build(name).train()
    loss = nn.functional.cross_entropy(model(images((3, 8, 8), n=4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    params = prunable_parameters(model)
    assert params
    for pname, p in params.items():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", small_input_models())
def test_prunable_parameters_selection(name: str) -> None:
    model = build(name)
    params = prunable_parameters(model)
    named = dict(model.named_parameters())
    # Names as in named_parameters, in its order, and the very same Parameter objects.
    assert list(params) == [n for n in named if n in params]
    assert all(params[n] is named[n] for n in params)
    owner = {id(m.weight): m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert all(id(p) in owner for p in params.values()), "only conv/linear weights are prunable"
    assert all(n.endswith(".weight") for n in params)
    assert "classifier.weight" not in params and "classifier.bias" not in params
    assert all(owner[id(p)] is not model.classifier for p in params.values())

    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if name == "mlp":
        assert not convs
        assert list(params) == ["features.1.weight", "features.3.weight"]
        return
    # Every conv weight, the stem (first conv) included, and no linear weight at all.
    assert {f"{n}.weight" for n, _ in convs} == set(params)
    assert f"{convs[0][0]}.weight" in params
    assert convs[0][1].in_channels == 3
    shortcuts = [n for n, m in convs if ".shortcut." in n and m.kernel_size == (1, 1)]
    assert len(shortcuts) == SHORTCUTS.get(name, 0)
    assert all(f"{n}.weight" in params for n in shortcuts)


@pytest.mark.parametrize("name", small_input_models())
def test_uint8_and_float_input_agree(name: str) -> None:
    model = build(name).eval()
    x = images((3, 8, 8))
    with torch.no_grad():
        a = model(x)
        b = model(x.float() / 255.0)
        c = model(x.float())  # float input is taken as already on the 0..1 scale
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, c)


def test_normalize_maps_uint8_to_unit_scale_then_standardises() -> None:
    norm = Normalize((0.5, 0.0), (0.25, 0.5), image=True)
    x = torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 2, 1, 1).expand(1, 2, 2, 2)
    out = norm(x)
    assert torch.equal(out[0, 0], torch.full((2, 2), -2.0))
    assert torch.equal(out[0, 1], torch.full((2, 2), 2.0))
    assert set(norm.state_dict()) == {"mean", "std"}
    with pytest.raises(TypeError, match="uint8 or floating"):
        norm(x.long())


@pytest.mark.parametrize("name", small_input_models())
def test_state_dict_round_trip(name: str) -> None:
    model = build(name, seed=0).train()
    with torch.no_grad():
        model(images((3, 8, 8), n=4, seed=1))  # move the batch-norm running statistics off their init
    model.eval()
    other = build(name, seed=1).eval()
    x = images((3, 8, 8), seed=2)
    with torch.no_grad():
        assert not torch.equal(model(x), other(x))
        state = model.state_dict()
        assert "normalize.mean" in state and "normalize.std" in state
        other.load_state_dict(state)
        assert torch.equal(model(x), other(x))


@pytest.mark.parametrize("name", small_input_models())
def test_init_is_deterministic_given_seed(name: str) -> None:
    a, b, c = build(name, seed=5).state_dict(), build(name, seed=5).state_dict(), build(name, seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", small_input_models())
def test_init_scheme(name: str) -> None:
    model = build(name)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() > 10_000), None)
    if conv is not None:
        # Kaiming normal, fan_out mode for ReLU: std = sqrt(2 / (out_channels * kh * kw)).
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.05)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet20", 0.27e6),
        ("resnet56", 0.85e6),
        ("resnet18", 11.2e6),
        ("resnet50", 23.5e6),
        ("vgg16_bn", 14.7e6),
    ],
)
def test_parameter_count(name: str, expected: float) -> None:
    model = build(name, (3, 32, 32), num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(expected, rel=0.015)


@pytest.mark.parametrize("name", conv_models())
def test_conv_models_reject_small_or_flat_input(name: str) -> None:
    with pytest.raises(ValueError, match=rf"architecture '{name}'.*at least 8x8, got 4x4"):
        build(name, (3, 4, 4))
    with pytest.raises(ValueError, match=rf"architecture '{name}'.*\(C, H, W\)"):
        build(name, (64,))


def test_create_model_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="architecture 'resnet9000' is unknown; known: mlp"):
        create_model("resnet9000", input_shape=(3, 8, 8), num_classes=2, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="architecture 'cnn_small': mean and std need 1 or 3"):
        create_model("cnn_small", input_shape=(3, 8, 8), num_classes=2, mean=(0.5, 0.5), std=(0.5, 0.5))
    with pytest.raises(ValueError, match="std must be positive"):
        create_model("cnn_small", input_shape=(3, 8, 8), num_classes=2, mean=(0.5,), std=(0.0,))
    with pytest.raises(ValueError, match="num_classes"):
        create_model("cnn_small", input_shape=(3, 8, 8), num_classes=0, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="architecture 'mlp'"):
        create_model("mlp", input_shape=(8, 8), num_classes=2, mean=(0.5,), std=(0.5,))


@pytest.mark.parametrize("name", small_input_models())
def test_pruned_weights_run_and_survive_load_state_dict(name: str) -> None:
    model = build(name, seed=0).eval()
    x = images((3, 8, 8), seed=3)
    with torch.no_grad():
        dense_out = model(x)
    g = torch.Generator().manual_seed(0)
    masks = {}
    for pname, p in prunable_parameters(model).items():
        # Exactly half of each weight tensor removed, at random positions.
        keep = torch.zeros(p.numel(), dtype=torch.bool)
        keep[torch.randperm(p.numel(), generator=g)[: p.numel() // 2]] = True
        masks[pname] = keep.reshape(p.shape)
        with torch.no_grad():
            p.mul_(masks[pname])
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, dense_out)

    other = build(name, seed=1).eval()
    other.load_state_dict(model.state_dict())
    pruned = prunable_parameters(model)
    reloaded = prunable_parameters(other)
    for pname, keep in masks.items():
        w = reloaded[pname]
        assert torch.count_nonzero(w[~keep]) == 0, pname
        assert torch.equal(w, pruned[pname]), pname
    with torch.no_grad():
        assert torch.equal(other(x), out)


@pytest.mark.parametrize("name", small_input_models())
def test_bf16_autocast_and_channels_last(name: str) -> None:
    model = build(name).eval().to(memory_format=torch.channels_last)
    x = images((3, 8, 8)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    # bf16 keeps ~3 significant digits; the logits must still be close to the fp32 ones.
    assert torch.allclose(out.float(), ref, rtol=0.1, atol=0.1 * ref.abs().max().item())


def digits_uint8() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits (values 0..16) as uint8 images [N, 1, 8, 8], a fixed 80/20 split."""
    data = load_digits()
    x = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    split = int(0.8 * len(y))
    tr, te = order[:split], order[split:]
    return torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), torch.from_numpy(x[te]), torch.from_numpy(y[te])


@pytest.mark.parametrize("name", ["cnn_small", "mlp"])
def test_small_models_learn_digits(name: str) -> None:
    x_train, y_train, x_test, y_test = digits_uint8()
    mean = (x_train.float() / 255).mean().item()
    std = (x_train.float() / 255).std().item()
    torch.manual_seed(0)
    model = create_model(name, input_shape=(1, 8, 8), num_classes=10, mean=(mean,), std=(std,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(4):
        for idx in torch.randperm(len(y_train), generator=g).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.90


def test_resnet20_a_has_the_papers_option_a_shortcuts() -> None:
    """Option A (zero-padded identity with stride) has no shortcut weights: 269,722 parameters on
    10 classes, against 272,474 for resnet20's 1x1 projections (2 x (conv + BN) = 2,752)."""
    a, b = build("resnet20_a", (3, 32, 32)), build("resnet20", (3, 32, 32))
    assert sum(p.numel() for p in a.parameters()) == 269_722
    assert sum(p.numel() for p in b.parameters()) == 272_474
    x = torch.randn(2, 16, 9, 9)
    pad = PadShortcut(16, 32, 2)
    out = pad(x)
    assert out.shape == (2, 32, 5, 5)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
