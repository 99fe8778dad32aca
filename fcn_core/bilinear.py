"""The bilinear kernel FCN's deconvolutions start from (reference surgery.upsample_filt), and
the deconvolution layer that runs a fixed diagonal one per class."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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


class Deconvolution(nn.ConvTranspose2d):
    """FCN's bias-free upsampling layer (Caffe's Deconvolution with C outputs on C inputs).

    Its weight is C x C kernels, but the bilinear init puts a kernel on the diagonal only
    (class c is upsampled from class c) and the reference keeps it fixed (``lr_mult: 0``).
    While the weight gets no gradient in a call and is diagonal, the layer runs as C
    per-class transposed convolutions (``groups=C``): the same sums without the C*C - C
    kernels of zeros, C times fewer multiply-adds (FCN-32s's upscore at 64x64 was ~17% of a
    width-1/8 training step). A learned, non-diagonal weight runs as the full layer. The
    state dict is the full C x C weight either way."""

    ran_groups: int = 1  # how the last call ran (fcn_core.profile counts what ran)

    def _diagonal(self) -> torch.Tensor | None:
        """The diagonal kernels (C, 1, k, k) when every other kernel is zero; cached until
        the weight changes (in place, or moved)."""
        w = self.weight.detach()
        key = (w.data_ptr(), self.weight._version, w.dtype, w.device, w.shape)
        if getattr(self, "_diag_key", None) != key:
            diag = None
            if self.groups == 1 and w.shape[0] == w.shape[1]:
                idx = torch.arange(w.shape[0], device=w.device)
                d = w[idx, idx]
                if int(torch.count_nonzero(w)) == int(torch.count_nonzero(d)):
                    diag = d.unsqueeze(1).contiguous()
            self._diag, self._diag_key = diag, key
        return self._diag

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        fixed = not (self.weight.requires_grad and torch.is_grad_enabled())
        diag = self._diagonal() if fixed and output_size is None else None
        if diag is None:
            self.ran_groups = self.groups
            return super().forward(x, output_size)
        self.ran_groups = diag.shape[0]
        # In float32: oneDNN has no fast grouped bf16 deconvolution (measured 12x slower than
        # the full bf16 layer; float32 per class is 5x faster than it). The output has the
        # dtype the full layer's would have.
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            out = F.conv_transpose2d(x.float(), diag.float(), None, self.stride, self.padding,
                                     self.output_padding, diag.shape[0], self.dilation)
        return out.to(dtype)
