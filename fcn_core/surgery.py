"""Net surgery (reference surgery.py): fc->conv transplant, bilinear kernels, stage promotion."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fcn_core.bilinear import bilinear_weight, upsample_filt
from fcn_core.fcn import FCN, LateFusion

__all__ = [
    "SurgeryError", "SurgeryReport", "ConvolutionalVGG16", "convolutionalize",
    "transplant_vgg16", "promote", "upsample_filt", "bilinear_weight",
]

# torchvision's VGG16 classifier: Linear layers at these indices -> FCN's conv names.
_FC_LAYERS = {"classifier.0": "fc6", "classifier.3": "fc7", "classifier.6": "fc8"}
# torchvision's ImageNet normalisation (RGB, inputs in [0, 1]).
TORCHVISION_MEAN_RGB = (0.485, 0.456, 0.406)
TORCHVISION_STD_RGB = (0.229, 0.224, 0.225)
NEXT_STAGE = {"fcn32s": "fcn16s", "fcn16s": "fcn8s"}


class SurgeryError(ValueError):
    """Weights that do not fit the net they are meant for."""


@dataclass
class SurgeryReport:
    copied: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)  # "src -> dst (shape -> shape)"
    adapted: list[str] = field(default_factory=list)  # changed on the way, e.g. RGB -> BGR
    skipped: list[str] = field(default_factory=list)  # "name: why"
    initialised: list[str] = field(default_factory=list)  # new layers left at their init

    def __str__(self) -> str:
        lines = [f"copied {len(self.copied)} tensors, reshaped {len(self.reshaped)}, "
                 f"adapted {len(self.adapted)}, skipped {len(self.skipped)}, "
                 f"new {len(self.initialised)}"]
        lines += [f"  reshaped {r}" for r in self.reshaped]
        lines += [f"  adapted  {a}" for a in self.adapted]
        lines += [f"  skipped  {s}" for s in self.skipped]
        lines += [f"  new      {n}" for n in self.initialised]
        return "\n".join(lines)


class ConvolutionalVGG16(nn.Module):
    """torchvision's VGG16 with its classifier turned into convolutions (paper section 3.1).

    On a 224x224 input it gives the classifier's 1000 logits as a 1x1 map; on larger inputs a
    coarse map of logits, one per 224x224 window at stride 32.
    """

    def __init__(self, features: nn.Sequential, fc6: nn.Conv2d, fc7: nn.Conv2d, fc8: nn.Conv2d):
        super().__init__()
        self.features = features
        self.fc6, self.relu6, self.drop6 = fc6, nn.ReLU(inplace=True), nn.Dropout(0.5)
        self.fc7, self.relu7, self.drop7 = fc7, nn.ReLU(inplace=True), nn.Dropout(0.5)
        self.fc8 = fc8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 512, H/32, W/32)
        x = self.drop6(self.relu6(self.fc6(x)))  # (N, 4096, H/32 - 6, W/32 - 6)
        x = self.drop7(self.relu7(self.fc7(x)))
        return self.fc8(x)  # (N, 1000, H/32 - 6, W/32 - 6)


def _linear_to_conv(linear: nn.Linear, in_channels: int, k: int) -> nn.Conv2d:
    out_f, in_f = linear.weight.shape
    if in_f != in_channels * k * k:
        raise SurgeryError(f"cannot reshape a Linear of {in_f} inputs to a {k}x{k} conv over "
                           f"{in_channels} channels ({in_channels * k * k} inputs)")
    conv = nn.Conv2d(in_channels, out_f, kernel_size=k)
    with torch.no_grad():
        # torch flattens (C, H, W) row-major, exactly as a conv kernel is laid out.
        conv.weight.copy_(linear.weight.reshape(out_f, in_channels, k, k))
        conv.bias.copy_(linear.bias)
    return conv


def convolutionalize(vgg: nn.Module) -> tuple[ConvolutionalVGG16, SurgeryReport]:
    """Turn a torchvision ``vgg16()`` into a fully convolutional net with the same weights."""
    classifier = getattr(vgg, "classifier", None)
    if not isinstance(classifier, nn.Sequential) or len(classifier) != 7:
        raise SurgeryError("expected a torchvision VGG16 (classifier of 7 modules), got "
                           f"{type(vgg).__name__}")
    report = SurgeryReport()
    features = copy.deepcopy(vgg.features)
    report.copied += [f"features.{k}" for k in features.state_dict()]
    c5 = features[28].out_channels
    fc6 = _linear_to_conv(classifier[0], c5, 7)
    fc7 = _linear_to_conv(classifier[3], fc6.out_channels, 1)
    fc8 = _linear_to_conv(classifier[6], fc7.out_channels, 1)
    for src, conv in (("classifier.0", fc6), ("classifier.3", fc7), ("classifier.6", fc8)):
        report.reshaped.append(f"{src}.weight -> {_FC_LAYERS[src]}.weight "
                               f"({tuple(getattr(classifier, src[-1]).weight.shape)} -> "
                               f"{tuple(conv.weight.shape)})")
        report.copied.append(f"{src}.bias -> {_FC_LAYERS[src]}.bias")
    model = ConvolutionalVGG16(features, fc6, fc7, fc8)
    model.train(vgg.training)
    return model, report


def _bgr_conv1_1(weight: torch.Tensor, bias: torch.Tensor, mean_bgr: Sequence[float]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-express torchvision's conv1_1 (RGB in [0, 1], ImageNet-normalised) for FCN's input
    convention (BGR in [0, 255] minus ``mean_bgr``), so pretrained features see what they
    were trained on. ``weight`` is (C_out, 3, 3, 3) in RGB order."""
    mean_tv = torch.tensor(TORCHVISION_MEAN_RGB, dtype=weight.dtype).view(1, 3, 1, 1)
    std_tv = torch.tensor(TORCHVISION_STD_RGB, dtype=weight.dtype).view(1, 3, 1, 1)
    mean_rgb = torch.tensor(list(mean_bgr)[::-1], dtype=weight.dtype).view(1, 3, 1, 1)
    # x_tv = (bgr_minus_mean[::-1] + mean_rgb) / 255 / std - mean_tv / std
    w_rgb = weight / (255.0 * std_tv)
    shift = ((mean_rgb / 255.0 - mean_tv) / std_tv * weight).sum(dim=(1, 2, 3))
    return w_rgb.flip(1), bias + shift


def transplant_vgg16(
    model: FCN,
    state_dict: Mapping[str, torch.Tensor],
    *,
    mean_bgr: Sequence[float] | None = None,
) -> SurgeryReport:
    """Load torchvision VGG16 weights into an FCN (in place) and report what happened.

    ``features.*`` are copied; classifier.0 -> fc6 (4096x512x7x7) and classifier.3 -> fc7
    (4096x4096x1x1) are reshaped; classifier.6 (the 1000 ImageNet classes) is skipped, as the
    FCN replaces it with score_fr. With ``mean_bgr`` set, conv1_1 is re-expressed for BGR
    inputs in [0, 255] minus that mean (the reference input convention); any input whose
    channels sit in the BGR slots (NYUD HHA, with its own mean) is re-expressed the same way.
    A 4-channel conv1_1 (RGB-D) takes the 3 colour channels, and its depth filter starts as
    their mean (the reference nyud-fcn32s-color-d surgery).
    Shapes that do not fit raise SurgeryError naming the tensor and both shapes.
    """
    report = SurgeryReport()
    own = model.state_dict()
    updates: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("features."):
            dst = key
        elif key.rsplit(".", 1)[0] in ("classifier.0", "classifier.3"):
            dst = _FC_LAYERS[key.rsplit(".", 1)[0]] + "." + key.rsplit(".", 1)[1]
        else:
            report.skipped.append(f"{key}: not part of the FCN (ImageNet classifier)")
            continue
        if dst not in own:
            raise SurgeryError(f"{key}: the model has no parameter {dst}")
        target = own[dst]
        value = value.detach().to(target.dtype)
        if dst.startswith("fc") and value.shape != target.shape \
                and value.numel() == target.numel():
            # Linear (O, I*k*k) -> conv (O, I, k, k): same numbers, row-major (C, H, W) layout.
            shapes = f"{tuple(value.shape)} -> {tuple(target.shape)}"
            report.reshaped.append(f"{key} -> {dst} ({shapes})")
            value = value.reshape(target.shape)
        elif dst == "features.0.weight" and value.shape[1] == 3 and target.shape[1] > 3 \
                and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
            extra = target.shape[1] - 3
            merged = target.clone()
            merged[:, :3] = value
            report.adapted.append(f"{key}: 3 colour channels copied into a "
                                  f"{target.shape[1]}-channel conv1_1")
            value = merged
        elif value.shape != target.shape:
            raise SurgeryError(
                f"{key}: shape {tuple(value.shape)} in the weights does not fit {dst} of shape "
                f"{tuple(target.shape)} in the model (width={model.config.width}, "
                f"in_channels={model.config.in_channels}); VGG16 weights need width=1.0")
        else:
            report.copied.append(key if key == dst else f"{key} -> {dst}")
        updates[dst] = value
    missing = [k for k in own if k.startswith(("features.", "fc")) and k not in updates]
    if missing:
        raise SurgeryError(f"the weights lack {len(missing)} trunk tensors, e.g. {missing[0]}; "
                           "expected a torchvision vgg16() state dict")
    if mean_bgr is not None:
        w, b = updates["features.0.weight"], updates["features.0.bias"]
        w3, b = _bgr_conv1_1(w[:, :3], b, mean_bgr)
        w = w.clone()
        w[:, :3] = w3
        updates["features.0.weight"], updates["features.0.bias"] = w, b
        report.adapted.append("features.0: RGB/[0,1]/ImageNet-std input -> BGR/[0,255] minus "
                              f"mean {tuple(round(m, 3) for m in mean_bgr)}")
    extra = own["features.0.weight"].shape[1] - 3
    if extra > 0:
        # Reference nyud-fcn32s-color-d surgery: the depth filter of conv1_bgrd starts as the
        # mean of the three colour filters (as they see the input: after the re-expression).
        w = updates["features.0.weight"].clone()
        w[:, 3:] = w[:, :3].mean(dim=1, keepdim=True)
        updates["features.0.weight"] = w
        report.adapted.append(f"features.0: {extra} extra input channel(s) start as the mean "
                              "of the three colour filters")
    report.initialised += [k for k in own if k not in updates and not k.startswith("scale_")]
    with torch.no_grad():
        for k, v in updates.items():
            own[k].copy_(v)
    return report


def promote(model: FCN | LateFusion) -> FCN | LateFusion:
    """FCN-32s -> FCN-16s, or FCN-16s -> FCN-8s (the paper's staged training).

    Every parameter the two nets share is copied; the new skip's score layer starts at zero
    (so the skip adds nothing yet) and its new deconvolutions at the bilinear kernel.
    """
    if isinstance(model, LateFusion):
        return LateFusion(promote(model.color), promote(model.hha))
    variant = model.config.variant
    if variant not in NEXT_STAGE:
        raise ValueError(f"model must be an fcn32s or fcn16s to promote, got variant={variant!r}")
    new = FCN(replace(model.config, variant=NEXT_STAGE[variant]))
    new = new.to(next(model.parameters()).device)
    own = new.state_dict()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key in own:
                assert own[key].shape == value.shape, (key, own[key].shape, value.shape)
                own[key].copy_(value)
    new.train(model.training)
    return new
