"""Shift-and-stitch (Long, Shelhamer, Darrell §3.2): dense output from a coarse net.

A net of output stride ``s`` run on ``f**2`` copies of its input, shifted by ``s/f`` pixels
in each direction, gives ``f**2`` coarse maps whose cells sit between each other's; interlaced
they form one map of stride ``s/f``. The paper shows the trick equals a cheaper change of the
net itself: set the stride of the last pooling layer to 1 and rarefy (dilate by ``f``) every
filter after it. ``densify`` builds that net, and tests/test_core_shift_stitch.py checks the
two agree exactly on random weights.

For the FCNs the coarse map is the last one before the final fixed upsampling (``score_fr``
for FCN-32s, ``fuse_pool4`` for 16s, ``fuse_pool3`` for 8s): ``shift_stitch_predict``
interlaces it and upsamples it bilinearly to the input, aligned by the same coordinate maps
that derive the reference crop offsets (``fcn_core.fcn.coord_step``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from fcn_core.fcn import FCN, Coord, coord_step, coord_through
from fcn_core.vgg import run_features

__all__ = ["coarse_coord", "coarse_scores", "densify", "interlace", "shift_and_stitch",
           "shift_stitch_predict"]


def interlace(maps: dict[tuple[int, int], torch.Tensor], f: int) -> torch.Tensor:
    """``out[..., y + f*i, x + f*j] = maps[(y, x)][..., i, j]`` for the ``f**2`` shifts, up to
    the last row and column every shift reaches (a shifted map may be a cell shorter: the
    interlaced map ends where the first one ends, leaving no hole)."""
    if set(maps) != {(y, x) for y in range(f) for x in range(f)}:
        raise ValueError(f"maps must hold the {f * f} shifts (y, x) with 0 <= y, x < {f}")
    h = min(y + f * m.shape[-2] for (y, _), m in maps.items())
    w = min(x + f * m.shape[-1] for (_, x), m in maps.items())
    first = maps[(0, 0)]
    out = first.new_empty((*first.shape[:-2], h, w))
    for (y, x), m in maps.items():
        rows, cols = len(range(y, h, f)), len(range(x, w, f))
        out[..., y::f, x::f] = m[..., :rows, :cols]
    return out


def shift_and_stitch(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, f: int,
                     step: int = 1) -> torch.Tensor:
    """``fn`` (a map of stride ``f * step`` in ``x``'s pixels) on ``f**2`` copies of ``x``, each
    with its first ``step * y`` rows and ``step * x`` columns removed (the content shifted up
    and left), interlaced into a map of stride ``step``."""
    if not (isinstance(f, int) and f >= 1):
        raise ValueError(f"f must be an int >= 1, got f={f!r}")
    maps = {(y, xx): fn(x[..., step * y:, step * xx:]) for y in range(f) for xx in range(f)}
    return interlace(maps, f)


def densify(net: nn.Sequential) -> nn.Sequential:
    """The net whose output equals ``shift_and_stitch(net, x, f)`` (``f`` = the stride of the
    last pooling layer): that pooling at stride 1 (its input padded with -inf at the bottom and
    right, so the windows ceil_mode keeps are kept) and every later convolution rarefied:
    dilation and padding times ``f``. Layers after the pooling must be convolutions or
    pointwise (ReLU, Dropout)."""
    layers = list(net)
    pools = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
    if not pools:
        raise ValueError("the net has no MaxPool2d to densify")
    i = pools[-1]
    pool = layers[i]
    k, s = _single(pool.kernel_size), _single(pool.stride)
    if _single(pool.padding) != 0 or _single(pool.dilation) != 1:
        raise ValueError("the last pooling layer must have padding 0 and dilation 1")
    out: list[nn.Module] = [*layers[:i], _DensePool(k, ceil=pool.ceil_mode)]
    for m in layers[i + 1:]:
        if isinstance(m, nn.Conv2d):
            d = copy.deepcopy(m)
            d.dilation = tuple(v * s for v in m.dilation)
            d.padding = tuple(v * s for v in m.padding)  # type: ignore[assignment]
            out.append(d)
        elif isinstance(m, (nn.ReLU, nn.Dropout, nn.Identity)):
            out.append(m)
        else:
            raise ValueError(f"cannot rarefy {type(m).__name__} after the last pooling layer")
    return nn.Sequential(*out)


def _single(v: int | tuple[int, ...]) -> int:
    if isinstance(v, tuple):
        if len(set(v)) != 1:
            raise ValueError(f"non-square geometry {v}")
        return v[0]
    return v


class _DensePool(nn.Module):
    """Max pooling of a ``k``-window at stride 1; with ``ceil`` the windows that a strided
    ceil_mode pooling keeps at the bottom and right edges (partly outside) are kept too."""

    def __init__(self, k: int, ceil: bool) -> None:
        super().__init__()
        self.k, self.ceil = k, ceil

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ceil and self.k > 1:
            x = F.pad(x, (0, self.k - 1, 0, self.k - 1), value=float("-inf"))
        return F.max_pool2d(x, self.k, stride=1)


# ------------------------------------------------------------------------------ FCNs

def _other_trunk(model: nn.Module) -> bool:
    """An FCN-32s on another trunk (AlexNet, GoogLeNet): score_fr is its coarse map."""
    from fcn_core.stride32 import Stride32FCN

    return isinstance(model, Stride32FCN)


def coarse_coord(model: FCN) -> Coord:
    """The coordinate map of the FCN's last map before its final fixed upsampling."""
    if _other_trunk(model):
        return model.score_coord()  # type: ignore[operator]
    score_fr = coord_through([*model.features, model.fc6, model.fc7])
    if model.stride == 32:
        return score_fr
    head = next(iter(model.heads.values()))
    upscore2 = coord_step(head.upscore2, score_fr)
    return upscore2 if model.stride == 16 else coord_step(head.upscore_pool4, upscore2)


def coarse_scores(model: FCN, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per head, the last map before the final fixed upsampling (score_fr for FCN-32s,
    fuse_pool4 for 16s, fuse_pool3 for 8s), as ``model``'s forward computes it."""
    from fcn_core.fcn import crop

    if _other_trunk(model):
        f = model.score_input(x)  # type: ignore[operator]
        return {name: head.score_fr(f) for name, head in model.heads.items()}
    pool3, pool4, pool5 = run_features(model.features, x)
    fc7 = model.drop7(model.relu7(model.fc7(model.drop6(model.relu6(model.fc6(pool5))))))
    out: dict[str, torch.Tensor] = {}
    o = model.offsets
    for name, head in model.heads.items():
        score = head.score_fr(fc7)
        if model.stride <= 16:
            up = head.upscore2(score)
            p4 = head.score_pool4(pool4 * model.scale_pool4)
            score = up + crop(p4, o["score_pool4c"], *up.shape[-2:])
        if model.stride == 8:
            up = head.upscore_pool4(score)
            p3 = head.score_pool3(pool3 * model.scale_pool3)
            score = up + crop(p3, o["score_pool3c"], *up.shape[-2:])
        out[name] = score
    return out


def _resample(coarse: torch.Tensor, coord: Coord, h: int, w: int) -> torch.Tensor:
    """Bilinear samples of ``coarse`` (positions q = a * p + b of input pixels p) at every
    input pixel; positions outside the map take its edge."""
    a, b = coord

    def grid(n: int, size: int) -> torch.Tensor:
        q = torch.arange(n, dtype=torch.float64) * float(a) + float(b)
        return (2 * q / max(size - 1, 1) - 1).to(coarse.dtype)

    gy, gx = grid(h, coarse.shape[-2]), grid(w, coarse.shape[-1])
    g = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (h, w, 2): x, y
    g = g.unsqueeze(0).expand(coarse.shape[0], h, w, 2).to(coarse.device)
    return F.grid_sample(coarse, g, mode="bilinear", padding_mode="border", align_corners=True)


@torch.no_grad()
def shift_stitch_predict(model: FCN, x: torch.Tensor, f: int
                         ) -> torch.Tensor | dict[str, torch.Tensor]:
    """Scores (N, C, H, W) of ``model`` on ``x`` by shift-and-stitch: the coarse map of stride
    ``s`` (the variant's) from ``f**2`` inputs shifted by ``s / f`` pixels, interlaced into a
    map of stride ``s / f``, then upsampled bilinearly to the input. ``f`` must divide ``s``;
    ``f = 1`` is the plain coarse map upsampled bilinearly."""
    s = model.stride
    if not (isinstance(f, int) and f >= 1 and s % f == 0):
        raise ValueError(f"f must be an int >= 1 dividing the output stride {s}, got f={f!r}")
    step = s // f
    h, w = x.shape[-2:]
    shifted = {(y, xx): coarse_scores(model, x[..., step * y:, step * xx:])
               for y in range(f) for xx in range(f)}
    a, b = coarse_coord(model)
    coord = (a * f, b * f)  # interlaced: q = y + f * i  <=>  q = a f p + f b
    assert coord[0] == Fraction(1, step), coord
    out = {name: _resample(interlace({k: v[name] for k, v in shifted.items()}, f), coord, h, w)
           for name in model.heads}
    return out["out"] if model.config.single else out
