"""One table of nets: ``build_model(name, ...)`` is what configs, the CLI and the registry read.

Every net maps (N, C, H, W) to scores (N, classes, H, W) for any H, W >= 1 (a dict of such
maps for a net with several heads). The names need no torch import (``NAMES``), so an
argument parser can list them; ``build_model`` imports the builder on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

TORCHVISION = "fcn_core.zoo.torchvision_nets"
# name -> (module, builder, one line for --help and `fcn describe`)
_TABLE: dict[str, tuple[str, str, str]] = {
    "fcn32s": ("fcn_core.fcn", "fcn32s", "VGG16 FCN-32s: score_fr upsampled 32x"),
    "fcn16s": ("fcn_core.fcn", "fcn16s", "VGG16 FCN-16s: + the pool4 skip"),
    "fcn8s": ("fcn_core.fcn", "fcn8s", "VGG16 FCN-8s: + the pool3 skip"),
    "fcn8s_atonce": ("fcn_core.fcn", "fcn8s_atonce",
                     "VGG16 FCN-8s trained in one stage (scaled skips)"),
    "fcn32s_alexnet": ("fcn_core.alexnet", "fcn32s_alexnet",
                       "AlexNet FCN-32s (torchvision's single-tower AlexNet trunk)"),
    "fcn32s_googlenet": ("fcn_core.googlenet", "fcn32s_googlenet",
                         "GoogLeNet FCN-32s (torchvision's trunk through inception5b)"),
    # The successors (issue 15), one stage each: ours, then torchvision's builders (no
    # weights downloaded).
    "unet": ("fcn_core.zoo.unet", "unet", "U-Net: contracting + expanding paths, skip concat"),
    "segnet": ("fcn_core.zoo.segnet", "segnet",
               "SegNet: VGG16-BN encoder, decoder unpools with its indices"),
    "deeplab_largefov": ("fcn_core.zoo.deeplab", "deeplab_largefov",
                         "DeepLab v1 LargeFOV: atrous VGG16, stride 8, fc6 dilated 12"),
    "pspnet_resnet50": ("fcn_core.zoo.pspnet", "pspnet_resnet50",
                        "PSPNet: pyramid pooling (1, 2, 3, 6) on dilated ResNet-50, aux head"),
    "deeplabv3plus_resnet50": ("fcn_core.zoo.deeplabv3plus", "deeplabv3plus_resnet50",
                               "DeepLabv3+: ASPP + low-level decoder on ResNet-50 (stride 16)"),
    "refinenet_resnet50": ("fcn_core.zoo.refinenet", "refinenet_resnet50",
                           "RefineNet: 4 cascaded blocks (RCU, fusion, CRP) on ResNet-50"),
    **{n: (TORCHVISION, n, what) for n, what in (
        ("fcn_resnet50", "torchvision's FCN on ResNet-50 (dilated, stride 8), aux head"),
        ("fcn_resnet101", "torchvision's FCN on ResNet-101 (dilated, stride 8), aux head"),
        ("deeplabv3_resnet50", "DeepLabv3 (ASPP) on ResNet-50, torchvision's, aux head"),
        ("deeplabv3_resnet101", "DeepLabv3 (ASPP) on ResNet-101, torchvision's, aux head"),
        ("deeplabv3_mobilenet_v3_large", "DeepLabv3 on MobileNetV3-Large, torchvision's"),
        ("lraspp_mobilenet_v3_large", "LR-ASPP on MobileNetV3-Large, torchvision's"))},
}
NAMES: tuple[str, ...] = tuple(_TABLE)
# Built on torchvision's classification nets, as torchvision has them (no width multiplier).
_ON_TORCHVISION = {n for n, (m, _, _) in _TABLE.items() if m == TORCHVISION} | {
    "pspnet_resnet50", "deeplabv3plus_resnet50", "refinenet_resnet50"}
# The nets with a channel multiplier (``width``).
SCALABLE: tuple[str, ...] = tuple(n for n in _TABLE if n not in _ON_TORCHVISION)
# The successors: a config's ``model:`` (the FCNs are its stages and ``backbone:``).
SUCCESSORS: tuple[str, ...] = tuple(n for n, (m, _, _) in _TABLE.items() if ".zoo." in m)


def needs_torchvision(name: str) -> bool:
    """Whether building ``name`` imports torchvision (a served model's requirements)."""
    return name == "fcn32s_googlenet" or name in _ON_TORCHVISION


def describe_names() -> str:
    """``name: what`` lines, for --help."""
    return "\n".join(f"  {n:<29} {what}" for n, (_, _, what) in _TABLE.items())


def build_model(name: str, *, num_classes: int = 21, in_channels: int = 3, width: float = 1.0,
                heads: Mapping[str, int] | None = None) -> nn.Module:
    """The net ``name`` (one of ``NAMES``) with random or zero-initialised weights, as its
    builder makes it: ``num_classes`` scores per pixel (or ``heads``: name -> classes),
    ``in_channels`` input channels, channel multiplier ``width``."""
    if name not in _TABLE:
        raise ValueError(f"name must be one of {', '.join(NAMES)}, got name={name!r}")
    module, builder, _ = _TABLE[name]
    build = getattr(importlib.import_module(module), builder)
    return build(num_classes=num_classes, width=width, in_channels=in_channels, heads=heads)
