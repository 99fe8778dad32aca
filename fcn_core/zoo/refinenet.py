"""RefineNet (Lin, Milan, Shen, Reid, CVPR 2017) on ResNet-50: 4-cascaded RefineNet.

torchvision's ResNet-50 (not dilated; built without weights) gives four maps, layer1..layer4
at strides 4, 8, 16 and 32. Each is adapted by a 3x3 convolution to 512 channels (layer4) or
256 (the others), as the paper's input paths. RefineNet-4 refines layer4 alone; RefineNet-3
fuses layer3 with RefineNet-4's output, and so on down to RefineNet-1 at stride 4. A RefineNet
block, as the paper's Fig. 3:

- **residual conv units** (RCU: ReLU, 3x3 conv, ReLU, 3x3 conv, plus the input), two per
  input path;
- **multi-resolution fusion**: a 3x3 conv on each path to the smallest channel count,
  upsampled bilinearly to the largest map, summed (skipped with one path);
- **chained residual pooling** (CRP): ReLU, then a chain of two blocks (5x5 max pool at
  stride 1, 3x3 conv), each block's output added to the sum;
- one more RCU at the output.

Two RCUs follow RefineNet-1, then a 1x1 conv scores the classes at stride 4, upsampled
bilinearly to the input. The decoder has no batch norm (the paper's); the backbone's batch
norms are torchvision's. ``backbone_weights`` (a torchvision ``resnet50()`` state dict) loads
into ``net.backbone`` like the other ResNet nets'
(``fcn_core.zoo.torchvision_nets.transplant_torchvision_backbone``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fcn_core.fcn import SINGLE_HEAD, FCNConfig
from fcn_core.zoo.checks import as_torchvision_builds_it, check_input, one_head, resnet50_features

LEVELS = ("layer1", "layer2", "layer3", "layer4")
RESNET50_CHANNELS = (256, 512, 1024, 2048)
PATH_CHANNELS = (256, 256, 256, 512)  # the paper: 512 for RefineNet-4, 256 for the others
CRP_BLOCKS = 2  # pooling blocks in a chained residual pooling (the paper's Fig. 3d)
RCUS_PER_PATH = 2


def _conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)


class ResidualConvUnit(nn.Module):
    """ReLU, 3x3 conv, ReLU, 3x3 conv, plus the input (the pre-activation unit of ResNet,
    without batch norm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class ChainedResidualPooling(nn.Module):
    """ReLU, then ``blocks`` x (5x5 max pool at stride 1, 3x3 conv) in a chain, every block's
    output added to the running sum."""

    def __init__(self, channels: int, blocks: int = CRP_BLOCKS) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(5, stride=1, padding=2)
        self.convs = nn.ModuleList([_conv3x3(channels, channels) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        total, path = x, x
        for conv in self.convs:
            path = conv(self.pool(path))
            total = total + path
        return total


class RefineNetBlock(nn.Module):
    """Inputs, coarsest last: RCUs per path, multi-resolution fusion to the first (finest)
    input's size and the smallest channel count, chained residual pooling, an output RCU."""

    def __init__(self, in_channels: Sequence[int]) -> None:
        super().__init__()
        out = min(in_channels)
        self.out_channels = out
        self.rcus = nn.ModuleList([
            nn.Sequential(*(ResidualConvUnit(c) for _ in range(RCUS_PER_PATH)))
            for c in in_channels])
        # Fusion convs only where there is something to fuse (RefineNet-4 has one path).
        self.fuse = nn.ModuleList([_conv3x3(c, out) for c in in_channels]) \
            if len(in_channels) > 1 else nn.ModuleList()
        self.crp = ChainedResidualPooling(out)
        self.output = ResidualConvUnit(out)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        paths = [rcu(x) for rcu, x in zip(self.rcus, xs, strict=True)]
        if self.fuse:
            size = paths[0].shape[-2:]
            fused = self.fuse[0](paths[0])
            for conv, p in zip(self.fuse[1:], paths[1:], strict=True):
                fused = fused + F.interpolate(conv(p), size=size, mode="bilinear",
                                              align_corners=False)
        else:
            fused = paths[0]
        return self.output(self.crp(fused))


class RefineNet(nn.Module):
    """(N, 3, H, W) -> scores (N, classes, H, W) for any H, W >= 1."""

    variant = "refinenet_resnet50"
    stride = 4  # RefineNet-1's map

    def __init__(self, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                 heads: Mapping[str, int] | None = None) -> None:
        super().__init__()
        num_classes = one_head(self.variant, num_classes, heads, in_channels)
        as_torchvision_builds_it(self.variant, width, in_channels)
        self.net = nn.Module()  # torchvision's layout: net.backbone, ...
        self.net.backbone = resnet50_features((False, False, False), {n: n for n in LEVELS})
        self.net.adapt = nn.ModuleList([_conv3x3(c, p) for c, p in
                                        zip(RESNET50_CHANNELS, PATH_CHANNELS, strict=True)])
        # refine[3] is RefineNet-4 (layer4 alone); refine[i] fuses level i with refine[i+1].
        blocks = [RefineNetBlock([PATH_CHANNELS[3]])]
        for c in reversed(PATH_CHANNELS[:3]):
            blocks.insert(0, RefineNetBlock([c, blocks[0].out_channels]))
        self.net.refine = nn.ModuleList(blocks)
        self.net.head = nn.Sequential(ResidualConvUnit(PATH_CHANNELS[0]),
                                      ResidualConvUnit(PATH_CHANNELS[0]), nn.Dropout(0.5),
                                      nn.Conv2d(PATH_CHANNELS[0], num_classes, 1))
        self.config = FCNConfig(variant=self.variant, heads={SINGLE_HEAD: num_classes},
                                width=1.0, in_channels=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, 3)
        f = self.net.backbone(x)
        paths = [adapt(f[n]) for adapt, n in zip(self.net.adapt, LEVELS, strict=True)]
        y = self.net.refine[3](paths[3])
        for i in (2, 1, 0):
            y = self.net.refine[i](paths[i], y)
        scores = self.net.head(y)
        return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)


def refinenet_resnet50(*, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                       heads: Mapping[str, int] | None = None) -> RefineNet:
    """4-cascaded RefineNet on ResNet-50 (see the module's note); no weights downloaded."""
    return RefineNet(num_classes=num_classes, width=width, in_channels=in_channels, heads=heads)
