"""SegNet (Badrinarayanan, Kendall, Cipolla 2017): a VGG16-BN encoder and a mirrored decoder
that upsamples with max-unpooling, using the pooling indices the encoder stored.

Encoder: VGG16's 13 convolutions (3x3, batch norm, ReLU; 64, 128, 256, 512, 512 channels times
``width``), each block ending in a 2x2 max pooling that keeps its argmax indices. Decoder: per
block in reverse, a max-unpooling to the size the encoder's pooling saw, which puts every value
back at its argmax and zeros elsewhere, then the block's convolutions mirrored (the last one
of each block going to the next block's channels); a 1x1 convolution scores the classes. The
layer names follow torchvision's ``vgg16_bn`` for the encoder (``encoder.features``), so its
state dict loads (``transplant_vgg16_bn``). The input is padded on the right and bottom to a
multiple of 32 (five poolings) and the scores cropped back: any H, W >= 1 gives H x W.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fcn_core.fcn import SINGLE_HEAD, FCNConfig
from fcn_core.vgg import check_width, scaled
from fcn_core.zoo.checks import check_input, one_head

BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
MULTIPLE = 2 ** len(BLOCKS)


def _cbr(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SegNet(nn.Module):
    """(N, C, H, W) -> scores (N, classes, H, W) for any H, W >= 1."""

    variant = "segnet"
    stride = 1

    def __init__(self, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                 heads: Mapping[str, int] | None = None) -> None:
        super().__init__()
        check_width(width)
        num_classes = one_head("segnet", num_classes, heads, in_channels)
        blocks = [[scaled(c, width) for c in b] for b in BLOCKS]
        # The encoder as torchvision's vgg16_bn.features (pools included, same indices).
        layers: list[nn.Module] = []
        c_in = in_channels
        for b in blocks:
            for c in b:
                layers += _cbr(c_in, c)
                c_in = c
            layers.append(nn.MaxPool2d(2, 2, return_indices=True))
        self.features = nn.Sequential(*layers)
        self.unpool = nn.MaxUnpool2d(2, 2)
        decoder = []
        for i in reversed(range(len(blocks))):
            b = blocks[i]
            outs = [*b[:-1], blocks[i - 1][-1] if i > 0 else b[0]]  # mirrored channels
            mods: list[nn.Module] = []
            c_in = b[-1]
            for c in outs:
                mods += _cbr(c_in, c)
                c_in = c
            decoder.append(nn.Sequential(*mods))
        self.decoder = nn.ModuleList(decoder)
        self.score = nn.Conv2d(blocks[0][0], num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.config = FCNConfig(variant="segnet", heads={SINGLE_HEAD: num_classes},
                                width=float(width), in_channels=in_channels)

    def encode(self, x: torch.Tensor
               ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Size]]]:
        """The encoder's output and, per pooling, its argmax indices and the size it saw."""
        pools = []
        for m in self.features:
            if isinstance(m, nn.MaxPool2d):
                size = x.shape
                x, idx = m(x)
                pools.append((idx, size))
            else:
                x = m(x)
        return x, pools

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.config.in_channels)
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % MULTIPLE, 0, -h % MULTIPLE))  # zeros: the mean colour
        x, pools = self.encode(x)
        for block, (idx, size) in zip(self.decoder, reversed(pools), strict=True):
            x = block(self.unpool(x, idx, output_size=size[-2:]))
        return self.score(x)[..., :h, :w]


def segnet(*, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
           heads: Mapping[str, int] | None = None) -> SegNet:
    """SegNet on a VGG16-BN encoder (see the module's note)."""
    return SegNet(num_classes=num_classes, width=width, in_channels=in_channels, heads=heads)


def transplant_vgg16_bn(model: SegNet, state_dict: Mapping[str, torch.Tensor], *,
                        mean_bgr: Sequence[float] | None = None) -> list[str]:
    """Load a local torchvision ``vgg16_bn()`` state dict into the encoder (its classifier
    dropped); with ``mean_bgr`` the first convolution is re-expressed for BGR in [0, 255] minus
    the mean (its shift into the first batch norm's running mean). Returns the keys loaded."""
    from fcn_core.surgery import SurgeryError, _bgr_conv1_1

    own = model.features.state_dict()
    wanted = {k.removeprefix("features."): v for k, v in state_dict.items()
              if k.startswith("features.")}
    missing = sorted(set(own) - set(wanted))
    if missing:
        raise SurgeryError(f"the state dict lacks {len(missing)} encoder entries, e.g. "
                           f"features.{missing[0]} (give torchvision's vgg16_bn weights)")
    for k, v in wanted.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise SurgeryError(f"features.{k} {tuple(v.shape)} does not fit "
                               f"{tuple(own[k].shape)} (width {model.config.width})")
    wanted = {k: v for k, v in wanted.items() if k in own}
    if mean_bgr is not None:
        w, b = wanted["0.weight"], wanted["0.bias"]
        w_bgr, b_bgr = _bgr_conv1_1(w, b, mean_bgr)
        wanted["0.weight"], wanted["0.bias"] = w_bgr, b_bgr
    model.features.load_state_dict(wanted)
    return sorted(wanted)
