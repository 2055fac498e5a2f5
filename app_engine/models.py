"""Model registry: the architectures a job spec can name, built for any input shape.

``create_model("resnet18", input_shape=(3, 32, 32), num_classes=10, mean=..., std=...)`` returns a
plain ``nn.Module``. The registry keys are the wire names of ``app_common.spec.ARCHITECTURES``.

Conventions every registered model keeps (the pruning, training and export code rely on them):

- The first module is :class:`Normalize`: the model takes raw data (uint8 images in 0..255, or
  float in 0..1 / float features) and normalises it itself, so an exported model needs no
  preprocessing code next to it.
- The final linear layer is ``model.classifier``.
- :func:`prunable_parameters` names the weights a pruner may remove: every convolution weight
  (stem and 1x1 shortcut convolutions included); for a model without convolutions, the hidden
  linear weights. Never the classifier, biases or normalisation parameters.
- Global average pooling before the classifier, so convolutional models take any spatial size from
  8x8 up (the size only changes how much the feature maps shrink).
- Convolutions are Kaiming-normal initialised, batch norms start at weight 1 and bias 0; all
  randomness comes from torch's global generator, so ``torch.manual_seed`` fixes the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from app_engine.errors import SpecInputError
from app_engine.registry import Registry

logger = logging.getLogger(__name__)

# Smallest spatial side a convolutional model accepts: below it the deep stages of the CIFAR
# networks would work on nothing but padding.
MIN_SPATIAL = 8
# Smallest side of the ImageNet-stem ResNets (``*_imagenet``): the stem divides it by 4 and the
# stages by 8 more, so 64 px reaches the last stage at 2x2.
MIN_IMAGENET_SPATIAL = 64


class ModelBuilder(Protocol):
    def __call__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> nn.Module: ...


MODEL_REGISTRY: Registry[ModelBuilder] = Registry("model")


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: register a builder under ``name`` (the string a job spec uses)."""
    return MODEL_REGISTRY.register(name)


def list_models() -> list[str]:
    """Registered architecture names, in registration order."""
    return list(MODEL_REGISTRY)


def create_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> nn.Module:
    """Build architecture ``name`` for inputs of ``input_shape`` (without the batch dimension).

    ``input_shape`` is ``(C, H, W)`` for images or ``(D,)`` for feature vectors (``mlp`` only);
    ``mean`` and ``std`` hold one value per channel (or per feature), or a single value for all,
    on the 0..1 scale. Raises ``ValueError`` naming the architecture and the problem.
    """
    if name not in MODEL_REGISTRY:
        raise SpecInputError(f"architecture '{name}' is unknown; known: {', '.join(list_models())}")
    input_shape = tuple(int(s) for s in input_shape)
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)
    if not input_shape or any(s < 1 for s in input_shape):
        raise SpecInputError(f"architecture '{name}': input_shape must be positive sizes, got {input_shape}")
    if num_classes < 1:
        raise SpecInputError(f"architecture '{name}': num_classes must be at least 1, got {num_classes}")
    if len(mean) != len(std) or len(mean) not in (1, input_shape[0]):
        raise SpecInputError(
            f"architecture '{name}': mean and std need 1 or {input_shape[0]} values "
            f"(one per channel), got {len(mean)} and {len(std)}"
        )
    if any(not s > 0 for s in std):
        raise SpecInputError(f"architecture '{name}': std must be positive, got {std}")
    model = MODEL_REGISTRY[name](input_shape=input_shape, num_classes=num_classes, mean=mean, std=std)
    logger.debug(
        "built %s for input %s, %d classes: %d parameters",
        name,
        input_shape,
        num_classes,
        sum(p.numel() for p in model.parameters()),
    )
    return model


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights a pruner may remove, keyed by their ``model.named_parameters()`` name, in that order.

    Every convolution weight; for a model without convolutions, the weight of every linear layer
    except the classifier (``model.classifier``, or the last linear layer if there is no such
    attribute). Biases and normalisation parameters are never prunable.
    """
    conv_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    modules = list(model.modules())
    chosen = [m.weight for m in modules if isinstance(m, conv_types)]
    if not chosen:
        linears = [m for m in modules if isinstance(m, nn.Linear)]
        classifier = getattr(model, "classifier", None)
        if not isinstance(classifier, nn.Linear) and linears:
            classifier = linears[-1]
        chosen = [m.weight for m in linears if m is not classifier]
    ids = {id(p) for p in chosen}
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (images ``[N, C, H, W]``) or per feature (``[N, D]``).

    uint8 input is first mapped to 0..1 by dividing by 255, so uint8 ``x`` and float ``x / 255``
    give the same result. mean and std are buffers: they travel in the state dict and exports.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, image: bool):
        super().__init__()
        # [C, 1, 1] broadcasts over [N, C, H, W]; [D] over [N, D].
        shape = (-1, 1, 1) if image else (-1,)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype) / 255.0
        elif not x.is_floating_point():
            raise TypeError(f"model input must be uint8 or floating point, got {x.dtype}")
        return (x - self.mean) / self.std


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions (fan_out, for ReLU), batch norm weight 1 and bias 0.

    Linear layers keep PyTorch's default (uniform, fan_in scaled) initialisation.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise SpecInputError(
            f"architecture '{name}' needs image input (C, H, W); got input_shape {input_shape} "
            "(feature vectors need architecture 'mlp')"
        )
    c, h, w = input_shape
    if h < MIN_SPATIAL or w < MIN_SPATIAL:
        raise SpecInputError(
            f"architecture '{name}' needs images of at least {MIN_SPATIAL}x{MIN_SPATIAL}, got {h}x{w}"
        )
    return c, h, w


def _conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    # Bias-free: the batch norm's shift makes a conv bias redundant.
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]


class ImageClassifier(nn.Module):
    """``normalize -> features -> global average pool -> classifier``: the shape of every conv model."""

    def __init__(self, normalize: Normalize, features: nn.Module, width: int, num_classes: int):
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))  # [N, width, h, w]
        logits: torch.Tensor = self.classifier(torch.flatten(self.pool(x), 1))  # [N, num_classes]
        return logits


# --- mlp ------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Flatten -> ``len(hidden)`` x (linear + ReLU) -> classifier; images or feature vectors."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        hidden: Sequence[int] = (256, 256),
    ):
        super().__init__()
        # Images are normalised per channel before flattening, features per feature.
        self.normalize = Normalize(mean, std, image=len(input_shape) == 3)
        layers: list[nn.Module] = [nn.Flatten(1)]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(self.normalize(x)))
        return logits


@register_model("mlp")
def mlp(
    *, input_shape: tuple[int, ...], num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> nn.Module:
    if len(input_shape) not in (1, 3):
        raise SpecInputError(
            f"architecture 'mlp' needs feature vectors (D,) or images (C, H, W); got input_shape {input_shape}"
        )
    return MLP(input_shape, num_classes, mean, std)


# --- cnn_small ------------------------------------------------------------------------------------


@register_model("cnn_small")
def cnn_small(
    *, input_shape: tuple[int, ...], num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> nn.Module:
    """Three conv-BN-ReLU blocks (32, 64, 128 channels), one 2x2 max-pool, global pool, linear.

    About 93 k parameters and ~2.4 M multiply-adds per 8x8 image: trains on CPU in seconds.
    """
    c, _, _ = _image_shape("cnn_small", input_shape)
    features = nn.Sequential(
        *_conv_bn(c, 32),
        nn.ReLU(inplace=True),
        *_conv_bn(32, 64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
        *_conv_bn(64, 128),
        nn.ReLU(inplace=True),
    )
    return ImageClassifier(Normalize(mean, std, image=True), features, 128, num_classes)


# --- residual networks ----------------------------------------------------------------------------


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and zero-pad the new channels, no weights.

    ``[N, c_in, H, W] -> [N, c_out, ceil(H / stride), ceil(W / stride)]``, the extra channels split
    evenly before and after the input's (as the reference CIFAR ResNets do).
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        if c_out < c_in:
            raise ValueError(f"option-A shortcut cannot shrink {c_in} channels to {c_out}")
        self.stride = stride
        self.before = (c_out - c_in) // 2
        self.after = c_out - c_in - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, self.before, self.after))


def _shortcut(c_in: int, c_out: int, stride: int, kind: str = "projection") -> nn.Module:
    """Identity, or when the shape changes a 1x1 conv + BN projection (``projection``, prunable)
    or a zero-padded subsampled identity (``pad``, option A of He et al. 2016)."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    if kind == "pad":
        return PadShortcut(c_in, c_out, stride)
    return nn.Sequential(*_conv_bn(c_in, c_out, kernel=1, stride=stride))


class BasicBlock(nn.Module):
    """Two 3x3 convs: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int, shortcut: str = "projection"):
        super().__init__()
        c_out = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(c_in, width, 3, stride)
        self.conv2, self.bn2 = _conv_bn(width, c_out, 3)
        self.shortcut = _shortcut(c_in, c_out, stride, shortcut)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        summed: torch.Tensor = self.relu(out + self.shortcut(x))
        return summed


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand to ``4 * width``, plus shortcut."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(c_in, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, c_out, 1)
        self.shortcut = _shortcut(c_in, c_out, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        summed: torch.Tensor = self.relu(out + self.shortcut(x))
        return summed


def _resnet(
    name: str,
    block: type[BasicBlock] | type[Bottleneck],
    depths: Sequence[int],
    widths: Sequence[int],
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    shortcut: str = "projection",
    imagenet_stem: bool = False,
) -> nn.Module:
    """CIFAR-style ResNet: 3x3 stride-1 stem (no max-pool), stages halving the size after the first.

    For an H x W input the stages see H x W, H/2 x W/2, ... (rounded up); the last stage of a
    4-stage net sees 1x1 at 8x8 input, which global pooling then passes through. With
    ``imagenet_stem`` the stem is He et al.'s ImageNet one instead: a 7x7 stride-2 convolution and
    a 3x3 stride-2 max-pool, so the stages see H/4 x W/4, ... (inputs of at least
    :data:`MIN_IMAGENET_SPATIAL`).
    """
    c, h, w = _image_shape(name, input_shape)
    if imagenet_stem:
        if h < MIN_IMAGENET_SPATIAL or w < MIN_IMAGENET_SPATIAL:
            raise SpecInputError(
                f"architecture '{name}' (ImageNet stem: 7x7 stride-2 convolution and max-pool) needs images of "
                f"at least {MIN_IMAGENET_SPATIAL}x{MIN_IMAGENET_SPATIAL}, got input size {h}x{w}: raise "
                f"dataset.image_size or use architecture '{name.removesuffix('_imagenet')}'"
            )
        stem: list[nn.Module] = [*_conv_bn(c, widths[0], kernel=7, stride=2), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(3, stride=2, padding=1)]
    else:
        stem = [*_conv_bn(c, widths[0]), nn.ReLU(inplace=True)]
    layers: list[nn.Module] = stem
    c_in = widths[0]
    for stage, (depth, width) in enumerate(zip(depths, widths, strict=True)):
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(
                BasicBlock(c_in, width, stride, shortcut) if block is BasicBlock else block(c_in, width, stride)
            )
            c_in = width * block.expansion
    return ImageClassifier(Normalize(mean, std, image=True), nn.Sequential(*layers), c_in, num_classes)


def _register_cifar_resnet(name: str, n: int, shortcut: str = "projection") -> None:
    """He et al. (2016) CIFAR ResNet of depth 6n + 2: three stages of n basic blocks, 16/32/64 channels.

    ``shortcut`` is how a block that changes shape adds its input: ``projection`` (1x1 conv + BN,
    option B) or ``pad`` (option A, the paper's and the APP reference's: no extra weights).
    """

    @register_model(name)
    def build(
        *, input_shape: tuple[int, ...], num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> nn.Module:
        return _resnet(
            name,
            BasicBlock,
            (n, n, n),
            (16, 32, 64),
            input_shape=input_shape,
            num_classes=num_classes,
            mean=mean,
            std=std,
            shortcut=shortcut,
        )


def _register_imagenet_resnet(
    name: str, block: type[BasicBlock] | type[Bottleneck], depths: Sequence[int], imagenet_stem: bool = False
) -> None:
    """ResNet-18/34/50 widths (64..512 per stage) with the CIFAR stem used in the pruning literature,
    or with ``imagenet_stem`` the original ImageNet network (the same parameters as torchvision's)."""

    @register_model(name)
    def build(
        *, input_shape: tuple[int, ...], num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> nn.Module:
        return _resnet(
            name,
            block,
            depths,
            (64, 128, 256, 512),
            input_shape=input_shape,
            num_classes=num_classes,
            mean=mean,
            std=std,
            imagenet_stem=imagenet_stem,
        )


_register_cifar_resnet("resnet20", 3)
_register_cifar_resnet("resnet20_a", 3, shortcut="pad")
_register_cifar_resnet("resnet32", 5)
_register_cifar_resnet("resnet56", 9)
_register_imagenet_resnet("resnet18", BasicBlock, (2, 2, 2, 2))
_register_imagenet_resnet("resnet34", BasicBlock, (3, 4, 6, 3))
_register_imagenet_resnet("resnet50", Bottleneck, (3, 4, 6, 3))


# --- vgg ------------------------------------------------------------------------------------------

# Channel counts of VGG-16's 13 convolutions; "M" is a 2x2 max-pool.
VGG16_LAYERS: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"
)  # fmt: skip


@register_model("vgg16_bn")
def vgg16_bn(
    *, input_shape: tuple[int, ...], num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> nn.Module:
    """CIFAR VGG-16 with batch norm, global average pooling and one linear classifier.

    At 32x32 the five pools bring the maps to 1x1. Smaller inputs reach 1x1 earlier; the remaining
    pools would then be identities and are left out. Pools round up (``ceil_mode``), so odd sizes
    keep their border and any size from 8x8 works.
    """
    c, h, w = _image_shape("vgg16_bn", input_shape)
    layers: list[nn.Module] = []
    for item in VGG16_LAYERS:
        if item == "M":
            if h > 1 or w > 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                h, w = math.ceil(h / 2), math.ceil(w / 2)
        else:
            assert isinstance(item, int)
            layers += [*_conv_bn(c, item), nn.ReLU(inplace=True)]
            c = item
    return ImageClassifier(Normalize(mean, std, image=True), nn.Sequential(*layers), c, num_classes)


# --- ImageNet ResNets -----------------------------------------------------------------------------

# Registered last: registration order is the spec's ARCHITECTURES order.
_register_imagenet_resnet("resnet18_imagenet", BasicBlock, (2, 2, 2, 2), imagenet_stem=True)
_register_imagenet_resnet("resnet50_imagenet", Bottleneck, (3, 4, 6, 3), imagenet_stem=True)
