"""Classifier architectures a model version can name, and the one function that builds them.

Every architecture maps a stamp batch ``(N, C, H, W)`` to two logits, ``[non-lens, lens]``, and
exposes ``forward_features(x) -> (N, F)`` (the penultimate layer: training's GAN feature distance
and any embedding-based diagnostic read it) and ``num_features`` (``F``).

The names here are the vocabulary of ``model.json``'s ``architecture.name``: the registry builds the
network from the name and its parameters and then loads the weights into it, so a name once shipped
must keep building the same parameter layout.

Example
-------
>>> model = build_model("resnetv2", {"depth": 11, "width": 16}, in_channels=3)
>>> logits = model(torch.zeros(2, 3, 64, 64))
>>> lens_probability(logits).shape
torch.Size([2])
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

NUM_CLASSES = 2
"""Logit order of every head: index 0 is non-lens, index 1 is lens."""


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck block: (BN-ReLU-conv) x 3 with 1x1, 3x3, 1x1 kernels.

    The stride sits on the 3x3 convolution (a strided 1x1 would drop three pixels in four, which on
    a 64-pixel stamp throws away arc light). The projection shortcut, used when the shape changes,
    reads the pre-activated input as in He et al. (2016), "Identity Mappings in Deep Residual
    Networks".
    """

    expansion = 4

    def __init__(self, in_channels: int, bottleneck_width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = bottleneck_width * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv1x1(in_channels, bottleneck_width)
        self.bn2 = nn.BatchNorm2d(bottleneck_width)
        self.conv2 = _conv3x3(bottleneck_width, bottleneck_width, stride)
        self.bn3 = nn.BatchNorm2d(bottleneck_width)
        self.conv3 = _conv1x1(bottleneck_width, out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _conv1x1(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLU on the fresh BatchNorm outputs: scoring is memory-bound on the CPU and
        # BatchNorm's backward needs its input, not its output, so training is unaffected.
        pre = torch.relu_(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(torch.relu_(self.bn2(out)))
        out = self.conv3(torch.relu_(self.bn3(out)))
        return out.add_(identity)


class ResNetV2(nn.Module):
    """Pre-activation bottleneck ResNet of the Deep Lens Survey lens finder (SHLDN).

    Depth ``9n + 2``: a 3x3 stem convolution, three stages of ``n`` bottleneck blocks (three
    convolutions each) with bottleneck widths ``width, 2 width, 4 width`` (output channels four
    times that) and strides 1, 2, 2, a final BN-ReLU, global average pooling and a linear head.

    Parameters
    ----------
    in_channels
        Number of bands in a stamp.
    depth
        Total number of weighted layers, ``9n + 2`` with ``n >= 1`` (11, 20, 29, 38, ...).
    width
        Bottleneck width of the first stage; the feature vector has ``16 * width`` entries.
    num_classes
        Number of logits (2: non-lens, lens).
    stem_stride
        Stride of the stem convolution. 1 is the papers' network; 2 halves the resolution of every
        stage, for about 4x less compute on stamps larger than the papers' (64 px and up).
    """

    def __init__(self, in_channels: int, depth: int = 11, width: int = 16, num_classes: int = NUM_CLASSES,
                 stem_stride: int = 1) -> None:
        super().__init__()
        if depth < 11 or (depth - 2) % 9 != 0:
            raise ValueError(
                f"ResNetV2 depth={depth} is not of the form 9n+2 with n >= 1: use 11, 20, 29, 38, ..."
            )
        if width < 1 or in_channels < 1:
            raise ValueError(
                f"ResNetV2 needs width >= 1 and in_channels >= 1, got width={width}, in_channels={in_channels}"
            )
        self.depth = depth
        self.width = width
        blocks_per_stage = (depth - 2) // 9

        self.stem = _conv3x3(in_channels, width, stem_stride)
        stages = []
        channels = width
        for stage_index, stride in enumerate((1, 2, 2)):
            bottleneck_width = width * 2**stage_index
            blocks = []
            for block_index in range(blocks_per_stage):
                blocks.append(PreActBottleneck(channels, bottleneck_width, stride if block_index == 0 else 1))
                channels = bottleneck_width * PreActBottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_bn = nn.BatchNorm2d(channels)
        self.num_features = channels
        self.head = nn.Linear(channels, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the pooled penultimate features, shape ``(N, num_features)``."""
        out = self.stages(self.stem(x))
        out = torch.relu_(self.final_bn(out))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``[non-lens, lens]``, shape ``(N, num_classes)``."""
        return self.head(self.forward_features(x))


class TorchvisionClassifier(nn.Module):
    """A torchvision backbone split into a feature trunk and a linear head.

    The trunk is the torchvision network with its final ``Linear`` replaced by ``Identity``, so it
    returns the pooled features; keeping the head apart gives every architecture the same
    ``forward_features``/``forward`` pair.
    """

    def __init__(self, trunk: nn.Module, num_features: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.trunk = trunk
        self.num_features = num_features
        self.head = nn.Linear(num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the pooled penultimate features, shape ``(N, num_features)``."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``[non-lens, lens]``, shape ``(N, num_classes)``."""
        return self.head(self.forward_features(x))


def _tv_models():
    """torchvision's model zoo, imported when a version names one of its backbones: importing
    torchvision costs a scoring actor 1.6 s of start-up that ResNetV2 ensembles do not need."""
    from torchvision import models

    return models


def _resnet(factory: Callable[..., nn.Module], in_channels: int, small_stem: bool) -> TorchvisionClassifier:
    net = factory(weights=None)
    if small_stem:
        # A 7x7 stride-2 stem plus max-pool shrinks a 64-pixel stamp to 16 pixels before the first
        # block, blurring arcs a few pixels wide; the CIFAR-style 3x3 stride-1 stem keeps them.
        net.conv1 = _conv3x3(in_channels, net.conv1.out_channels)
        net.maxpool = nn.Identity()
    else:
        net.conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, 7, stride=2, padding=3, bias=False)
    num_features = net.fc.in_features
    net.fc = nn.Identity()
    return TorchvisionClassifier(net, num_features)


def build_resnetv2(in_channels: int, depth: int = 11, width: int = 16, stem_stride: int = 1) -> ResNetV2:
    """Return the SHLDN ResNetV2 (see :class:`ResNetV2`)."""
    return ResNetV2(in_channels, depth=depth, width=width, stem_stride=stem_stride)


def build_resnet18(in_channels: int, small_stem: bool = True) -> TorchvisionClassifier:
    """Return torchvision's ResNet-18, untrained, with a 3x3 stride-1 stem and no max-pool by default."""
    return _resnet(_tv_models().resnet18, in_channels, small_stem)


def build_resnet50(in_channels: int, small_stem: bool = True) -> TorchvisionClassifier:
    """Return torchvision's ResNet-50, untrained, with a 3x3 stride-1 stem and no max-pool by default."""
    return _resnet(_tv_models().resnet50, in_channels, small_stem)


def build_efficientnet_b0(in_channels: int, dropout: float = 0.2) -> TorchvisionClassifier:
    """Return torchvision's EfficientNet-B0, untrained, its stem convolution taking ``in_channels``.

    The stride-2 stem is kept: the network's 32x total stride leaves a 2x2 map for a 64-pixel stamp.
    """
    net = _tv_models().efficientnet_b0(weights=None, dropout=dropout)
    stem = net.features[0][0]
    net.features[0][0] = nn.Conv2d(
        in_channels, stem.out_channels, stem.kernel_size, stride=stem.stride, padding=stem.padding, bias=False
    )
    num_features = net.classifier[1].in_features
    net.classifier[1] = nn.Identity()
    return TorchvisionClassifier(net, num_features)


def build_convnext_tiny(in_channels: int) -> TorchvisionClassifier:
    """Return torchvision's ConvNeXt-Tiny, untrained, its 4x4 patchify stem taking ``in_channels``.

    The patchify stem is kept: the 32x total stride leaves a 2x2 map for a 64-pixel stamp.
    """
    net = _tv_models().convnext_tiny(weights=None)
    stem = net.features[0][0]
    net.features[0][0] = nn.Conv2d(
        in_channels, stem.out_channels, stem.kernel_size, stride=stem.stride, padding=stem.padding, bias=True
    )
    num_features = net.classifier[2].in_features
    net.classifier[2] = nn.Identity()
    return TorchvisionClassifier(net, num_features)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnetv2": build_resnetv2,
    "resnet18": build_resnet18,
    "resnet50": build_resnet50,
    "efficientnet_b0": build_efficientnet_b0,
    "convnext_tiny": build_convnext_tiny,
}
"""Architecture names a ``model.json`` may use, mapped to builders ``(in_channels, **params)``."""


def build_model(architecture: str, params: dict[str, Any], in_channels: int) -> nn.Module:
    """Return an untrained classifier of the named architecture, in training mode.

    Parameters
    ----------
    architecture
        A key of :data:`ARCHITECTURES`.
    params
        Keyword parameters of that architecture's builder (e.g. ``{"depth": 11, "width": 16}``).
        ``in_channels`` is not one of them: it comes from the input spec's bands.
    in_channels
        Number of bands per stamp.

    Raises
    ------
    ValueError
        Unknown architecture name, or parameters its builder does not take.
    """
    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown architecture {architecture!r}; known architectures: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    params = dict(params or {})
    if "in_channels" in params:
        raise ValueError(
            f"architecture {architecture!r}: do not pass 'in_channels' in params, it comes from the input spec's bands"
        )
    try:
        inspect.signature(builder).bind(in_channels, **params)
    except TypeError as err:
        accepted = [p for p in inspect.signature(builder).parameters if p != "in_channels"]
        raise ValueError(
            f"architecture {architecture!r} does not accept params {params} ({err}); accepted params: {accepted}"
        ) from None
    logger.debug("building %s with params %s for %d channels", architecture, params, in_channels)
    return builder(in_channels, **params)


def lens_probability(logits: torch.Tensor) -> torch.Tensor:
    """Return the lens probability ``softmax(logits)[:, 1]``, shape ``(N,)``."""
    return torch.softmax(logits, dim=1)[:, 1]
