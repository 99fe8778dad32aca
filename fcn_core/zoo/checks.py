"""The argument checks every net of the zoo shares (one head, channels, input shape)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fcn_core.fcn import SINGLE_HEAD


def one_head(name: str, num_classes: int, heads: Mapping[str, int] | None,
             in_channels: int) -> int:
    """The class count of a one-head net (``heads`` may name only that head); ValueError
    for what the net cannot be."""
    if heads is not None:
        if list(heads) != [SINGLE_HEAD]:
            raise ValueError(f"{name} has one score head, got heads={dict(heads)!r}")
        num_classes = heads[SINGLE_HEAD]
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes must be an int >= 1, got num_classes={num_classes!r}")
    if not (isinstance(in_channels, int) and in_channels >= 1):
        raise ValueError(f"in_channels must be an int >= 1, got in_channels={in_channels!r}")
    return num_classes


def as_torchvision_builds_it(name: str, width: float, in_channels: int) -> None:
    """A net on torchvision's classification nets has no width multiplier and reads RGB."""
    if width != 1.0:
        raise ValueError(f"{name} is torchvision's net, which has no width multiplier: "
                         f"width must be 1.0, got width={width!r}")
    if in_channels != 3:
        raise ValueError(f"{name} reads 3-channel images, got in_channels={in_channels!r}")


def check_input(x: object, channels: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be (N, {channels}, H, W), got {shape}")
