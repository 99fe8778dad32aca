"""Segmentation scores exactly as the reference score.py computes them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_int64(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    return t.reshape(-1).to(torch.int64)


class ConfusionMatrix:
    """hist[g, p] counts pixels of ground-truth class g predicted as p.

    Pixels whose ground truth is outside [0, num_classes) (``ignore_index``, 255 by default)
    never enter the histogram, as in the reference ``fast_hist``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be an int >= 1, got num_classes={num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.hist = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, target: ArrayLike, pred: ArrayLike) -> ConfusionMatrix:
        """Add one batch; ``target`` and ``pred`` hold class ids of the same shape."""
        if tuple(target.shape) != tuple(pred.shape):
            raise ValueError(f"target and pred must have the same shape, got target "
                             f"{tuple(target.shape)} and pred {tuple(pred.shape)}")
        n = self.num_classes
        t, p = _as_int64(target, "target"), _as_int64(pred, "pred")
        p = p.to(t.device)
        k = (t >= 0) & (t < n)
        unknown = t[~k]
        if unknown.numel() and bool((unknown != self.ignore_index).any()):
            bad = int(unknown[unknown != self.ignore_index][0])
            raise ValueError(f"target holds class id {bad}: outside 0..{n - 1} and not the "
                             f"ignore index {self.ignore_index}")
        pk = p[k]
        if pk.numel() and (int(pk.min()) < 0 or int(pk.max()) >= n):
            raise ValueError(f"pred holds class ids outside 0..{n - 1}")
        # Counting on the tensors' own device (GPU when evaluating there).
        counts = torch.bincount(n * t[k] + pk, minlength=n * n)
        self.hist += counts.reshape(n, n).cpu().numpy()
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix (e.g. one per data shard or worker) into this one."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a "
                             f"{self.num_classes}-class one")
        self.hist += other.hist
        return self

    def scores(self, exclude: Sequence[int] = ()) -> dict[str, float | list[float]]:
        """pixel_acc, mean_acc, mean_iu, fw_iu and per_class_iu (NaN for a class that is
        neither in the ground truth nor predicted). Classes in ``exclude`` (e.g. SIFT Flow's
        cow, desert and moon, absent from its test set) leave the class means and f.w. IU;
        a pixel predicted as one of them still counts as an error."""
        hist = self.hist.astype(np.float64)
        diag, gt, pr, total = np.diag(hist), hist.sum(1), hist.sum(0), hist.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            pixel_acc = diag.sum() / total
            acc = diag / gt
            iu = diag / (gt + pr - diag)
            freq = gt / total
        keep = np.ones(self.num_classes, bool)
        keep[list(exclude)] = False
        fw = keep & (freq > 0)
        fw_iu = (freq[fw] * iu[fw]).sum() if total else float("nan")
        return {
            "pixel_acc": float(pixel_acc),
            "mean_acc": _nanmean(acc[keep]),
            "mean_iu": _nanmean(iu[keep]),
            "fw_iu": float(fw_iu),
            "per_class_iu": [float(v) for v in iu],
        }

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.hist.sum())})"


def _nanmean(x: np.ndarray) -> float:
    valid = x[~np.isnan(x)]
    return float(valid.mean()) if valid.size else float("nan")
