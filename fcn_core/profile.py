"""Per-layer output shapes, parameters and multiply-accumulates of a net on one input size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerStat:
    name: str
    kind: str
    out_shape: tuple[int, ...]
    params: int
    macs: int  # multiply-accumulates for the whole batch


def _macs(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return out.numel() * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, nn.ConvTranspose2d):
        kh, kw = m.kernel_size
        return inp.numel() * (m.out_channels // m.groups) * kh * kw
    return 0


@torch.no_grad()
def layer_stats(model: nn.Module, x: torch.Tensor) -> list[LayerStat]:
    """Run ``model`` on ``x`` once and record every conv, deconv and pool in call order."""
    stats: list[LayerStat] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d)):
            def hook(mod, args, out, name=name):
                stats.append(LayerStat(
                    name, type(mod).__name__, tuple(out.shape),
                    sum(p.numel() for p in mod.parameters(recurse=False)),
                    _macs(mod, args[0], out)))
            hooks.append(m.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return stats


def total_macs(model: nn.Module, x: torch.Tensor) -> int:
    return sum(s.macs for s in layer_stats(model, x))
