"""Input conventions of the reference code: BGR in [0, 255] minus a per-dataset mean, CHW."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fcn_core.palettes import IGNORE_INDEX

# Per-dataset channel means (reference voc_layers / nyud_layers / siftflow_layers).
MEAN_BGR: dict[str, tuple[float, float, float]] = {
    "voc": (104.00699, 116.66877, 122.67891),
    "sbd": (104.00699, 116.66877, 122.67891),
    "pascal": (104.00699, 116.66877, 122.67891),  # VOC + SBD (the reference protocols)
    "context": (104.007, 116.669, 122.679),  # VOC2010 images (pascalcontext_layers' mean)
    "nyud": (116.190, 97.203, 92.318),
    "siftflow": (114.578, 115.294, 108.353),
    "synthetic": (104.00699, 116.66877, 122.67891),
}
MEAN_HHA: tuple[float, float, float] = (132.431, 94.076, 118.477)  # NYUD HHA, in file order
MEAN_LOG_DEPTH = 7.844  # NYUD: log of depth in millimetres

Label = torch.Tensor | Mapping[str, torch.Tensor]


def image_to_tensor(rgb: np.ndarray, mean_bgr: Sequence[float]) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> float32 (3, H, W): channels to BGR, mean subtracted."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be (H, W, 3), got rgb of shape {rgb.shape}")
    bgr = rgb[:, :, ::-1].astype(np.float32) - np.asarray(mean_bgr, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))


def tensor_to_image(x: torch.Tensor, mean_bgr: Sequence[float]) -> np.ndarray:
    """Inverse of image_to_tensor, for pictures of predictions: (3, H, W) -> uint8 RGB."""
    bgr = x.detach().cpu().numpy().transpose(1, 2, 0) + np.asarray(mean_bgr, dtype=np.float32)
    return np.clip(bgr[:, :, ::-1], 0, 255).round().astype(np.uint8)


def hha_to_tensor(hha: np.ndarray) -> torch.Tensor:
    """uint8 HHA (H, W, 3) as stored -> float32 (3, H, W) minus the NYUD HHA mean."""
    x = hha.astype(np.float32) - np.asarray(MEAN_HHA, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def depth_to_tensor(depth_mm: np.ndarray) -> torch.Tensor:
    """16-bit depth in millimetres (H, W) -> (1, H, W) log depth minus the NYUD mean.
    Holes (0) are treated as 1 mm rather than producing -inf."""
    d = np.log(np.maximum(depth_mm.astype(np.float32), 1.0)) - MEAN_LOG_DEPTH
    return torch.from_numpy(d[None])


#: What a net reads, by the training config's ``input``: the channels of the stacked
#: (N, H, W, C) array it is served from, in order, and that array's dtype (RGB-D's fourth
#: channel is depth in millimetres, as NYUD's 16-bit PNGs hold it).
INPUTS: dict[str, tuple[tuple[str, ...], str]] = {
    "rgb": (("R", "G", "B"), "uint8"),
    "hha": (("H1", "H2", "A"), "uint8"),  # the HHA PNG's three channels, in file order
    "rgbd": (("R", "G", "B", "depth_mm"), "uint16"),
    "rgb-hha": (("R", "G", "B", "H1", "H2", "A"), "uint8"),
}


def net_input(rgb: torch.Tensor | None, input: str, mean_bgr: Sequence[float],
              hha: torch.Tensor | None = None, depth: torch.Tensor | None = None
              ) -> torch.Tensor:
    """(N, H, W, 3) RGB, (N, H, W, 3) HHA and (N, H, W) depth in mm (any numeric dtype, on
    one device) -> the float32 (N, C, H, W) the net of ``input`` reads, in the reference's
    conventions: rgb = BGR minus mean (3), hha = HHA minus mean (3), rgbd = BGR + log depth
    minus its mean (4), rgb-hha = BGR then HHA (6, late fusion). Training, evaluation and the
    served model all build it here."""
    if input not in INPUTS:
        raise ValueError(f"input must be one of {sorted(INPUTS)}, got input={input!r}")

    def minus(x: torch.Tensor, mean: Sequence[float]) -> torch.Tensor:
        m = torch.tensor(list(mean), dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return x.float() - m

    parts: list[torch.Tensor] = []
    if input in ("rgb", "rgbd", "rgb-hha"):
        if rgb is None:
            raise ValueError(f"input={input!r} needs RGB images")
        parts.append(minus(rgb.permute(0, 3, 1, 2).flip(1), mean_bgr))  # RGB -> BGR
    if input in ("hha", "rgb-hha"):
        if hha is None:
            raise ValueError(f"input={input!r} needs HHA images; these rows have none")
        parts.append(minus(hha.permute(0, 3, 1, 2), MEAN_HHA))
    if input == "rgbd":
        if depth is None:
            raise ValueError("input='rgbd' needs depth; these rows have none")
        parts.append(torch.log(depth.float().clamp_min(1.0))[:, None] - MEAN_LOG_DEPTH)
    return torch.cat(parts, dim=1)


def label_to_tensor(label: np.ndarray) -> torch.Tensor:
    """uint8 class ids (H, W), 255 = ignore -> int64 (H, W)."""
    if label.ndim != 2:
        raise ValueError(f"label must be (H, W), got label of shape {label.shape}")
    return torch.from_numpy(label.astype(np.int64))


def random_mirror(image: torch.Tensor, label: Label, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, Label]:
    """Flip image (C, H, W) and label(s) (H, W) left-right with probability 1/2."""
    if torch.rand((), generator=generator).item() >= 0.5:
        return image, label
    if isinstance(label, Mapping):
        return image.flip(-1), {k: v.flip(-1) for k, v in label.items()}
    return image.flip(-1), label.flip(-1)


def pad_batch(
    images: Sequence[torch.Tensor], labels: Sequence[Label], *, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]:
    """Stack examples of different sizes: images padded with 0 (the mean, after subtraction)
    and labels with 255 (ignored) at the bottom and right, up to the largest H and W rounded
    up to ``multiple``. Returns (N, C, H, W) and (N, H, W) (or a dict of those per head)."""
    if not images or len(images) != len(labels):
        raise ValueError(f"need as many labels as images (> 0), got {len(images)} images and "
                         f"{len(labels)} labels")
    h = max(x.shape[-2] for x in images)
    w = max(x.shape[-1] for x in images)
    h, w = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for i, x in enumerate(images):
        batch[i, :, : x.shape[-2], : x.shape[-1]] = x

    def stack(ls: Sequence[torch.Tensor]) -> torch.Tensor:
        out = torch.full((len(ls), h, w), IGNORE_INDEX, dtype=torch.int64)
        for i, y in enumerate(ls):
            out[i, : y.shape[-2], : y.shape[-1]] = y
        return out

    if isinstance(labels[0], Mapping):
        return batch, {k: stack([lab[k] for lab in labels]) for k in labels[0]}
    return batch, stack(labels)  # type: ignore[arg-type]
