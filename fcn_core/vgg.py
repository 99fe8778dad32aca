"""VGG16 trunk for FCN, with state-dict keys that match torchvision's ``vgg16().features``.

The FCN trunk differs from the classification net in two places only, both from the
reference Caffe nets: conv1_1 is padded by 100 (so that any input, however small, survives
the 32x downsampling and the 7x7 fc6) and max-pools round up (Caffe's ceil mode).
"""

from __future__ import annotations

import torch
from torch import nn

# (layer name, index in torchvision's vgg16().features); ReLUs sit at index + 1.
VGG16_CONVS: tuple[tuple[str, int], ...] = (
    ("conv1_1", 0), ("conv1_2", 2),
    ("conv2_1", 5), ("conv2_2", 7),
    ("conv3_1", 10), ("conv3_2", 12), ("conv3_3", 14),
    ("conv4_1", 17), ("conv4_2", 19), ("conv4_3", 21),
    ("conv5_1", 24), ("conv5_2", 26), ("conv5_3", 28),
)
VGG16_POOLS: tuple[tuple[str, int], ...] = (
    ("pool1", 4), ("pool2", 9), ("pool3", 16), ("pool4", 23), ("pool5", 30),
)
# The reference's name of each conv and pool of the trunk, by its index in ``features``.
VGG16_NAMES: dict[int, str] = {i: name for name, i in (*VGG16_CONVS, *VGG16_POOLS)}
# Output channels of each block of the real VGG16 and of fc6/fc7.
VGG16_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
VGG16_FC_CHANNELS = 4096
_CONVS_PER_BLOCK: tuple[int, ...] = (2, 2, 3, 3, 3)


def scaled(channels: int, width: float) -> int:
    """Channel count of a layer under the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def check_width(width: float) -> None:
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be > 0 (1.0 = the real VGG16), got width={width!r}")


def vgg16_features(
    *, width: float = 1.0, in_channels: int = 3, conv1_1_pad: int = 100, ceil_mode: bool = True
) -> nn.Sequential:
    """The 31 modules of torchvision's ``vgg16().features`` with FCN's padding and pooling.

    ``conv1_1_pad=1, ceil_mode=False`` gives exactly torchvision's classification trunk.
    """
    check_width(width)
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got in_channels={in_channels!r}")
    layers: list[nn.Module] = []
    c_in = in_channels
    for block, (c_out, n_convs) in enumerate(zip(VGG16_CHANNELS, _CONVS_PER_BLOCK, strict=True)):
        c_out = scaled(c_out, width)
        for i in range(n_convs):
            pad = conv1_1_pad if (block == 0 and i == 0) else 1
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=pad), nn.ReLU(inplace=True)]
            c_in = c_out
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=ceil_mode))
    assert len(layers) == 31, len(layers)
    return nn.Sequential(*layers)


def block_channels(width: float) -> tuple[int, int, int, int, int, int]:
    """(pool1, pool2, pool3, pool4, pool5, fc7) channel counts at this width."""
    c = [scaled(x, width) for x in VGG16_CHANNELS]
    return (c[0], c[1], c[2], c[3], c[4], scaled(VGG16_FC_CHANNELS, width))


def run_features(
    features: nn.Sequential, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the trunk; return (pool3, pool4, pool5), the taps FCN's skips read."""
    pool3_idx, pool4_idx = VGG16_POOLS[2][1], VGG16_POOLS[3][1]
    pool3 = pool4 = None
    for i, layer in enumerate(features):
        x = layer(x)
        if i == pool3_idx:
            pool3 = x  # (N, 256w, ~H/8, ~W/8)
        elif i == pool4_idx:
            pool4 = x  # (N, 512w, ~H/16, ~W/16)
    assert pool3 is not None and pool4 is not None
    return pool3, pool4, x  # pool5: (N, 512w, ~H/32, ~W/32)
