"""Per-pixel softmax cross-entropy with the ignore label (reference SoftmaxWithLoss)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fcn_core.palettes import IGNORE_INDEX


def segmentation_loss(
    scores: torch.Tensor, target: torch.Tensor, *, normalize: bool = False,
    ignore_index: int = IGNORE_INDEX, weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of scores (N, C, H, W) against target (N, H, W).

    ``normalize=False`` sums over pixels and divides by the batch size N, as Caffe's
    SoftmaxWithLoss does with ``normalize: false`` (the reference recipe, which is why its
    learning rates are 1e-10); ``True`` averages over the non-ignored pixels of the batch
    (the paper's text recipe).
    A batch with no valid pixel gives a zero loss that still has a graph, not NaN.
    ``weight`` (C,): a weight per class (class balancing, ``class_weights``); with
    ``normalize`` the sum is divided by the summed weights of the valid pixels.
    """
    if scores.dim() != 4 or target.dim() != 3 or scores.shape[0] != target.shape[0] \
            or scores.shape[2:] != target.shape[1:]:
        raise ValueError(f"scores (N, C, H, W) and target (N, H, W) must agree, got scores "
                         f"{tuple(scores.shape)} and target {tuple(target.shape)}")
    target = target.long()
    total = F.cross_entropy(scores, target, ignore_index=ignore_index, reduction="sum",
                            weight=None if weight is None else weight.to(scores.dtype))
    if not normalize:
        return total / scores.shape[0]
    valid_mask = target != ignore_index
    if weight is None:
        return total / valid_mask.sum().clamp_min(1)
    w = weight.to(scores.device)[target[valid_mask]].sum()
    return total / w.clamp_min(torch.finfo(w.dtype).tiny)


def multi_head_loss(
    scores: torch.Tensor | Mapping[str, torch.Tensor],
    targets: torch.Tensor | Mapping[str, torch.Tensor],
    *, normalize: bool = False, ignore_index: int = IGNORE_INDEX,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of the per-head losses (SIFT Flow: semantic + geometric), or the single loss
    (``weight``: class weights of a single-head net)."""
    if isinstance(scores, torch.Tensor):
        assert isinstance(targets, torch.Tensor), "one score map needs one target"
        return segmentation_loss(scores, targets, normalize=normalize, ignore_index=ignore_index,
                                 weight=weight)
    if weight is not None:
        raise ValueError("class weights apply to a single-head net")
    assert isinstance(targets, Mapping), "several heads need one target each"
    if set(scores) != set(targets):
        raise ValueError(f"heads {sorted(scores)} and targets {sorted(targets)} differ")
    return sum(segmentation_loss(scores[k], targets[k], normalize=normalize,
                                 ignore_index=ignore_index) for k in scores)


CLASS_WEIGHTS = ("none", "inverse_frequency", "median_frequency")


def class_weights(pixels: Sequence[int], mode: str) -> torch.Tensor | None:
    """Per-class loss weights from a split's class pixel counts (the manifest's
    ``class_pixels``), None for ``none``. With f_c the share of class c among the labelled
    pixels and K the classes present: ``inverse_frequency`` w_c = 1 / (K f_c) (a pixel weighs
    1 on average), ``median_frequency`` w_c = median(f) / f_c (Eigen & Fergus 2015). A class
    with no pixel gets weight 0: it never occurs in the labels it was counted on."""
    if mode not in CLASS_WEIGHTS:
        raise ValueError(f"mode must be one of {', '.join(CLASS_WEIGHTS)}, got mode={mode!r}")
    if mode == "none":
        return None
    n = np.asarray(pixels, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or (n < 0).any() or n.sum() <= 0:
        raise ValueError(f"pixels must be non-negative counts with a positive sum, got {n}")
    present = n > 0
    freq = n / n.sum()
    w = np.zeros_like(freq)
    if mode == "inverse_frequency":
        w[present] = 1.0 / (present.sum() * freq[present])
    else:
        w[present] = np.median(freq[present]) / freq[present]
    return torch.tensor(w, dtype=torch.float32)


def sample_loss_cells(target: torch.Tensor, stride: int, p: float,
                      generator: torch.Generator | None = None,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Loss sampling (the paper's section 4.4): each ``stride`` x ``stride`` cell of the label
    (a cell of the final score grid) is kept with probability ``p``, independently, and the
    pixels of a dropped cell become ``ignore_index``; pixels already ignored stay ignored.
    ``target`` (N, H, W); ``p = 1`` returns it unchanged."""
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got p={p}")
    if p == 1:
        return target
    n, h, w = target.shape
    cells = torch.rand((n, -(-h // stride), -(-w // stride)), generator=generator,
                       device="cpu") >= p  # True: dropped
    drop = cells.repeat_interleave(stride, 1).repeat_interleave(stride, 2)[:, :h, :w]
    return target.masked_fill(drop.to(target.device), ignore_index)
