"""Parameter groups of the reference solver: bias lr x2 without decay; fixed layers left out."""

from __future__ import annotations

from torch import nn


def param_groups(
    model: nn.Module, *, lr: float, weight_decay: float, bias_lr_mult: float = 2.0
) -> list[dict]:
    """Two SGD groups (weights; biases). Parameters with requires_grad=False, such as the
    final fixed upscore, are in neither group, so no optimizer ever touches them."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (biases if name.endswith(".bias") else weights).append(p)
    return [
        {"params": weights, "lr": lr, "weight_decay": weight_decay},
        {"params": biases, "lr": lr * bias_lr_mult, "weight_decay": 0.0},
    ]
