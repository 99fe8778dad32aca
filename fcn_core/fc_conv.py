"""fc6 and fc7: the classifier's fully connected layers, convolutionalized (the paper's §3.1).

A convolution whose kernel covers its whole receptive field, on a small map (fc6: 7x7, 512 ->
4096 channels on ~15x15 for a 256² image; fc7: 1x1, 4096 -> 4096), is one matrix product of the
map's patches with the weight. On this project's CPUs oneDNN's direct convolution runs these two
far below its 3x3 rate (bf16: 0.13 and 0.08 TFLOP/s against 0.33 and 0.32 for the same products
as a matmul, bench/bench_model.py's machine), so ``FullyConvolutional`` computes them as that
product on the CPU, and for inference under autocast keeps its weight cast to bf16. Same layer,
same weight and state dict (an ``nn.Conv2d``); a strided, padded, dilated (shift-and-stitch's
``densify``) or grouped one, or one on a GPU, runs the convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FullyConvolutional(nn.Conv2d):
    """``nn.Conv2d`` for fc6/fc7, computed as patches x weight on the CPU (see the module)."""

    def _plain(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dim() == 4 and self.groups == 1
                and self.stride == (1, 1) and self.dilation == (1, 1)
                and self.padding in ((0, 0), "valid") and self.padding_mode == "zeros"
                and x.shape[-2] >= self.kernel_size[0] and x.shape[-1] >= self.kernel_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._plain(x):
            return super().forward(x)
        n, c, h, w = x.shape
        kh, kw = self.kernel_size
        ho, wo = h - kh + 1, w - kw + 1
        weight = self.weight
        # Literal strides, not is_contiguous(): a 1x1 channels_last weight counts as contiguous,
        # but its gradient must come back with its own strides (DDP checks them literally).
        if weight.stride() == _row_major(weight.shape):  # patches in (c, kh, kw) order
            cols = F.unfold(x, (kh, kw)).transpose(1, 2) if kh * kw > 1 else \
                x.flatten(2).transpose(1, 2)
            w2 = weight.reshape(self.out_channels, -1)
        else:  # channels_last weight, memory (out, kh, kw, c): patches in that order
            patches = x.permute(0, 2, 3, 1).unfold(1, kh, 1).unfold(2, kw, 1)  # n,ho,wo,c,kh,kw
            cols = patches.permute(0, 1, 2, 4, 5, 3).reshape(n, ho * wo, kh * kw * c)
            w2 = weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1)
        if torch.is_autocast_enabled("cpu") and not torch.is_grad_enabled():
            w2 = self._inference_weight(w2, torch.get_autocast_dtype("cpu"))
        out = F.linear(cols, w2, self.bias)  # (n, ho*wo, out): NHWC memory
        return out.reshape(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)

    def _inference_weight(self, w2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight in autocast's dtype, kept until the weight changes: inference under
        autocast would otherwise cast fc6's 103 M float32 weights on every call (80 ms of
        fc6's ~200 ms at 256² here). Not in the state dict; training casts as autocast does."""
        key = (self.weight.data_ptr(), self.weight._version, dtype, w2.shape)
        if getattr(self, "_cast_key", None) != key:
            self._cast, self._cast_key = w2.detach().to(dtype).contiguous(), key
        return self._cast


def _row_major(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a contiguous (row-major) tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
