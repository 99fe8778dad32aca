"""Inference on whole images: plain, sliding-window, multi-scale and flip averaging.

The paper scores whole images in one pass (FCNs take any size); the other options are
common test-time additions, off by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fcn_core.transforms import image_to_tensor, net_input


@dataclass(frozen=True)
class InferenceOptions:
    window: int | None = None  # sliding-window crop size in pixels (None: whole image)
    overlap: float = 1 / 3  # fraction of a window shared with its neighbour
    scales: tuple[float, ...] = (1.0,)  # multi-scale: resize factors whose scores are averaged
    flip: bool = False  # also score the mirrored image and average
    shift_stitch: int = 1  # f > 1: FCNs score by shift-and-stitch at stride s / f (§3.2)
    crf: bool = False  # DeepLab's dense CRF on the probabilities (fcn_core.crf; RGB input)

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1, got window={self.window}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got overlap={self.overlap}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive, got scales={self.scales}")
        if isinstance(self.shift_stitch, bool) or not isinstance(self.shift_stitch, int) \
                or self.shift_stitch < 1:
            raise ValueError(f"shift_stitch must be an int >= 1, got "
                             f"shift_stitch={self.shift_stitch!r}")
        if not isinstance(self.crf, bool):
            raise ValueError(f"crf must be a bool, got crf={self.crf!r}")


def check_shift_stitch(model: nn.Module, f: int) -> None:
    """ValueError unless shift-and-stitch by ``f`` applies to ``model``: an FCN whose output
    stride ``f`` divides (f = 1 applies to every net)."""
    if f == 1:
        return
    from fcn_core.fcn import FCN
    from fcn_core.stride32 import Stride32FCN

    if not isinstance(model, (FCN, Stride32FCN)):
        raise ValueError(f"shift-and-stitch needs a single-stream FCN, got a "
                         f"{type(model).__name__}")
    if model.stride % f:
        factors = ", ".join(str(d) for d in range(2, model.stride + 1) if model.stride % d == 0)
        raise ValueError(f"shift-and-stitch by {f} needs a factor of the net's output stride "
                         f"{model.stride} ({model.config.variant}): use one of {factors}")


def _pick(scores: torch.Tensor | dict[str, torch.Tensor], head: str | None) -> torch.Tensor:
    """One head's scores: ``head`` by name, or the first head (None)."""
    if not isinstance(scores, dict):
        if head is not None:
            raise ValueError(f"head={head!r} asked of a single-head net")
        return scores
    if head is None:
        return next(iter(scores.values()))
    if head not in scores:
        raise ValueError(f"head must be one of {', '.join(scores)}, got head={head!r}")
    return scores[head]


def _windowed(model: Any, x: torch.Tensor, window: int, overlap: float,
              head: str | None = None) -> torch.Tensor:
    """Average of the scores of overlapping windows covering x (N, C, H, W)."""
    n, _, h, w = x.shape
    stride = max(1, int(window * (1 - overlap)))

    def starts(size: int) -> list[int]:
        if size <= window:
            return [0]
        s = list(range(0, size - window, stride))
        return s + [size - window]

    total = count = None
    for y0 in starts(h):
        for x0 in starts(w):
            crop = x[:, :, y0 : y0 + window, x0 : x0 + window]
            s = _pick(model(crop), head)  # (N, K, h', w')
            if total is None:
                total = s.new_zeros((n, s.shape[1], h, w))
                count = s.new_zeros((1, 1, h, w))
            total[:, :, y0 : y0 + s.shape[2], x0 : x0 + s.shape[3]] += s
            count[:, :, y0 : y0 + s.shape[2], x0 : x0 + s.shape[3]] += 1
    assert total is not None and count is not None
    return total / count


def crf_refine(probs: torch.Tensor, x: torch.Tensor, mean_bgr: Sequence[float] | None
               ) -> torch.Tensor:
    """DeepLab's dense CRF (``fcn_core.crf``, its defaults) on probabilities (N, K, H, W) of
    the preprocessed RGB batch x (N, 3, H, W), whose images it recovers with ``mean_bgr``."""
    from fcn_core.crf import dense_crf
    from fcn_core.transforms import tensor_to_image

    if mean_bgr is None or x.shape[1] != 3:
        raise ValueError(f"the dense CRF needs RGB input and its mean_bgr, got "
                         f"{x.shape[1]} channels, mean_bgr={mean_bgr!r}")
    p = probs.float().cpu().numpy()
    out = [dense_crf(p[i], tensor_to_image(x[i], mean_bgr)) for i in range(len(p))]
    return torch.from_numpy(np.stack(out)).to(probs.device)


@torch.no_grad()
def predict_scores(model: nn.Module, x: torch.Tensor,
                   options: InferenceOptions = InferenceOptions(),
                   head: str | None = None, mean_bgr: Sequence[float] | None = None
                   ) -> torch.Tensor:
    """Class scores (N, K, H, W) for a preprocessed batch x (N, C, H, W); with several scales
    or flips the softmax probabilities are averaged; with ``crf`` they are the dense CRF's
    marginals (``mean_bgr`` recovers the images). A multi-head net's ``head`` (by name;
    None = the first)."""
    model.eval()
    net = model
    if options.shift_stitch > 1:
        from fcn_core.shift_stitch import shift_stitch_predict

        check_shift_stitch(model, options.shift_stitch)

        def net(t: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
            return shift_stitch_predict(model, t, options.shift_stitch)
    h, w = x.shape[-2:]
    plain = options.scales == (1.0,) and not options.flip
    outs = []
    for s in options.scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear",
                                              align_corners=False)
        for flip in (False, True) if options.flip else (False,):
            xi = xs.flip(-1) if flip else xs
            out = _windowed(net, xi, options.window, options.overlap, head) \
                if options.window else _pick(net(xi), head)
            out = out.flip(-1) if flip else out
            if out.shape[-2:] != (h, w):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            outs.append(out if plain else out.softmax(1))
    scores = outs[0] if plain else torch.stack(outs).mean(0)
    if options.crf:
        return crf_refine(scores.softmax(1) if plain else scores, x, mean_bgr)
    return scores


def _frame(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))[None]


@torch.no_grad()
def predict_labels(model: nn.Module, images: Sequence[np.ndarray], mean_bgr: Sequence[float],
                   options: InferenceOptions = InferenceOptions(),
                   device: torch.device | str = "cpu", *, input: str = "rgb",
                   hha: Sequence[np.ndarray] | None = None,
                   depth: Sequence[np.ndarray] | None = None,
                   head: str | None = None) -> list[np.ndarray]:
    """uint8 RGB images (H, W, 3) of any sizes -> uint8 class-id maps (H, W), one at a time
    (no padding, so every image is scored exactly as it is).

    A NYUD net (``input`` hha, rgbd or rgb-hha) also takes each image's uint8 HHA (H, W, 3)
    and/or uint16 depth in mm (H, W), in the lists ``hha`` and ``depth``; its input is built
    by ``net_input`` as in training and evaluation (an hha net reads no RGB). A multi-head
    net's ``head`` by name (None: the first)."""
    out = []
    for i, im in enumerate(images):
        if input == "rgb":
            x = image_to_tensor(im, mean_bgr)[None]
        else:
            x = net_input(_frame(im), input, mean_bgr, _frame(hha[i] if hha else None),
                          _frame(depth[i] if depth else None))
        x = x.to(device)
        scores = predict_scores(model, x, options, head=head, mean_bgr=mean_bgr)
        out.append(scores.argmax(1)[0].to(torch.uint8).cpu().numpy())
    return out
