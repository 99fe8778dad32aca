"""DeepLabv3+ (Chen, Zhu, Papandreou, Schroff, Adam, ECCV 2018) on ResNet-50.

The encoder is torchvision's ResNet-50 with layer4 dilated (output stride 16, the paper's
training setting) and torchvision's ASPP (rates 6, 12, 18, image pooling; 256 channels). The
decoder, as the paper: the low-level features (layer1, stride 4) reduced to 48 channels (1x1
conv, batch norm, ReLU), the ASPP output upsampled bilinearly to them and concatenated, two
3x3 convolutions of 256 (batch norm, ReLU), a 1x1 convolution to the classes, and a bilinear
upsampling to the input. Built without weights; ``backbone_weights`` (a torchvision
``resnet50()`` state dict) loads into ``net.backbone`` like the other ResNet nets'.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fcn_core.fcn import SINGLE_HEAD, FCNConfig
from fcn_core.zoo.checks import (
    as_torchvision_builds_it,
    check_input,
    conv_bn_relu,
    one_head,
    resnet50_features,
)

ATROUS_RATES = (6, 12, 18)  # output stride 16
LOW_LEVEL_CHANNELS = 48


class DeepLabV3Plus(nn.Module):
    """(N, 3, H, W) -> scores (N, classes, H, W) for any H, W >= 1."""

    variant = "deeplabv3plus_resnet50"
    stride = 4  # the decoder's map

    def __init__(self, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                 heads: Mapping[str, int] | None = None) -> None:
        super().__init__()
        num_classes = one_head(self.variant, num_classes, heads, in_channels)
        as_torchvision_builds_it(self.variant, width, in_channels)
        aspp = importlib.import_module("torchvision.models.segmentation.deeplabv3").ASPP
        self.net = nn.Module()  # torchvision's layout: net.backbone, ...
        self.net.backbone = resnet50_features((False, False, True),
                                              {"layer1": "low", "layer4": "out"})
        self.net.aspp = aspp(2048, list(ATROUS_RATES))
        self.net.low = nn.Sequential(*conv_bn_relu(256, LOW_LEVEL_CHANNELS, 1))
        self.net.decoder = nn.Sequential(*conv_bn_relu(256 + LOW_LEVEL_CHANNELS, 256, 3),
                                         *conv_bn_relu(256, 256, 3),
                                         nn.Conv2d(256, num_classes, 1))
        self.config = FCNConfig(variant=self.variant, heads={SINGLE_HEAD: num_classes},
                                width=1.0, in_channels=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, 3)
        f = self.net.backbone(x)
        low = self.net.low(f["low"])
        high = F.interpolate(self.net.aspp(f["out"]), size=low.shape[-2:], mode="bilinear",
                             align_corners=False)
        scores = self.net.decoder(torch.cat([high, low], 1))
        return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)


def deeplabv3plus_resnet50(*, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                           heads: Mapping[str, int] | None = None) -> DeepLabV3Plus:
    """DeepLabv3+ on ResNet-50 (see the module's note); no weights downloaded."""
    return DeepLabV3Plus(num_classes=num_classes, width=width, in_channels=in_channels,
                         heads=heads)
