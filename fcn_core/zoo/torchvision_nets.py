"""torchvision's segmentation nets as nets of the table: FCN-ResNet, DeepLabv3, LR-ASPP.

torchvision builds them (a well-kept library; not rewritten here) with no weights at all:
``weights=None`` and ``weights_backbone=None`` always, so building one never downloads
(users' clusters are often air-gapped; backbone weights come from a local state dict).
Their forward returns ``{"out", "aux"}``; here ``forward`` gives the ``out`` scores like every
net of the table, and ``scores_and_aux`` both (the auxiliary classifier, where torchvision has
one, is for the training loss: in training mode ``forward`` gives ``{"out", "aux"}``). They
read what the pipeline feeds every net: BGR in [0, 255]
minus the dataset mean.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch
from torch import nn

from fcn_core.fcn import SINGLE_HEAD, FCNConfig
from fcn_core.zoo.checks import as_torchvision_builds_it, check_input, one_head

AUX = "aux"  # in training mode, forward gives {"out": scores, "aux": the auxiliary scores}
AUX_WEIGHT = 0.5  # torchvision's references/segmentation: loss = out + 0.5 * aux
# name -> output stride (loss sampling's cells)
STRIDES = {"fcn_resnet50": 8, "fcn_resnet101": 8, "deeplabv3_resnet50": 8,
           "deeplabv3_resnet101": 8, "deeplabv3_mobilenet_v3_large": 16,
           "lraspp_mobilenet_v3_large": 8}
# name -> whether torchvision gives it an auxiliary classifier
BUILDERS: dict[str, bool] = {
    "fcn_resnet50": True, "fcn_resnet101": True,
    "deeplabv3_resnet50": True, "deeplabv3_resnet101": True,
    "deeplabv3_mobilenet_v3_large": True, "lraspp_mobilenet_v3_large": False,
}


class TorchvisionSegmentation(nn.Module):
    """(N, 3, H, W) -> scores (N, classes, H, W) for any H, W >= 1 (torchvision upsamples its
    output to the input size)."""

    def __init__(self, name: str, num_classes: int = 21, width: float = 1.0,
                 in_channels: int = 3, heads: Mapping[str, int] | None = None,
                 aux_loss: bool | None = None) -> None:
        super().__init__()
        if name not in BUILDERS:
            raise ValueError(f"name must be one of {', '.join(BUILDERS)}, got name={name!r}")
        num_classes = one_head(name, num_classes, heads, in_channels)
        as_torchvision_builds_it(name, width, in_channels)
        has_aux = BUILDERS[name]
        aux = has_aux if aux_loss is None else bool(aux_loss)
        if aux and not has_aux:
            raise ValueError(f"{name} has no auxiliary classifier (aux_loss must be false)")
        build = getattr(importlib.import_module("torchvision.models.segmentation"), name)
        kwargs = {"aux_loss": aux} if has_aux else {}
        self.net = build(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
        self.variant, self.stride = name, STRIDES[name]
        self.config = FCNConfig(variant=name, heads={SINGLE_HEAD: num_classes}, width=1.0,
                                in_channels=3)

    def scores_and_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scores and, with an auxiliary classifier, its scores (both input-sized)."""
        check_input(x, 3)
        out = self.net(x)
        return out["out"], out.get("aux")

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The scores; in training mode with an auxiliary classifier ``{"out", "aux"}`` (the
        training step weighs the aux loss by AUX_WEIGHT; DDP sees both in one forward)."""
        out, aux = self.scores_and_aux(x)
        return {SINGLE_HEAD: out, AUX: aux} if self.training and aux is not None else out


def builder(name: str):  # noqa: ANN201  (a build_model builder for one torchvision net)
    def build(*, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
              heads: Mapping[str, int] | None = None) -> TorchvisionSegmentation:
        return TorchvisionSegmentation(name, num_classes=num_classes, width=width,
                                       in_channels=in_channels, heads=heads)

    build.__name__ = name
    build.__doc__ = f"torchvision's {name}, without weights (none are downloaded)."
    return build


fcn_resnet50 = builder("fcn_resnet50")
fcn_resnet101 = builder("fcn_resnet101")
deeplabv3_resnet50 = builder("deeplabv3_resnet50")
deeplabv3_resnet101 = builder("deeplabv3_resnet101")
deeplabv3_mobilenet_v3_large = builder("deeplabv3_mobilenet_v3_large")
lraspp_mobilenet_v3_large = builder("lraspp_mobilenet_v3_large")


# What each net's backbone is in torchvision's classification state dict: its key prefix there
# (the classifier left out) and its first convolution and batch norm (to re-express for BGR).
_BACKBONE = {"resnet": ("", ("fc.",), "conv1.weight", "bn1.running_mean"),
             "mobilenet_v3": ("features.", ("classifier.",), "0.0.weight", "0.1.running_mean")}


def backbone_kind(name: str) -> str:
    return "mobilenet_v3" if "mobilenet" in name else "resnet"


def transplant_torchvision_backbone(model: TorchvisionSegmentation,
                                    state_dict: Mapping[str, torch.Tensor], *,
                                    mean_bgr: tuple[float, float, float] | None = None
                                    ) -> list[str]:
    """Load a local torchvision classification state dict (``resnet50()``, ``resnet101()`` or
    ``mobilenet_v3_large()``) into the net's backbone, its classifier dropped. With
    ``mean_bgr`` the first convolution is re-expressed for BGR in [0, 255] minus the mean (its
    shift folded into the batch norm's running mean, as for GoogLeNet). Returns the keys
    loaded; SurgeryError when the state dict does not fit."""
    from fcn_core.surgery import SurgeryError, _bgr_conv1_1

    prefix, dropped, conv, bn = _BACKBONE[backbone_kind(model.variant)]
    backbone = model.net.backbone
    own = backbone.state_dict()
    wanted = {k[len(prefix):]: v for k, v in state_dict.items()
              if k.startswith(prefix) and not k.startswith(dropped)}
    wanted = {k: v for k, v in wanted.items() if k in own}
    missing = sorted(set(own) - set(wanted))
    if missing:
        raise SurgeryError(f"the state dict lacks {len(missing)} backbone entries of "
                           f"{model.variant}, e.g. {missing[0]} (give torchvision's "
                           f"{'mobilenet_v3_large' if 'mobilenet' in model.variant else 'resnet'}"
                           " classification weights)")
    for k, v in wanted.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise SurgeryError(f"{k} {tuple(v.shape)} does not fit {tuple(own[k].shape)} in "
                               f"{model.variant}")
    if mean_bgr is not None:
        w = wanted[conv]
        w_bgr, shift = _bgr_conv1_1(w, torch.zeros(w.shape[0], dtype=w.dtype), mean_bgr)
        wanted[conv] = w_bgr
        wanted[bn] = wanted[bn] - shift  # BN(conv(x_tv)) = BN(conv'(x_bgr) + shift)
    backbone.load_state_dict(wanted)
    return sorted(wanted)
