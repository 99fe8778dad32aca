"""FCN-32s on an AlexNet trunk (the paper's Table 1, reference voc-fcn-alexnet).

Geometry as the reference net: conv1 11x11 stride 4 padded by 100, 3x3 stride-2 pools in ceil
mode (Caffe), fc6 a 6x6 convolution, fc7 1x1, score_fr 1x1 (zero at start), upscore a fixed
bilinear 63x63 deconvolution of stride 32, and the crop derived by the coordinate map (18, as
the reference). Channels are torchvision's AlexNet (64, 192, 384, 256, 256; fc 4096): the
single-tower variant of "One weird trick" (Krizhevsky 2014), without the local response
normalisation and the two groups of the Caffe model the paper used, so ``transplant_alexnet``
loads a local torchvision ``alexnet()`` state dict. ``width`` scales every layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fcn_core.fcn import Coord, coord_through
from fcn_core.stride32 import Stride32FCN
from fcn_core.vgg import scaled

ALEXNET_CHANNELS = (64, 192, 384, 256, 256)
ALEXNET_FC_CHANNELS = 4096
CONV1_PAD = 100  # the reference's padding (torchvision's AlexNet: 2)
# torchvision alexnet state-dict keys -> this net's
_CONVS = {"features.0": "features.0", "features.3": "features.3", "features.6": "features.6",
          "features.8": "features.8", "features.10": "features.10"}


class FCNAlexNet(Stride32FCN):
    """FCN-32s on AlexNet: (N, C, H, W) -> scores (N, classes, H, W) for any H, W >= 1 (a dict
    of them with several ``heads``)."""

    variant = "fcn32s_alexnet"

    def __init__(self, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                 heads: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self._check(num_classes, width, in_channels, heads)
        c1, c2, c3, c4, c5 = (scaled(c, width) for c in ALEXNET_CHANNELS)
        cfc = scaled(ALEXNET_FC_CHANNELS, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 11, stride=4, padding=CONV1_PAD), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, ceil_mode=True))
        self.fc6 = nn.Conv2d(c5, cfc, 6)
        self.relu6, self.drop6 = nn.ReLU(inplace=True), nn.Dropout(0.5)
        self.fc7 = nn.Conv2d(cfc, cfc, 1)
        self.relu7, self.drop7 = nn.ReLU(inplace=True), nn.Dropout(0.5)
        for m in [*self.features, self.fc6, self.fc7]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self._add_heads(cfc)

    def score_coord(self) -> Coord:
        return coord_through([*self.features, self.fc6, self.fc7])

    def score_input(self, x: torch.Tensor) -> torch.Tensor:
        """fc7's output, the map score_fr reads."""
        x = self.features(x)
        return self.drop7(self.relu7(self.fc7(self.drop6(self.relu6(self.fc6(x))))))


def fcn32s_alexnet(*, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                   heads: Mapping[str, int] | None = None) -> FCNAlexNet:
    """FCN-32s on AlexNet (the paper's FCN-AlexNet)."""
    return FCNAlexNet(num_classes=num_classes, width=width, in_channels=in_channels,
                      heads=heads)


def transplant_alexnet(model: FCNAlexNet, state_dict: Mapping[str, torch.Tensor], *,
                       mean_bgr: Sequence[float] | None = None) -> list[str]:
    """Load a torchvision ``alexnet()`` state dict: the five convolutions as they are, the
    classifier's two hidden Linear layers as fc6 (6x6) and fc7 (1x1) convolutions, the 1000-way
    classifier dropped (score_fr replaces it). With ``mean_bgr``, conv1 is re-expressed for
    FCN's input (BGR in [0, 255] minus the mean) as for VGG16. Returns what was copied."""
    from fcn_core.surgery import SurgeryError, _bgr_conv1_1

    copied = []
    with torch.no_grad():
        for src, dst in _CONVS.items():
            conv = dict(model.named_modules())[dst]
            w, b = state_dict[f"{src}.weight"], state_dict[f"{src}.bias"]
            if src == "features.0" and mean_bgr is not None:
                w, b = _bgr_conv1_1(w, b, mean_bgr)
            if tuple(w.shape) != tuple(conv.weight.shape):
                raise SurgeryError(f"{src}.weight {tuple(w.shape)} does not fit {dst} "
                                   f"{tuple(conv.weight.shape)} (width {model.width})")
            conv.weight.copy_(w)
            conv.bias.copy_(b)
            copied.append(f"{src} -> {dst}")
        for src, conv in (("classifier.1", model.fc6), ("classifier.4", model.fc7)):
            w = state_dict[f"{src}.weight"]
            if w.numel() != conv.weight.numel():
                raise SurgeryError(f"{src}.weight {tuple(w.shape)} does not fit "
                                   f"{tuple(conv.weight.shape)} (width {model.width})")
            conv.weight.copy_(w.view_as(conv.weight))
            conv.bias.copy_(state_dict[f"{src}.bias"])
            copied.append(f"{src} -> {'fc6' if conv is model.fc6 else 'fc7'}")
    return copied
