"""Per-pixel softmax cross-entropy with the ignore label (reference SoftmaxWithLoss)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from fcn_core.palettes import IGNORE_INDEX


def segmentation_loss(
    scores: torch.Tensor, target: torch.Tensor, *, normalize: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Cross-entropy of scores (N, C, H, W) against target (N, H, W).

    ``normalize=False`` sums over pixels and divides by the batch size N, as Caffe's
    SoftmaxWithLoss does with ``normalize: false`` (the reference recipe, which is why its
    learning rates are 1e-10); ``True`` averages over the non-ignored pixels of the batch
    (the paper's text recipe).
    A batch with no valid pixel gives a zero loss that still has a graph, not NaN.
    """
    if scores.dim() != 4 or target.dim() != 3 or scores.shape[0] != target.shape[0] \
            or scores.shape[2:] != target.shape[1:]:
        raise ValueError(f"scores (N, C, H, W) and target (N, H, W) must agree, got scores "
                         f"{tuple(scores.shape)} and target {tuple(target.shape)}")
    total = F.cross_entropy(scores, target.long(), ignore_index=ignore_index, reduction="sum")
    if not normalize:
        return total / scores.shape[0]
    valid = (target != ignore_index).sum().clamp_min(1)
    return total / valid


def multi_head_loss(
    scores: torch.Tensor | Mapping[str, torch.Tensor],
    targets: torch.Tensor | Mapping[str, torch.Tensor],
    *, normalize: bool = False, ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Sum of the per-head losses (SIFT Flow: semantic + geometric), or the single loss."""
    if isinstance(scores, torch.Tensor):
        assert isinstance(targets, torch.Tensor), "one score map needs one target"
        return segmentation_loss(scores, targets, normalize=normalize, ignore_index=ignore_index)
    assert isinstance(targets, Mapping), "several heads need one target each"
    if set(scores) != set(targets):
        raise ValueError(f"heads {sorted(scores)} and targets {sorted(targets)} differ")
    return sum(segmentation_loss(scores[k], targets[k], normalize=normalize,
                                 ignore_index=ignore_index) for k in scores)
