"""What the nets of the zoo share: argument checks (one head, channels, input shape) and the
pieces the ResNet-based ones build from."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch
from torch import nn

from fcn_core.fcn import SINGLE_HEAD


def one_head(name: str, num_classes: int, heads: Mapping[str, int] | None,
             in_channels: int) -> int:
    """The class count of a one-head net (``heads`` may name only that head); ValueError
    for what the net cannot be."""
    if heads is not None:
        if list(heads) != [SINGLE_HEAD]:
            raise ValueError(f"{name} has one score head, got heads={dict(heads)!r}")
        num_classes = heads[SINGLE_HEAD]
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes must be an int >= 1, got num_classes={num_classes!r}")
    if not (isinstance(in_channels, int) and in_channels >= 1):
        raise ValueError(f"in_channels must be an int >= 1, got in_channels={in_channels!r}")
    return num_classes


def as_torchvision_builds_it(name: str, width: float, in_channels: int) -> None:
    """A net on torchvision's classification nets has no width multiplier and reads RGB."""
    if width != 1.0:
        raise ValueError(f"{name} is torchvision's net, which has no width multiplier: "
                         f"width must be 1.0, got width={width!r}")
    if in_channels != 3:
        raise ValueError(f"{name} reads 3-channel images, got in_channels={in_channels!r}")


def check_input(x: object, channels: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be (N, {channels}, H, W), got {shape}")


def resnet50_features(dilate: tuple[bool, bool, bool], return_layers: dict[str, str]
                      ) -> nn.Module:
    """torchvision's ResNet-50 without weights (nothing downloaded), ``dilate``: which of
    layer2..4 trade their stride for dilation, returning the named layers' maps (torchvision's
    IntermediateLayerGetter: ``net.backbone`` of its segmentation nets)."""
    models = importlib.import_module("torchvision.models")
    utils = importlib.import_module("torchvision.models._utils")
    resnet = models.resnet50(weights=None, replace_stride_with_dilation=list(dilate))
    return utils.IntermediateLayerGetter(resnet, return_layers=return_layers)


def conv_bn_relu(c_in: int, c_out: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]
