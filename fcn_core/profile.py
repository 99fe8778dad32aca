"""Per-layer output shapes, parameters and multiply-accumulates of a net on one input size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def learned_params(model: nn.Module) -> int:
    """Parameters as the paper counts them (FCN-VGG16: 134M): all but the fixed bilinear
    upsampling's, which is an interpolation (C x C kernels, 1.8M at FCN-32s's 64x64 upscore
    for 21 classes), not something learned. A deconvolution that learns counts."""
    from fcn_core.bilinear import Deconvolution

    fixed = {id(m.weight) for m in model.modules()
             if isinstance(m, Deconvolution) and not m.weight.requires_grad}
    return sum(p.numel() for p in model.parameters() if id(p) not in fixed)


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
    if isinstance(m, nn.ConvTranspose2d):  # a fixed diagonal Deconvolution runs per class
        kh, kw = m.kernel_size
        return inp.numel() * (m.out_channels // getattr(m, "ran_groups", m.groups)) * kh * kw
    return 0


@torch.no_grad()
def layer_stats(model: nn.Module, x: torch.Tensor) -> list[LayerStat]:
    """Run ``model`` on ``x`` once and record every conv, deconv and pool in call order."""
    stats: list[LayerStat] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d)):
            def hook(mod, args, out, name=name):
                out = out[0] if isinstance(out, tuple) else out  # a pool with its indices
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


@dataclass(frozen=True)
class TrainFlops:
    forward: int  # 2 x MAC of every conv and deconv
    input_grad: int  # 2 x MAC of each layer whose input needs a gradient
    weight_grad: int  # 2 x MAC of each layer whose weight is trained

    @property
    def total(self) -> int:
        return self.forward + self.input_grad + self.weight_grad


def train_flops(model: nn.Module, x: torch.Tensor) -> TrainFlops:
    """FLOPs of one training step (forward + backward) counted as the backward really runs:
    a layer's weight gradient only when its weight is trained (frozen deconvolutions have
    none), its input gradient only when its input needs one (conv1_1's input, the image,
    does not). Not "3 x forward" for every layer, which overstates a frozen net."""
    fwd = igrad = wgrad = 0
    hooks = []

    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal fwd, igrad, wgrad
        flops = 2 * _macs(mod, args[0], out)
        fwd += flops
        igrad += flops if args[0].requires_grad else 0
        wgrad += flops if mod.weight.requires_grad else 0

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return TrainFlops(fwd, igrad, wgrad)
