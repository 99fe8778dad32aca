"""The model as registered in MLflow: uint8 RGB images in, class ids out.

Preprocessing (RGB -> BGR, mean subtraction) lives inside the module, so a user with only
MLflow and torch gets labels from ``mlflow.pyfunc.load_model(uri).predict(images)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SegmentationModel(nn.Module):
    """uint8 RGB (N, H, W, 3), any H and W -> int64 class ids (N, H, W)."""

    def __init__(self, net: nn.Module, mean_bgr: Sequence[float], input: str = "rgb"):
        super().__init__()
        if input != "rgb":
            raise ValueError(f"only RGB models can be served from RGB images, got input={input!r}")
        self.net = net
        self.input = input
        self.register_buffer("mean_bgr", torch.tensor(list(mean_bgr), dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3) uint8 RGB, got {tuple(images.shape)}")
        x = images.to(self.mean_bgr.device).permute(0, 3, 1, 2).flip(1).float()  # BGR
        x = x - self.mean_bgr.view(1, 3, 1, 1)
        scores = self.net(x)
        if isinstance(scores, dict):  # several heads: the first is the model's answer
            scores = next(iter(scores.values()))
        return scores.argmax(1)
