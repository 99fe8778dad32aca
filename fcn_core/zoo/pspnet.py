"""PSPNet (Zhao, Shi, Qi, Wang, Jia, CVPR 2017) on a dilated ResNet-50.

torchvision's ResNet-50 with layer3 and layer4 dilated (output stride 8), built without
weights; the pyramid pooling module averages layer4's map into 1x1, 2x2, 3x3 and 6x6 bins,
reduces each to 512 channels (1x1 conv, batch norm, ReLU), upsamples them bilinearly back and
concatenates them with the map (2048 + 4 x 512 channels); a 3x3 conv (512, BN, ReLU), dropout
0.1 and a 1x1 conv score the classes, upsampled bilinearly to the input. The auxiliary head on
layer3 (3x3 conv 256, BN, ReLU, dropout 0.1, 1x1) adds 0.4 x its loss in training, as the
paper. ``backbone_weights`` (a torchvision ``resnet50()`` state dict) loads like the other
ResNet nets' (``fcn_core.zoo.torchvision_nets.transplant_torchvision_backbone``).
"""

from __future__ import annotations

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
from fcn_core.zoo.torchvision_nets import AUX

BINS = (1, 2, 3, 6)
AUX_WEIGHT = 0.4  # the paper's auxiliary loss weight


class PyramidPooling(nn.Module):
    """Average-pool the map into each of ``bins`` x bins cells, reduce, upsample, concatenate."""

    def __init__(self, c_in: int, bins: tuple[int, ...] = BINS, c_bin: int = 512) -> None:
        super().__init__()
        self.bins = bins
        self.stages = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *conv_bn_relu(c_in, c_bin, 1)) for b in bins])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x, *(F.interpolate(s(x), size=size, mode="bilinear",
                                             align_corners=False) for s in self.stages)], 1)


class PSPNet(nn.Module):
    """(N, 3, H, W) -> scores (N, classes, H, W) for any H, W >= 1."""

    variant = "pspnet_resnet50"
    stride = 8
    aux_weight = AUX_WEIGHT

    def __init__(self, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                 heads: Mapping[str, int] | None = None) -> None:
        super().__init__()
        num_classes = one_head(self.variant, num_classes, heads, in_channels)
        as_torchvision_builds_it(self.variant, width, in_channels)
        self.net = nn.Module()  # torchvision's layout: net.backbone, ...
        self.net.backbone = resnet50_features((False, True, True), {"layer3": AUX, "layer4": "out"})
        self.net.ppm = PyramidPooling(2048)
        self.net.classifier = nn.Sequential(*conv_bn_relu(2048 + len(BINS) * 512, 512, 3),
                                            nn.Dropout2d(0.1), nn.Conv2d(512, num_classes, 1))
        self.net.aux_classifier = nn.Sequential(*conv_bn_relu(1024, 256, 3), nn.Dropout2d(0.1),
                                                nn.Conv2d(256, num_classes, 1))
        self.config = FCNConfig(variant=self.variant, heads={SINGLE_HEAD: num_classes},
                                width=1.0, in_channels=3)

    def scores_and_aux(self, x: torch.Tensor, aux: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scores and (with ``aux``) the auxiliary head's, both input-sized."""
        check_input(x, 3)
        size = x.shape[-2:]

        def up(t: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

        f = self.net.backbone(x)
        out = up(self.net.classifier(self.net.ppm(f["out"])))
        return out, up(self.net.aux_classifier(f[AUX])) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The scores; in training mode ``{"out", "aux"}`` (the step weighs aux by 0.4)."""
        out, aux = self.scores_and_aux(x, aux=self.training)
        return {SINGLE_HEAD: out, AUX: aux} if aux is not None else out


def pspnet_resnet50(*, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                    heads: Mapping[str, int] | None = None) -> PSPNet:
    """PSPNet on a dilated ResNet-50 (see the module's note); no weights downloaded."""
    return PSPNet(num_classes=num_classes, width=width, in_channels=in_channels, heads=heads)
