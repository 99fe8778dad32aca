"""FCN-32s on a GoogLeNet trunk (the paper's Table 1).

torchvision's GoogLeNet (Inception v1 with batch normalisation, as torchvision builds it) through
inception5b; the final average pooling, dropout, classifier and the auxiliary heads are
discarded, as the paper discards the pooling and classifier. score_fr (1x1, zero at start)
scores the 1024 channels at stride 32 and a fixed bilinear 63x63 deconvolution of stride 32
upsamples them. There is no reference net for this one: conv1 is padded by 100 instead of 3 so
any input size >= 1 gives an output (as the reference pads VGG16's conv1_1), and the crop that
aligns the output with the input (106) is derived by the coordinate map, the inception modules
being pointwise for it (every branch keeps the size and the centre). Layer names are
torchvision's, so ``transplant_googlenet`` loads a local ``googlenet()`` state dict. ``width``
scales every layer.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fcn_core.fcn import IDENTITY, Coord, coord_step
from fcn_core.stride32 import Stride32FCN
from fcn_core.vgg import scaled

CONV1_PAD = 100
# torchvision's inception blocks: (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj)
_BLOCKS = {
    "inception3a": (64, 96, 128, 16, 32, 32), "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64), "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64), "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128), "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}
_ORDER = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b",
          "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d",
          "inception4e", "maxpool4", "inception5a", "inception5b")


class FCNGoogLeNet(Stride32FCN):
    """FCN-32s on GoogLeNet: (N, C, H, W) -> scores (N, classes, H, W) for any H, W >= 1."""

    variant = "fcn32s_googlenet"

    def __init__(self, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                 heads: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self._check(num_classes, width, in_channels, heads)
        tv = importlib.import_module("torchvision.models.googlenet")
        conv, inception = tv.BasicConv2d, tv.Inception

        def c(n: int) -> int:
            return scaled(n, width)

        self.conv1 = conv(in_channels, c(64), kernel_size=7, stride=2, padding=CONV1_PAD)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = conv(c(64), c(64), kernel_size=1)
        self.conv3 = conv(c(64), c(192), kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        channels = c(192)
        for name, spec in _BLOCKS.items():
            setattr(self, name, inception(channels, *(c(v) for v in spec)))
            channels = c(spec[0]) + c(spec[2]) + c(spec[4]) + c(spec[5])
        self.channels = channels  # 1024 at width 1
        self._add_heads(channels)

    def trunk(self) -> list[nn.Module]:
        return [getattr(self, n) for n in _ORDER]

    def score_coord(self) -> Coord:
        coord = IDENTITY
        for m in self.trunk():
            if isinstance(m, nn.MaxPool2d):
                coord = coord_step(m, coord)
            elif isinstance(getattr(m, "conv", None), nn.Conv2d):  # BasicConv2d
                coord = coord_step(m.conv, coord)
            # an Inception block: every branch keeps size and centre (pointwise)
        return coord

    def score_input(self, x: torch.Tensor) -> torch.Tensor:
        """inception5b's output (N, 1024 w, ~H/32, ~W/32), the map score_fr reads."""
        for m in self.trunk():
            x = m(x)
        return x


def fcn32s_googlenet(*, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                     heads: Mapping[str, int] | None = None) -> FCNGoogLeNet:
    """FCN-32s on GoogLeNet (the paper's FCN-GoogLeNet)."""
    return FCNGoogLeNet(num_classes=num_classes, width=width, in_channels=in_channels,
                        heads=heads)


def transplant_googlenet(model: FCNGoogLeNet, state_dict: Mapping[str, torch.Tensor], *,
                         mean_bgr: Sequence[float] | None = None) -> list[str]:
    """Load a torchvision ``googlenet()`` state dict (its trunk through inception5b; the
    classifier and auxiliary heads are not used). The net then reads what torchvision's reads
    with ``transform_input=False``; with ``mean_bgr``, conv1 is re-expressed for FCN's input
    (BGR in [0, 255] minus the mean), its shift folded into conv1's batch-norm mean."""
    from fcn_core.surgery import SurgeryError, _bgr_conv1_1

    own = model.state_dict()
    wanted = {k: v for k, v in state_dict.items() if k.split(".")[0] in _ORDER}
    missing = sorted(k for k in own if k.split(".")[0] in _ORDER and k not in wanted)
    if missing:
        raise SurgeryError(f"the state dict lacks {len(missing)} trunk entries, e.g. "
                           f"{missing[0]}")
    for k, v in wanted.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise SurgeryError(f"{k} {tuple(v.shape)} does not fit {tuple(own[k].shape)} "
                               f"(width {model.width})")
    wanted = dict(wanted)
    if mean_bgr is not None:
        w = wanted["conv1.conv.weight"]
        w_bgr, shift = _bgr_conv1_1(w, torch.zeros(w.shape[0], dtype=w.dtype), mean_bgr)
        wanted["conv1.conv.weight"] = w_bgr
        # conv1 has no bias: BN(conv(x_tv)) = BN(conv'(x_bgr) + shift), so its mean moves
        wanted["conv1.bn.running_mean"] = wanted["conv1.bn.running_mean"] - shift
    model.load_state_dict(wanted, strict=False)
    return sorted(wanted)
