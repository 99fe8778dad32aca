"""The model as served: images in (uint8 RGB, or NYUD's HHA / RGB-D / RGB + HHA stacked),
class ids out, rebuilt from a checkpoint.

Preprocessing (RGB -> BGR, mean subtraction, log depth) lives inside ``SegmentationModel``,
so a user with only MLflow and torch gets labels from
``mlflow.pyfunc.load_model(uri).predict(images)``.

Checkpoints are tensors plus plain metadata (str, int, float, bool, None, lists, dicts):
``torch.load(weights_only=True)`` reads them and refuses anything else, so loading one never
runs pickled code. The registered MLflow model ships this package as code and rebuilds the
net from the checkpoint's ``arch`` with the functions below (pure torch, no MLflow here).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from fcn_core.fcn import FCN, VARIANTS, FCNConfig, LateFusion
from fcn_core.transforms import INPUTS, MEAN_BGR, net_input

#: Written by this version into every checkpoint; files without it are the older layout,
#: which has the same keys and loads the same way.
CHECKPOINT_FORMAT = "fcn-checkpoint/2"
KINDS = ("fcn", "late_fusion")


class SegmentationModel(nn.Module):
    """The net's images, stacked (N, H, W, C), any H and W -> int64 class ids (N, H, W).

    C and the channels follow the training config's ``input`` (``INPUTS``): uint8 RGB (3);
    uint8 HHA as its PNG stores it (3); RGB then depth in millimetres, uint16 (4); uint8 RGB
    then HHA (6, late fusion). The net reads them as training did (``net_input``)."""

    def __init__(self, net: nn.Module, mean_bgr: Sequence[float], input: str = "rgb"):
        super().__init__()
        if input not in INPUTS:
            raise ValueError(f"input must be one of {sorted(INPUTS)}, got input={input!r}")
        self.net = net
        self.input = input
        self.register_buffer("mean_bgr", torch.tensor(list(mean_bgr), dtype=torch.float32))

    @property
    def channels(self) -> int:
        return len(INPUTS[self.input][0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[-1] != self.channels:
            raise ValueError(f"images must be (N, H, W, {self.channels}) {describe(self.input)}"
                             f", got {tuple(images.shape)}")
        x = images.to(self.mean_bgr.device)
        rgb = x[..., :3] if self.input != "hha" else None
        hha = x[..., :3] if self.input == "hha" else x[..., 3:6] if self.input == "rgb-hha" \
            else None
        depth = x[..., 3] if self.input == "rgbd" else None
        scores = self.net(net_input(rgb, self.input, self.mean_bgr.tolist(), hha, depth))
        if isinstance(scores, dict):  # several heads: the first is the model's answer
            scores = next(iter(scores.values()))
        return scores.argmax(1)


def describe(input: str) -> str:
    """'uint8 RGB', 'uint16 R, G, B, depth_mm', ...: what a served model of ``input`` reads."""
    names, dtype = INPUTS[input]
    return f"{dtype} {'RGB' if input == 'rgb' else ', '.join(names)}"


def load_checkpoint(data: bytes | BinaryIO) -> dict[str, Any]:
    """A checkpoint's dict from its bytes, with ``weights_only=True``: tensors and plain
    values only, so a crafted file cannot run code. ValueError when it is not one."""
    buf = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    state = torch.load(buf, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "arch" not in state or "model" not in state:
        raise ValueError("not an FCN checkpoint (it has no 'arch' and 'model' entries)")
    return state


def build_net(arch: Mapping[str, Any]) -> nn.Module:
    """An untrained net of a checkpoint's ``arch`` ({kind, variant, heads, width,
    in_channels}): the weights come next, from the same checkpoint."""
    fields = dict(arch)
    kind = fields.pop("kind", "fcn")
    if kind not in KINDS:
        raise ValueError(f"arch kind must be one of {KINDS}, got kind={kind!r}")
    cfg = FCNConfig(**fields)
    if cfg.variant not in VARIANTS:  # another trunk of fcn_core.models (AlexNet, GoogLeNet)
        from fcn_core.models import NAMES, build_model

        if kind != "fcn" or cfg.variant not in NAMES:
            raise ValueError(f"arch variant must be one of {NAMES} (kind fcn), got "
                             f"kind={kind!r} variant={cfg.variant!r}")
        return build_model(cfg.variant, heads=dict(cfg.heads), width=cfg.width,
                           in_channels=cfg.in_channels)
    return LateFusion(FCN(cfg), FCN(cfg)) if kind == "late_fusion" else FCN(cfg)


def net_from_checkpoint(state: Mapping[str, Any]) -> nn.Module:
    """The net of a checkpoint dict (``load_checkpoint``), its weights loaded."""
    net = build_net(state["arch"])
    net.load_state_dict(state["model"])
    return net


def checkpoint_mean_bgr(state: Mapping[str, Any]) -> tuple[float, float, float]:
    """The BGR mean the net was trained with: the checkpoint's own ``mean_bgr`` when it
    records one (serving checkpoints do), else the mean of its config's dataset."""
    if state.get("mean_bgr") is not None:
        b, g, r = (float(v) for v in state["mean_bgr"])
        return b, g, r
    return MEAN_BGR[dict(state.get("config") or {}).get("dataset", "voc")]


def checkpoint_input(state: Mapping[str, Any]) -> str:
    """What the net reads: rgb | hha | rgbd | rgb-hha (training config's ``input``)."""
    return str(dict(state.get("config") or {}).get("input", "rgb"))


def serving_model(state: Mapping[str, Any]) -> SegmentationModel:
    """The served module of a checkpoint dict: preprocessing for its ``input``, net, argmax
    of the first head."""
    return SegmentationModel(net_from_checkpoint(state).eval(), checkpoint_mean_bgr(state),
                             checkpoint_input(state)).eval()


@torch.no_grad()
def predict_ids(model: SegmentationModel, images: Any) -> np.ndarray:
    """The stacked images ``model`` reads (N, H, W, C) (an array or nested lists of
    integers in its dtype's range) -> int64 (N, H, W)."""
    arr = np.asarray(images)
    dtype = np.dtype(INPUTS[model.input][1])
    if arr.dtype != dtype:
        top = np.iinfo(dtype).max
        if not np.issubdtype(arr.dtype, np.integer) or arr.size and \
                (arr.min() < 0 or arr.max() > top):
            raise ValueError(f"images must be {describe(model.input)} (N, H, W, "
                             f"{model.channels}) with values 0..{top}, got dtype {arr.dtype}")
        arr = arr.astype(dtype)
    if dtype == np.uint16:  # RGB-D: R, G, B are 8-bit; torch has few uint16 ops: widen
        if arr.ndim == 4 and arr.shape[-1] == 4 and arr.size and arr[..., :3].max() > 255:
            raise ValueError(f"images must be {describe(model.input)} (N, H, W, 4) with R, G, "
                             f"B in 0..255, got up to {int(arr[..., :3].max())}")
        arr = arr.astype(np.int32)
    return model(torch.from_numpy(np.ascontiguousarray(arr))).cpu().numpy().astype(np.int64)
