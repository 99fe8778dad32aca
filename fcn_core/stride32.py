"""What the FCN-32s nets on other trunks share (the paper's Table 1: AlexNet, GoogLeNet).

A subclass builds its trunk and says which map score_fr reads (``score_input``) and where
that map sits in the input (``score_coord``, a coordinate map); this base adds one head per
output (score_fr 1x1, zero at start; a fixed bilinear 63x63 deconvolution of stride 32: an odd
kernel keeps the crop a whole number), derives the crop and crops to the input.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fcn_core.fcn import (
    IDENTITY,
    SINGLE_HEAD,
    Coord,
    FCNConfig,
    _deconv,
    _score,
    coord_step,
    crop,
    crop_offset,
)
from fcn_core.vgg import check_width


class Stride32Head(nn.Module):
    def __init__(self, num_classes: int, c_in: int) -> None:
        super().__init__()
        self.score_fr = _score(c_in, num_classes)
        self.upscore = _deconv(num_classes, 63, 32, learnable=False)


class Stride32FCN(nn.Module):
    """(N, C, H, W) -> scores (N, classes, H, W) for any H, W >= 1 (a dict of them with
    several ``heads``). Subclasses call ``_check`` first and ``_add_heads`` last."""

    stride = 32
    variant = ""  # the fcn_core.models name (checkpoints record it to rebuild the net)

    def _check(self, num_classes: int, width: float, in_channels: int,
               heads: Mapping[str, int] | None) -> None:
        check_width(width)
        if not (isinstance(in_channels, int) and in_channels >= 1):
            raise ValueError(f"in_channels must be an int >= 1, got in_channels={in_channels!r}")
        self.heads_spec = {SINGLE_HEAD: num_classes} if heads is None else dict(heads)
        for name, n in self.heads_spec.items():
            if not (isinstance(n, int) and n >= 1):
                raise ValueError(f"num_classes must be an int >= 1, got num_classes={n!r} "
                                 f"(head {name!r})")
        self.width, self.in_channels = float(width), in_channels
        # What a checkpoint's ``arch`` records (as FCN's config): serving.build_net reads it.
        self.config = FCNConfig(variant=self.variant, heads=dict(self.heads_spec),
                                width=self.width, in_channels=in_channels)

    def _add_heads(self, channels: int) -> None:
        self.heads = nn.ModuleDict({name: Stride32Head(n, channels)
                                    for name, n in self.heads_spec.items()})
        head = next(iter(self.heads.values()))
        self.offsets = {"score": crop_offset(coord_step(head.upscore, self.score_coord()),
                                             IDENTITY)}

    def score_coord(self) -> Coord:
        raise NotImplementedError

    def score_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got {shape}")
        h, w = x.shape[-2:]
        f = self.score_input(x)
        out = {name: crop(head.upscore(head.score_fr(f)), self.offsets["score"], h, w)
               for name, head in self.heads.items()}
        return out[SINGLE_HEAD] if list(out) == [SINGLE_HEAD] else out
