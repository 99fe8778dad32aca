"""DeepLab-LargeFOV (DeepLab v1; Chen, Papandreou, Kokkinos, Murphy, Yuille, ICLR 2015).

An atrous VGG16: the 13 convolutions keep torchvision's ``vgg16().features`` indices (so its
state dict loads), every pooling is 3x3 with padding 1 (as DeepLab's), pool4 and pool5 have
stride 1 and conv5's three convolutions are dilated by 2, so the output stride is 8; then fc6,
a 3x3 convolution dilated by 12 with 1024 channels (the large field of view), fc7 1x1 with 1024
channels, each followed by ReLU and dropout 0.5, and fc8 scoring the classes. The scores (a map
of ceil(H/8) x ceil(W/8)) are upsampled bilinearly to the input. ``transplant_vgg16`` loads the
convolutions and, as DeepLab did, decimates the classifier's fc6 (4096x512x7x7 -> every 4th
filter, every 3rd tap: 1024x512x3x3) and fc7 (every 4th row and column).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fcn_core.fcn import SINGLE_HEAD, FCNConfig
from fcn_core.vgg import VGG16_CHANNELS, check_width, scaled
from fcn_core.zoo.checks import check_input, one_head

FC_CHANNELS = 1024
FC6_DILATION = 12
_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)


class DeepLabLargeFOV(nn.Module):
    """(N, C, H, W) -> scores (N, classes, H, W) for any H, W >= 1; ``coarse`` gives the
    stride-8 map before the upsampling."""

    variant = "deeplab_largefov"
    stride = 8

    def __init__(self, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                 heads: Mapping[str, int] | None = None) -> None:
        super().__init__()
        check_width(width)
        num_classes = one_head("deeplab_largefov", num_classes, heads, in_channels)
        layers: list[nn.Module] = []
        c_in = in_channels
        for block, (c, n) in enumerate(zip(VGG16_CHANNELS, _CONVS_PER_BLOCK, strict=True)):
            c_out = scaled(c, width)
            dilation = 2 if block == 4 else 1
            for _ in range(n):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation),
                           nn.ReLU(inplace=True)]
                c_in = c_out
            layers.append(nn.MaxPool2d(3, stride=2 if block < 3 else 1, padding=1))
        self.features = nn.Sequential(*layers)
        fc = scaled(FC_CHANNELS, width)
        self.fc6 = nn.Conv2d(c_in, fc, 3, padding=FC6_DILATION, dilation=FC6_DILATION)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.fc8 = nn.Conv2d(fc, num_classes, 1)
        self.drop = nn.Dropout(0.5)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc8.weight, std=0.01)  # DeepLab's fc8 initialisation
        self.config = FCNConfig(variant="deeplab_largefov", heads={SINGLE_HEAD: num_classes},
                                width=float(width), in_channels=in_channels)

    def coarse(self, x: torch.Tensor) -> torch.Tensor:
        """fc8's scores: ceil(H/8) x ceil(W/8)."""
        x = self.features(x)
        x = self.drop(F.relu(self.fc6(x)))
        x = self.drop(F.relu(self.fc7(x)))
        return self.fc8(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.config.in_channels)
        return F.interpolate(self.coarse(x), size=x.shape[-2:], mode="bilinear",
                             align_corners=True)


def deeplab_largefov(*, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                     heads: Mapping[str, int] | None = None) -> DeepLabLargeFOV:
    """DeepLab-LargeFOV (see the module's note)."""
    return DeepLabLargeFOV(num_classes=num_classes, width=width, in_channels=in_channels,
                           heads=heads)


def transplant_vgg16(model: DeepLabLargeFOV, state_dict: Mapping[str, torch.Tensor], *,
                     mean_bgr: Sequence[float] | None = None) -> list[str]:
    """Load a local torchvision ``vgg16()`` state dict: the 13 convolutions as they are (the
    first re-expressed for BGR in [0, 255] minus ``mean_bgr``), fc6 and fc7 decimated from the
    classifier as DeepLab did. Returns what was loaded."""
    from fcn_core.surgery import SurgeryError, _bgr_conv1_1

    own = model.state_dict()
    loaded = []
    with torch.no_grad():
        for k, v in state_dict.items():
            if not k.startswith("features."):
                continue
            if k not in own or tuple(v.shape) != tuple(own[k].shape):
                raise SurgeryError(f"{k} {tuple(v.shape)} does not fit the net (width "
                                   f"{model.config.width}; VGG16 weights need width 1.0)")
        w, b = state_dict["features.0.weight"], state_dict["features.0.bias"]
        if mean_bgr is not None:
            w, b = _bgr_conv1_1(w, b, mean_bgr)
        for k, v in state_dict.items():
            if k.startswith("features."):
                v = {"features.0.weight": w, "features.0.bias": b}.get(k, v)
                own[k].copy_(v)
                loaded.append(k)
        fc6 = state_dict["classifier.0.weight"].view(-1, own["fc6.weight"].shape[1], 7, 7)
        fc6 = fc6[::4, :, ::3, ::3]
        fc7 = state_dict["classifier.3.weight"][::4, ::4]
        for name, weight, bias in (("fc6", fc6, state_dict["classifier.0.bias"][::4]),
                                   ("fc7", fc7, state_dict["classifier.3.bias"][::4])):
            if weight.numel() != own[f"{name}.weight"].numel():
                raise SurgeryError(f"{name}: the decimated classifier {tuple(weight.shape)} "
                                   f"does not fit {tuple(own[f'{name}.weight'].shape)}")
            own[f"{name}.weight"].copy_(weight.reshape(own[f"{name}.weight"].shape))
            own[f"{name}.bias"].copy_(bias)
            loaded += [f"{name}.weight", f"{name}.bias"]
    return loaded
