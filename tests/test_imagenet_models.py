"""The ImageNet-stem ResNets (``resnet18_imagenet``, ``resnet50_imagenet``): He et al.'s networks
with the 7x7 stride-2 stem and 3x3 max-pool, for images of 64 px and up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app_engine.errors import SpecInputError
from app_engine.models import create_model, prunable_parameters
from app_engine.pruning import Masks, prune

IMAGENET = ["resnet18_imagenet", "resnet50_imagenet"]
# torchvision's resnet18 / resnet50 at 1000 classes (11.69 M / 25.56 M): the same layers.
PARAMETERS = {"resnet18_imagenet": 11_689_512, "resnet50_imagenet": 25_557_032}
# Convolutions: stem + 2 per basic block (8) + 3 projections; stem + 3 per bottleneck (16) + 4 projections.
CONVS = {"resnet18_imagenet": 1 + 16 + 3, "resnet50_imagenet": 1 + 48 + 4}


def build(name: str, side: int = 64, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, input_shape=(3, side, side), num_classes=num_classes, mean=(0.5,), std=(0.25,))


def images(side: int, n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", IMAGENET)
def test_parameter_count_is_the_standard_networks(name: str) -> None:
    model = build(name, 64, num_classes=1000)  # the count does not depend on the input size
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


@pytest.mark.parametrize("name", IMAGENET)
def test_stem_and_forward_shape(name: str) -> None:
    model = build(name).eval()
    features = model.features
    assert isinstance(features, nn.Sequential)
    stem = features[0]
    assert isinstance(stem, nn.Conv2d) and stem.kernel_size == (7, 7) and stem.stride == (2, 2)
    assert isinstance(features[3], nn.MaxPool2d)
    with torch.no_grad():
        for side in (64, 75):
            out = model(images(side, n=2))
            assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", IMAGENET)
def test_inputs_below_64_px_are_refused_naming_the_architecture_and_size(name: str) -> None:
    with pytest.raises(SpecInputError, match=rf"architecture '{name}'.*at least 64x64, got input size 32x32"):
        build(name, 32)
    with pytest.raises(SpecInputError, match=r"got input size 63x63.*dataset.image_size"):
        build(name, 63)


@pytest.mark.parametrize("name", IMAGENET)
def test_every_convolution_is_prunable_and_snip_prunes_them(name: str) -> None:
    model = build(name).train()
    params = prunable_parameters(model)
    convs = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert list(params) == convs and len(convs) == CONVS[name]
    x, y = images(64, n=2), torch.tensor([0, 1])
    masks = prune(model, params, Masks.ones(params), pruner="snip", keep=0.2, scope="global",
                  batches=[(x, y)], seed=0)
    assert masks.density() == pytest.approx(0.2, abs=1e-3)
    masks.apply_(model)
    assert sum(int((p == 0).sum()) for p in params.values()) >= masks.total() - masks.nonzero()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()  # type: ignore[no-untyped-call]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
