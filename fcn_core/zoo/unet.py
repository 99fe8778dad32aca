"""U-Net (Ronneberger, Fischer, Brox 2015): a contracting and an expanding path joined by skip
concatenation.

As the paper: two 3x3 convolutions + ReLU per level (64, 128, 256, 512, 1024 channels, times
``width``), 2x2 max pooling, 2x2 up-convolutions halving the channels, the contracting path's
map concatenated before each expanding level, a final 1x1 convolution to the classes. Unlike
the paper's unpadded convolutions (which shrink the output and need the overlap-tile input),
the convolutions are padded ("same"), so the input is padded on the right and bottom to a
multiple of 16 (four poolings) and the scores are cropped back: any H, W >= 1 gives H x W.
No batch normalisation (the paper has none); He initialisation, as the paper advises.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fcn_core.fcn import SINGLE_HEAD, FCNConfig
from fcn_core.vgg import check_width, scaled
from fcn_core.zoo.checks import check_input, one_head

CHANNELS = (64, 128, 256, 512, 1024)
MULTIPLE = 2 ** (len(CHANNELS) - 1)  # the input is padded to this


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """(N, C, H, W) -> scores (N, classes, H, W) for any H, W >= 1."""

    variant = "unet"
    stride = 1  # every pixel has its own score cell (loss sampling's cells)

    def __init__(self, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                 heads: Mapping[str, int] | None = None) -> None:
        super().__init__()
        check_width(width)
        num_classes = one_head("unet", num_classes, heads, in_channels)
        c = [scaled(n, width) for n in CHANNELS]
        self.down = nn.ModuleList([_double_conv(in_channels, c[0])] +
                                  [_double_conv(c[i], c[i + 1]) for i in range(len(c) - 1)])
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.ModuleList([nn.ConvTranspose2d(c[i + 1], c[i], 2, stride=2)
                                 for i in reversed(range(len(c) - 1))])
        self.up_conv = nn.ModuleList([_double_conv(2 * c[i], c[i])
                                      for i in reversed(range(len(c) - 1))])
        self.score = nn.Conv2d(c[0], num_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.config = FCNConfig(variant="unet", heads={SINGLE_HEAD: num_classes},
                                width=float(width), in_channels=in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.config.in_channels)
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % MULTIPLE, 0, -h % MULTIPLE))  # zeros: the mean colour
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, conv in zip(self.up, self.up_conv, strict=True):
            x = conv(torch.cat([skips.pop(), up(x)], dim=1))
        return self.score(x)[..., :h, :w]


def unet(*, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
         heads: Mapping[str, int] | None = None) -> UNet:
    """U-Net with same-padded convolutions (see the module's note)."""
    return UNet(num_classes=num_classes, width=width, in_channels=in_channels, heads=heads)
