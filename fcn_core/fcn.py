"""FCN-32s, FCN-16s, FCN-8s and at-once FCN-8s on a VGG16 trunk (Long, Shelhamer, Darrell).

Layer names follow the paper and the reference Caffe nets (fc6, fc7, score_fr, upscore2,
score_pool4, fuse_pool4, upscore_pool4, score_pool3, fuse_pool3, upscore, upscore16,
upscore8). Crop offsets are not typed in: they are derived from the layers' geometry the way
Caffe's coord_map does it, and tests hold them to the reference values (19 | 5, 27 | 5, 9, 31).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn

from fcn_core.bilinear import Deconvolution, bilinear_weight
from fcn_core.fc_conv import FullyConvolutional
from fcn_core.vgg import block_channels, check_width, run_features, vgg16_features

VARIANTS: tuple[str, ...] = ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce")
# Output stride of each variant; the at-once net is an FCN-8s trained in one stage.
STRIDES: dict[str, int] = {"fcn32s": 32, "fcn16s": 16, "fcn8s": 8, "fcn8s_atonce": 8}
# At-once FCN-8s scales the pool features before their score layers (reference Scale layers).
ATONCE_SCALE_POOL4 = 0.01
ATONCE_SCALE_POOL3 = 0.0001
SINGLE_HEAD = "out"


@dataclass(frozen=True)
class FCNConfig:
    variant: str = "fcn8s"  # one of VARIANTS
    heads: Mapping[str, int] = field(default_factory=lambda: {SINGLE_HEAD: 21})  # name -> classes
    width: float = 1.0  # channel multiplier of the VGG16 trunk (1.0 = the real VGG16)
    in_channels: int = 3  # 3 = BGR / HHA, 4 = RGB-D (NYUD)

    @property
    def single(self) -> bool:
        """True when the net has one unnamed head and returns a tensor, not a dict."""
        return list(self.heads) == [SINGLE_HEAD]

    def to_dict(self) -> dict:
        return {"variant": self.variant, "heads": dict(self.heads), "width": self.width,
                "in_channels": self.in_channels}


# --- coordinate maps (Caffe coord_map): position in a layer = a * position in data + b ---

Coord = tuple[Fraction, Fraction]
IDENTITY: Coord = (Fraction(1), Fraction(0))


def _pair0(v: int | tuple[int, ...]) -> int:
    if isinstance(v, tuple):
        assert len(set(v)) == 1, f"non-square geometry {v}"
        return v[0]
    return v


def coord_step(m: nn.Module, c: Coord) -> Coord:
    """Compose the coordinate map ``c`` with one layer ``m``."""
    a, b = c
    if isinstance(m, nn.ConvTranspose2d):
        k, s, p = _pair0(m.kernel_size), _pair0(m.stride), _pair0(m.padding)
        return a * s, b * s + Fraction(k - 1, 2) - p
    if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
        k, s, p = _pair0(m.kernel_size), _pair0(m.stride), _pair0(m.padding)
        return a / s, (b + p - Fraction(k - 1, 2)) / s
    return c  # ReLU, Dropout, Sequential of those: pointwise


def coord_through(mods: list[nn.Module], c: Coord = IDENTITY) -> Coord:
    for m in mods:
        c = coord_step(m, c)
    return c


def crop_offset(frm: Coord, to: Coord) -> int:
    """Offset at which ``frm`` must be cropped to align with ``to`` (Caffe crop layer)."""
    if frm[0] != to[0]:
        raise AssertionError(f"cannot crop across scales {frm[0]} and {to[0]}")
    off = frm[1] - to[1]  # same scale, so the shift is in grid cells of both
    if off.denominator != 1 or off < 0:
        raise AssertionError(f"crop offset {off} is not a non-negative integer")
    return int(off)


def crop(x: torch.Tensor, offset: int, h: int, w: int) -> torch.Tensor:
    assert x.shape[-2] >= offset + h and x.shape[-1] >= offset + w, (x.shape, offset, h, w)
    return x[:, :, offset : offset + h, offset : offset + w]


def _deconv(channels: int, kernel: int, stride: int, learnable: bool) -> Deconvolution:
    up = Deconvolution(channels, channels, kernel, stride=stride, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_weight(channels, kernel))
    up.weight.requires_grad_(learnable)
    return up


def _score(c_in: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, num_classes, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ScoreHead(nn.Module):
    """score_fr and its skips for one output (a net may carry several, e.g. SIFT Flow)."""

    def __init__(self, variant: str, num_classes: int, c_pool3: int, c_pool4: int, c_fc7: int):
        super().__init__()
        stride = STRIDES[variant]
        self.stride = stride
        self.score_fr = _score(c_fc7, num_classes)
        if stride == 32:
            self.upscore = _deconv(num_classes, 64, 32, learnable=False)
            return
        self.upscore2 = _deconv(num_classes, 4, 2, learnable=True)
        self.score_pool4 = _score(c_pool4, num_classes)
        if stride == 16:
            self.upscore16 = _deconv(num_classes, 32, 16, learnable=False)
            return
        self.upscore_pool4 = _deconv(num_classes, 4, 2, learnable=True)
        self.score_pool3 = _score(c_pool3, num_classes)
        self.upscore8 = _deconv(num_classes, 16, 8, learnable=False)

    @property
    def final_upscore(self) -> nn.ConvTranspose2d:
        return getattr(self, {32: "upscore", 16: "upscore16", 8: "upscore8"}[self.stride])


class FCN(nn.Module):
    """VGG16 trunk + fc6/fc7 + one ScoreHead per output. Build it with the public builders."""

    def __init__(self, config: FCNConfig):
        super().__init__()
        if config.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got variant={config.variant!r}")
        check_width(config.width)
        if not config.heads:
            raise ValueError("heads must name at least one output, got heads={}")
        for name, n in config.heads.items():
            if not (isinstance(n, int) and n >= 1):
                raise ValueError(f"num_classes must be an int >= 1, got num_classes={n!r} "
                                 f"(head {name!r})")
        self.config = config
        self.stride = STRIDES[config.variant]
        c1, c2, c3, c4, c5, cfc = block_channels(config.width)
        self.features = vgg16_features(width=config.width, in_channels=config.in_channels)
        self.fc6 = FullyConvolutional(c5, cfc, kernel_size=7)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(0.5)
        self.fc7 = FullyConvolutional(cfc, cfc, kernel_size=1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(0.5)
        self.heads = nn.ModuleDict(
            {name: ScoreHead(config.variant, n, c3, c4, cfc) for name, n in config.heads.items()}
        )
        atonce = config.variant == "fcn8s_atonce"
        # Fixed (reference lr_mult=0) scales, kept as buffers so they travel with the state dict.
        self.register_buffer("scale_pool4", torch.tensor(ATONCE_SCALE_POOL4 if atonce else 1.0))
        self.register_buffer("scale_pool3", torch.tensor(ATONCE_SCALE_POOL3 if atonce else 1.0))
        self.offsets = self._crop_offsets()
        self._init_trunk()

    def _init_trunk(self) -> None:
        """Random init as torchvision's VGG (kaiming normal, fan_out): PyTorch's default
        conv init leaves a 15-layer plain net without normalisation nearly untrainable from
        scratch. Pretrained weights (transplant_vgg16) overwrite it."""
        for m in [*self.features, self.fc6, self.fc7]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def _crop_offsets(self) -> dict[str, int]:
        """Crop offsets per crop layer, derived from the geometry of the layers."""
        feats = list(self.features)
        pool3 = coord_through(feats[:17])
        pool4 = coord_through(feats[:24])
        score_fr = coord_through(feats + [self.fc6, self.fc7])
        head = next(iter(self.heads.values()))
        if self.stride == 32:
            return {"score": crop_offset(coord_step(head.upscore, score_fr), IDENTITY)}
        upscore2 = coord_step(head.upscore2, score_fr)
        offsets = {"score_pool4c": crop_offset(pool4, upscore2)}
        if self.stride == 16:
            offsets["score"] = crop_offset(coord_step(head.upscore16, upscore2), IDENTITY)
            return offsets
        upscore_pool4 = coord_step(head.upscore_pool4, upscore2)
        offsets["score_pool3c"] = crop_offset(pool3, upscore_pool4)
        offsets["score"] = crop_offset(coord_step(head.upscore8, upscore_pool4), IDENTITY)
        return offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a 4-D tensor (N, C, H, W), got x of shape {shape}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must have in_channels={self.config.in_channels} channels, "
                             f"got x of shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        pool3, pool4, pool5 = run_features(self.features, x)
        fc7 = self.drop7(self.relu7(self.fc7(self.drop6(self.relu6(self.fc6(pool5))))))
        out = {name: self._head(head, fc7, pool4, pool3, h, w) for name, head in self.heads.items()}
        return out[SINGLE_HEAD] if self.config.single else out

    def _head(self, head: ScoreHead, fc7, pool4, pool3, h: int, w: int) -> torch.Tensor:
        o = self.offsets
        score_fr = head.score_fr(fc7)  # (N, C, ~H/32 - 6, ...)
        if self.stride == 32:
            return crop(head.upscore(score_fr), o["score"], h, w)
        upscore2 = head.upscore2(score_fr)  # (N, C, ~H/16, ...)
        score_pool4 = head.score_pool4(pool4 * self.scale_pool4)
        fuse_pool4 = upscore2 + crop(score_pool4, o["score_pool4c"], *upscore2.shape[-2:])
        if self.stride == 16:
            return crop(head.upscore16(fuse_pool4), o["score"], h, w)
        upscore_pool4 = head.upscore_pool4(fuse_pool4)  # (N, C, ~H/8, ...)
        score_pool3 = head.score_pool3(pool3 * self.scale_pool3)
        fuse_pool3 = upscore_pool4 + crop(score_pool3, o["score_pool3c"], *upscore_pool4.shape[-2:])
        return crop(head.upscore8(fuse_pool3), o["score"], h, w)


class LateFusion(nn.Module):
    """NYUD RGB-HHA late fusion (reference nyud-fcn32s-color-hha): one FCN on colour, one on
    HHA, their scores averaged (Eltwise SUM, coeff 0.5 / 0.5) and upsampled.

    The reference averages the two ``score_fr`` and upsamples once; the upsampling and the crop
    are linear and (``learn_upsampling: false``) the same fixed bilinear kernel in both
    streams, so averaging the two streams' outputs is the same function:
    upscore(0.5 a + 0.5 b) = 0.5 upscore(a) + 0.5 upscore(b). Promoted to 16s / 8s, each
    stream gains its own skips and the average stays at the output.
    Input (N, 6, H, W): BGR minus mean, then HHA minus mean."""

    def __init__(self, color: FCN, hha: FCN):
        super().__init__()
        if color.config != hha.config:
            raise ValueError(f"the two streams of a late-fusion net must have the same config, "
                             f"got color={color.config} and hha={hha.config}")
        self.color, self.hha = color, hha
        self.config, self.stride, self.offsets = color.config, color.stride, color.offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 6:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (N, 6, H, W) (BGR then HHA), got x of shape {shape}")
        a, b = self.color(x[:, :3]), self.hha(x[:, 3:])
        if isinstance(a, dict):
            return {k: 0.5 * a[k] + 0.5 * b[k] for k in a}
        return 0.5 * a + 0.5 * b


SCORE_LAYERS = ("score_fr", "score_pool4", "score_pool3")


def scores_untrained(model: nn.Module) -> bool:
    """True while every score layer of the net is still zero, as the reference initializes
    score_fr and the skips' score layers (FCN-32s/16s/8s, the AlexNet and GoogLeNet stride-32
    nets, late fusion of two of them). Every path to the output then runs through a zero 1x1
    conv, bias-free deconvolutions, crops and sums: the scores are exactly zero for any finite
    input, and argmax (its first index on ties) predicts class 0 at every pixel. A validation
    of such a net needs no forward pass. Pass the plain net (``precision.unwrap``)."""
    from fcn_core.stride32 import Stride32FCN  # it imports this module

    if isinstance(model, LateFusion):
        return scores_untrained(model.color) and scores_untrained(model.hha)
    if not isinstance(model, FCN | Stride32FCN):
        return False
    if any(m.bias is not None for m in model.modules() if isinstance(m, nn.ConvTranspose2d)):
        return False
    for head in model.heads.values():
        for name in SCORE_LAYERS:
            conv = getattr(head, name, None)
            if conv is None:
                continue
            if bool(conv.weight.any()) or (conv.bias is not None and bool(conv.bias.any())):
                return False
    return True


def _build(
    variant: str, num_classes: int, width: float, in_channels: int,
    heads: Mapping[str, int] | None,
) -> FCN:
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes must be an int >= 1, got num_classes={num_classes!r}")
    if not (isinstance(in_channels, int) and in_channels >= 1):
        raise ValueError(f"in_channels must be an int >= 1, got in_channels={in_channels!r}")
    check_width(width)
    head_map = {SINGLE_HEAD: num_classes} if heads is None else dict(heads)
    return FCN(FCNConfig(variant=variant, heads=head_map, width=float(width),
                         in_channels=in_channels))


def fcn32s(*, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
           heads: Mapping[str, int] | None = None) -> FCN:
    """FCN-32s: score_fr upsampled 32x by one fixed bilinear deconvolution."""
    return _build("fcn32s", num_classes, width, in_channels, heads)


def fcn16s(*, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
           heads: Mapping[str, int] | None = None) -> FCN:
    """FCN-16s: FCN-32s plus the pool4 skip (score_pool4 fused at stride 16)."""
    return _build("fcn16s", num_classes, width, in_channels, heads)


def fcn8s(*, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
          heads: Mapping[str, int] | None = None) -> FCN:
    """FCN-8s: FCN-16s plus the pool3 skip (score_pool3 fused at stride 8)."""
    return _build("fcn8s", num_classes, width, in_channels, heads)


def fcn8s_atonce(*, num_classes: int = 21, width: float = 1.0, in_channels: int = 3,
                 heads: Mapping[str, int] | None = None) -> FCN:
    """FCN-8s trained in one stage; pool4 x 0.01 and pool3 x 0.0001 before their score layers."""
    return _build("fcn8s_atonce", num_classes, width, in_channels, heads)


BUILDERS = {"fcn32s": fcn32s, "fcn16s": fcn16s, "fcn8s": fcn8s, "fcn8s_atonce": fcn8s_atonce}


def build(config: FCNConfig) -> FCN:
    """Rebuild a net from its (saved) config."""
    return FCN(config)
