"""The bilinear kernel FCN's deconvolutions start from (reference surgery.upsample_filt)."""

from __future__ import annotations

import numpy as np
import torch


def upsample_filt(size: int) -> np.ndarray:
    """2-D bilinear kernel of shape (size, size) for upsampling by (size + 1) // 2."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got size={size!r}")
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = np.ogrid[:size, :size]
    return (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)


def bilinear_weight(channels: int, size: int) -> torch.Tensor:
    """ConvTranspose2d weight (C, C, k, k): the bilinear kernel on the diagonal, 0 elsewhere,
    so each class map is interpolated on its own (reference surgery.interp)."""
    weight = torch.zeros(channels, channels, size, size, dtype=torch.float32)
    filt = torch.from_numpy(upsample_filt(size)).to(torch.float32)
    idx = torch.arange(channels)
    weight[idx, idx] = filt
    return weight
