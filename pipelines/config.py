"""Training configuration: frozen dataclasses, loaded from the YAML presets in configs/.

No inheritance between presets: each YAML file says everything it changes from the defaults
below, and the resolved config is saved with every checkpoint and logged to MLflow.

A config is validated as a whole when it is built (``TrainConfig(...)``, ``from_dict``,
``load_config``, ``dataclasses.replace``): every field's type and range, then the rules
between fields. A ``ConfigError`` names every bad field with its value on one line, e.g.
``config tiny.yaml: stages[1].lr: must be > 0, got -0.1``. Numbers written as YAML 1.1
reads them as strings (``weight_decay: 5e-4`` has no dot, so PyYAML returns "5e-4") are read
as numbers; anything else where a number belongs is refused by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import UserError
from pipelines.sources.datasets import DEPTH, GEO
from pipelines.sources.datasets import NAMES as DATASETS

STAGE_VARIANTS = {"32s": "fcn32s", "16s": "fcn16s", "8s": "fcn8s", "8s-atonce": "fcn8s_atonce"}
# The one stage of a `model:` net (the successors train in one stage; staging is FCN's).
MODEL_STAGE = "train"
# The successors of issue 15 (fcn_core.models names beyond the FCNs; a test keeps them equal).
MODELS = ("unet", "segnet", "deeplab_largefov", "pspnet_resnet50", "deeplabv3plus_resnet50",
          "refinenet_resnet50",
          "fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
          "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
FIXED_WIDTH = MODELS[3:]  # on torchvision's nets: no width multiplier
# The classifier each FCN adapts (the paper's Table 1). Only VGG16 has the 16s/8s skips; the
# others are FCN-32s nets (fcn_core.models: fcn32s_alexnet, fcn32s_googlenet).
BACKBONES = ("vgg16", "alexnet", "googlenet")
INPUTS = ("rgb", "hha", "rgbd", "rgb-hha")  # NYUD: colour, HHA, 4-channel, late fusion
SCHEDULES = ("fixed", "poly")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement strategies
OPTIMIZERS = ("sgd", "adam")
SAMPLING = ("random", "shuffle", "stream")  # pipelines.train.sampling
CLASS_WEIGHTS = ("none", "inverse_frequency", "median_frequency")  # fcn_core.losses
AMP = ("off", "bf16", "fp16", "auto")  # fcn_core.precision.AMP (not imported: it needs torch)
STAGE_ORDER = ("32s", "16s", "8s")
DEPTH_DATASETS = DEPTH  # the datasets whose rows carry depth and HHA images
GEO_DATASETS = GEO  # the datasets whose rows carry a second label (label_geo)


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the field."""


# --------------------------------------------------------------- one value, one rule


class _Invalid(Exception):
    """Why one value is refused (internal: becomes a ConfigError naming the field)."""


# Numbers as YAML 1.1 leaves them in strings: "5e-4", "1e5", "+3", ".5" (no inf/nan words).
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(value: Any) -> int | float:
    if isinstance(value, bool):  # a bool is an int to Python, never a number to a user
        raise _Invalid("must be a number")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip()
        return float(text) if any(c in text for c in ".eE") else int(text)
    raise _Invalid("must be a number")


def _real(value: Any, *, gt: float | None = None, ge: float | None = None,
          lt: float | None = None, le: float | None = None) -> float:
    x = float(_number(value))
    if not math.isfinite(x):
        raise _Invalid("must be a finite number")
    if gt is not None and not x > gt:
        raise _Invalid(f"must be > {gt:g}")
    if ge is not None and not x >= ge:
        raise _Invalid(f"must be >= {ge:g}")
    if lt is not None and not x < lt:
        raise _Invalid(f"must be < {lt:g}")
    if le is not None and not x <= le:
        raise _Invalid(f"must be <= {le:g}")
    return x


def _int(value: Any, *, ge: int, lt: int | None = None) -> int:
    x = _number(value)
    if isinstance(x, float):
        if not (math.isfinite(x) and x.is_integer()):
            raise _Invalid("must be a whole number")
        x = int(x)
    if x < ge:
        raise _Invalid(f"must be >= {ge}")
    if lt is not None and x >= lt:
        raise _Invalid(f"must be < {lt}")
    return x


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _bool_or_auto(value: Any) -> bool | str:
    if value == "auto" or isinstance(value, bool):
        return value
    raise _Invalid("must be true, false or auto")


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise _Invalid(f"must be one of {', '.join(options)}")
        return value
    return check


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("must be a non-empty string")
    return value


def _run_name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise _Invalid("must be 1-64 letters, digits, '.', '_' or '-' (it names run folders "
                       "and MLflow runs), starting with a letter or digit")
    return value


def _optional(rule: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else rule(value)


def _location(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("must be a file path or a URI")
    return value


def _scale_range(value: Any) -> tuple[float, float]:
    """``random_scale``: [low, high], each image resized by a factor drawn uniformly in it."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _Invalid("must be [low, high], e.g. [0.5, 2.0]")
    low, high = (_real(v, gt=0, le=8) for v in value)
    if low > high:
        raise _Invalid("must be [low, high] with low <= high")
    return (low, high)


def _heads(value: Any, errors: list[str]) -> dict[str, int] | None:
    """``heads``: None, or {name: classes} with one or two entries (label, then label_geo)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value or len(value) > 2:
        errors.append(f"heads: must map one or two head names to their class counts, e.g. "
                      f"{{semantic: 33, geometric: 3}}, got {_show(value)}")
        return None
    n = len(errors)
    bad = [k for k in value if not isinstance(k, str) or not k]
    errors += [f"heads: head names must be strings, got {_show(k)}" for k in bad]
    out = _check({k: lambda v: _int(v, ge=1) for k in value if k not in bad}, value,
                 "heads.", errors)
    return out if len(errors) == n else None


FUSION_STREAMS = ("color", "hha")


def _fusion_init(value: Any, errors: list[str]) -> dict[str, str] | None:
    """``fusion_init``: None, or {color: CKPT, hha: CKPT}, the trained single-stream FCN-32s
    nets a late-fusion net starts from (the reference nyud-fcn32s-color-hha)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or sorted(value) != sorted(FUSION_STREAMS):
        errors.append(f"fusion_init: must map color and hha to checkpoints, e.g. {{color: "
                      f"runs/rgb/32s, hha: runs/hha/32s}}, got {_show(value)}")
        return None
    n = len(errors)
    out = _check({k: _location for k in FUSION_STREAMS}, value, "fusion_init.", errors)
    return {k: out[k] for k in FUSION_STREAMS} if len(errors) == n else None


def _check(rules: Mapping[str, Callable[[Any], Any]], values: Mapping[str, Any], prefix: str,
           errors: list[str]) -> dict[str, Any]:
    """Every value through its rule; the refused ones appended to ``errors``."""
    out = {}
    for key, rule in rules.items():
        if key not in values:
            continue
        try:
            out[key] = rule(values[key])
        except _Invalid as e:
            errors.append(f"{prefix}{key}: {e}, got {_show(values[key])}")
    return out


def _unknown(keys: Any, known: Any, prefix: str) -> list[str]:
    errors = []
    for key in sorted(set(keys) - set(known), key=str):
        close = difflib.get_close_matches(str(key), list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else \
            f" (known: {', '.join(sorted(known))})"
        errors.append(f"{prefix}unknown key {key!r}{hint}")
    return errors


def _raise(errors: list[str]) -> None:
    if errors:
        raise ConfigError("; ".join(errors))


# ---------------------------------------------------------------------- the config


STAGE_TRAIN = ("all", "score_only")  # score_only: the paper's FCN-32s-fixed (score_fr only)
_STAGE_RULES: dict[str, Callable[[Any], Any]] = {
    "name": _choice((*STAGE_VARIANTS, MODEL_STAGE)),
    "steps": lambda v: _int(v, ge=1),
    "lr": lambda v: _real(v, gt=0),
    "train": _choice(STAGE_TRAIN),
}
_STAGE_REQUIRED = ("name", "steps", "lr")


@dataclass(frozen=True)
class StageConfig:
    name: str  # "32s" | "16s" | "8s" | "8s-atonce" | "train" (the one stage of a model: net)
    steps: int  # optimizer steps (global batches) in this stage
    lr: float  # base learning rate (the reference: 1e-10, 1e-12, 1e-14 with a summed loss)
    train: str = "all"  # all | score_only (only score_fr learns: the paper's "FCN-32s-fixed")

    def __post_init__(self) -> None:
        errors: list[str] = []
        values = _check(_STAGE_RULES, dataclasses.asdict(self), "stage.", errors)
        _raise(errors)
        for k, v in values.items():
            object.__setattr__(self, k, v)

    @property
    def variant(self) -> str:
        """The FCN this stage trains (a ``train`` stage: the config's ``model``)."""
        return STAGE_VARIANTS.get(self.name, "")


def _stage(value: Any, where: str, errors: list[str]) -> StageConfig | None:
    """One entry of ``stages`` (a StageConfig or a {name, steps, lr} mapping)."""
    if isinstance(value, StageConfig):
        return value
    if not isinstance(value, Mapping):
        errors.append(f"{where}: must be a mapping {{name, steps, lr}}, got {_show(value)}")
        return None
    n = len(errors)
    errors += _unknown(value, _STAGE_RULES, f"{where}: ")
    errors += [f"{where}.{k}: missing (each stage names name, steps and lr)"
               for k in _STAGE_REQUIRED if k not in value]
    values = _check(_STAGE_RULES, value, f"{where}.", errors)
    return StageConfig(**values) if len(errors) == n else None


_INVALID = object()  # a model value already reported: its stages are not checked against it


def _stages(value: Any, errors: list[str], model: Any = None) -> tuple[StageConfig, ...] | None:
    if not isinstance(value, (list, tuple)):
        errors.append(f"stages: must be a list of {{name, steps, lr}} mappings, got "
                      f"{_show(value)}")
        return None
    if not value:
        errors.append("stages: must name at least one stage, got []")
        return None
    stages = [_stage(s, f"stages[{i}]", errors) for i, s in enumerate(value)]
    if any(s is None for s in stages):
        return None
    names = [s.name for s in stages if s is not None]
    fixed = [s.name for s in stages[:-1] if s is not None and s.train == "score_only"]
    if fixed:
        errors.append(f"stages: train: score_only (a fixed trunk) ends a config, got it on "
                      f"{fixed[0]}, which another stage follows")
    if model is _INVALID:
        pass
    elif model is not None or MODEL_STAGE in names:
        if names != [MODEL_STAGE] or model is None:
            errors.append(f"stages: a model: net ({', '.join(MODELS[:3])}, ...) trains in one "
                          f"stage named {MODEL_STAGE!r} and FCNs in 32s, 16s, 8s or 8s-atonce "
                          f"stages, got {names} with model={model!r}")
    elif "8s-atonce" in names and len(names) > 1:
        errors.append(f"stages: 8s-atonce trains in one stage on its own, got {names}")
    elif "8s-atonce" not in names and \
            names != list(STAGE_ORDER[STAGE_ORDER.index(names[0]):])[:len(names)]:
        errors.append(f"stages: must follow 32s -> 16s -> 8s (a suffix may start later), "
                      f"got {names}")
    return tuple(s for s in stages if s is not None)


_RULES: dict[str, Callable[[Any], Any]] = {
    "name": _run_name,
    "dataset": _choice(DATASETS),
    "train_split": _text,
    "val_split": _text,
    "width": lambda v: _real(v, gt=0),
    "input": _choice(INPUTS),
    "backbone": _choice(BACKBONES),
    "model": _optional(_choice(MODELS)),
    "backbone_weights": _optional(_location),
    "learn_upsampling": _bool,
    "optimizer": _choice(OPTIMIZERS),
    "batch_size": lambda v: _int(v, ge=1),
    "momentum": lambda v: _real(v, ge=0, lt=1),
    "weight_decay": lambda v: _real(v, ge=0),
    "bias_lr_mult": lambda v: _real(v, ge=0),
    "normalize_loss": _bool,
    "schedule": _choice(SCHEDULES),
    "poly_power": lambda v: _real(v, gt=0),
    "mirror": _bool,
    "jitter": lambda v: _int(v, ge=0),
    "random_scale": _optional(_scale_range),
    "crop_size": lambda v: _int(v, ge=0),
    "loss_sampling": lambda v: _real(v, gt=0, le=1),
    "class_weights": _choice(CLASS_WEIGHTS),
    "sampling": _choice(SAMPLING),
    "pad_multiple": lambda v: _int(v, ge=1),
    # auto: NHWC on GPUs and under bf16/fp16, NCHW for fp32 on a CPU (resolve_channels_last)
    "channels_last": _bool_or_auto,
    # YAML 1.1 reads an unquoted `amp: off` as false: that is "off", not an error.
    "amp": lambda v: "off" if v is False else _choice(AMP)(v),
    "compile": _bool,
    "seed": lambda v: _int(v, ge=0, lt=2**63),
    "workers": lambda v: _int(v, ge=1),
    "use_gpu": _bool,
    "cpus_per_worker": lambda v: _real(v, gt=0),
    "placement_strategy": _choice(PLACEMENTS),
    "checkpoint_every": lambda v: _int(v, ge=1),
    "val_every": lambda v: _int(v, ge=0),
    "max_failures": lambda v: _int(v, ge=-1),  # -1: Ray Train retries forever
    "cache_dataset": _bool,
    "threads_per_worker": lambda v: _int(v, ge=0),
    "fail_at_step": _optional(lambda v: _int(v, ge=0)),
}


@dataclass(frozen=True)
class TrainConfig:
    name: str = "fcn"  # run name; MLflow run names and Ray Train run folders derive from it
    dataset: str = "voc"  # which mean / classes: one of pipelines.sources.datasets.NAMES
    train_split: str = "train"
    val_split: str = "val"
    # model
    width: float = 1.0  # VGG16 channel multiplier (1.0 = the real net)
    input: str = "rgb"  # rgb | hha | rgbd (4-channel conv1_1) | rgb-hha (late fusion)
    heads: dict[str, int] | None = None  # several score heads, e.g. {semantic: 33, geometric: 3}
    backbone: str = "vgg16"  # vgg16 | alexnet | googlenet (FCN-32s only): the paper's Table 1
    # A successor instead of an FCN (one of MODELS, e.g. deeplabv3_resnet50): one `train` stage
    model: str | None = None
    # a local torchvision vgg16 (alexnet, googlenet) state dict; None = random
    backbone_weights: str | None = None
    # rgb-hha: start the first stage from a trained colour and a trained HHA FCN-32s
    fusion_init: dict[str, str] | None = None  # {color: CKPT, hha: CKPT}
    learn_upsampling: bool = True  # paper: intermediate deconvs learn; reference code: fixed
    stages: tuple[StageConfig, ...] = (
        StageConfig("32s", 100, 1e-10), StageConfig("16s", 100, 1e-12),
        StageConfig("8s", 100, 1e-14))
    # optimisation (reference solver)
    optimizer: str = "sgd"  # sgd (the reference) | adam (trains a random-init trunk faster)
    batch_size: int = 1  # images per worker per step
    momentum: float = 0.99  # [0, 1)
    weight_decay: float = 5e-4
    bias_lr_mult: float = 2.0  # biases: lr x2, no decay
    normalize_loss: bool = False  # False: summed over pixels (reference), True: mean
    schedule: str = "fixed"  # fixed | poly (lr * (1 - step/steps) ** poly_power)
    poly_power: float = 0.9
    mirror: bool = True  # random left-right flips
    jitter: int = 0  # random translation up to this many pixels each way (the paper: 32)
    # DeepLab's / PSPNet's recipe: each image resized by a random factor in [low, high]
    # (labels nearest), then a random crop_size x crop_size crop (padded with the mean and
    # ignored labels where the image is smaller). None / 0: whole images, as FCN trains.
    random_scale: tuple[float, float] | None = None
    crop_size: int = 0
    loss_sampling: float = 1.0  # keep each score-grid cell's loss with this probability
    class_weights: str = "none"  # none | inverse_frequency | median_frequency (train split)
    # random: a uniformly random row every step, with replacement (the reference layers);
    # shuffle: a new permutation every epoch; stream: Ray Data's order (splits too big for RAM)
    sampling: str = "shuffle"
    pad_multiple: int = 1  # pad batches up to a multiple of this (32 helps cuDNN/oneDNN)
    # NHWC convolutions: true | false | auto (NHWC on GPUs and under bf16/fp16 autocast, NCHW
    # for fp32 on a CPU, where full-width FCN-8s trained 1.3-1.5x faster on AVX2; bench_model)
    channels_last: bool | str = "auto"
    # off (fp32) | bf16 (autocast; CPU avx512_bf16 or GPU) | fp16 (GPU only) | auto (bf16 where
    # the worker's device runs it natively, else off)
    amp: str = "off"
    compile: bool = False  # torch.compile the net (falls back to eager with a warning)
    seed: int = 1337
    # distribution (Ray Train)
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # < 1 leaves CPUs for Ray Data on small machines
    placement_strategy: str = "PACK"  # workers on few nodes (PACK) or across nodes (SPREAD)
    checkpoint_every: int = 50  # steps between checkpoints (and resume points)
    val_every: int = 50  # steps between validations (0 = only at the end of a stage)
    max_failures: int = 2  # worker failures a stage survives (restart from a checkpoint)
    cache_dataset: bool = True  # sampling: stream: keep the splits in Ray's object store
    threads_per_worker: int = 0  # torch threads per worker (0 = CPUs per worker, at least 1)
    fail_at_step: int | None = None  # fault injection: one worker raises once at this step

    def __post_init__(self) -> None:
        """Check and normalise every field (numbers in strings, ints where floats belong),
        then the rules between fields; every problem found goes into one ConfigError."""
        errors: list[str] = []
        values = _check(_RULES, {f.name: getattr(self, f.name)
                                 for f in dataclasses.fields(self)}, "", errors)
        values["heads"] = _heads(self.heads, errors)
        values["fusion_init"] = _fusion_init(self.fusion_init, errors)
        values["stages"] = _stages(self.stages, errors, values.get("model", _INVALID))
        _raise(errors)
        for k, v in values.items():
            object.__setattr__(self, k, v)
        if self.input != "rgb" and self.dataset not in DEPTH_DATASETS:
            errors.append(f"input: {self.input!r} needs depth/HHA images, which only "
                          f"{', '.join(DEPTH_DATASETS)} rows have, got dataset={self.dataset!r}")
        if self.fusion_init and self.input != "rgb-hha":
            errors.append(f"fusion_init: starts a late-fusion net (input: rgb-hha), got "
                          f"input={self.input!r}")
        if self.model is not None:
            if self.backbone != "vgg16":
                errors.append(f"model: {self.model!r} is a whole net; backbone: chooses an "
                              f"FCN's trunk, got backbone={self.backbone!r} too")
            if self.input != "rgb" or (self.heads and len(self.heads) > 1):
                errors.append(f"model: {self.model!r} reads RGB images into one score head, "
                              f"got input={self.input!r}, heads={self.heads!r}")
            if any(st.train != "all" for st in self.stages):
                errors.append(f"model: {self.model!r} has no score_fr: train must be 'all'")
            if self.model == "unet" and self.backbone_weights:
                errors.append("backbone_weights: unet has no pretrained backbone to load (it "
                              "starts from He initialisation): leave it out")
            if self.width != 1.0 and self.model in FIXED_WIDTH:
                errors.append(f"width: {self.model!r} is torchvision's net, which has no width "
                              f"multiplier: width must be 1.0, got {self.width}")
            if self.model.startswith(("deeplabv3", "pspnet")) and self.batch_size < 2:
                errors.append(f"batch_size: {self.model!r} needs at least 2 images per worker "
                              f"(its image-level pooling batch-normalises one value per image), "
                              f"got {self.batch_size}")
        if self.backbone != "vgg16" and self.model is None:
            names = [st.name for st in self.stages]
            if names != ["32s"]:
                errors.append(f"backbone: {self.backbone!r} nets are FCN-32s only (the skips "
                              f"of 16s and 8s are VGG16's), so stages must be one 32s stage, "
                              f"got {names}")
            if self.input not in ("rgb", "hha"):
                errors.append(f"backbone: {self.backbone!r} reads 3-channel images (input: rgb "
                              f"or hha), got input={self.input!r}")
        if self.amp == "fp16" and not self.use_gpu:
            errors.append("amp: 'fp16' needs GPUs (use_gpu: true, or --gpu); on CPUs use "
                          "amp: bf16")
        if self.class_weights != "none" and self.heads and len(self.heads) > 1:
            errors.append(f"class_weights: {self.class_weights!r} weighs one head's classes; "
                          f"this config has {len(self.heads)} heads")
        if self.heads and len(self.heads) > 1 and self.dataset not in GEO_DATASETS:
            errors.append(f"heads: a second head reads label_geo, which only "
                          f"{', '.join(GEO_DATASETS)} rows have, got dataset={self.dataset!r}")
        _raise(errors)

    @property
    def in_channels(self) -> int:
        return {"rgb": 3, "hha": 3, "rgbd": 4, "rgb-hha": 3}[self.input]

    def stage_variant(self, stage: StageConfig) -> str:
        """The ``fcn_core.build_model`` name a stage trains: VGG16's fcn32s/16s/8s/8s_atonce,
        fcn32s_alexnet / fcn32s_googlenet, or the config's ``model``."""
        if self.model is not None:
            return self.model
        return stage.variant if self.backbone == "vgg16" else f"fcn32s_{self.backbone}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"] = [dataclasses.asdict(s) for s in self.stages]
        return d

    def digest(self) -> str:
        """Hash of everything that changes what is trained (cache keys, registry tags)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def only_stages(self, names: list[str]) -> TrainConfig:
        """The same config restricted to some stages, e.g. ``--stages 32s,16s``."""
        unknown = [n for n in names if n not in {s.name for s in self.stages}]
        if unknown:
            raise ConfigError(f"stages {unknown} are not in the config (it has "
                              f"{', '.join(s.name for s in self.stages)})")
        return dataclasses.replace(self, stages=tuple(s for s in self.stages if s.name in names))


def from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a mapping (a YAML file, ``to_dict()``), refusing unknown keys
    by name and every bad value with its field."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of config keys, got {_show(data)}")
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    _raise(_unknown(data, known, ""))
    return TrainConfig(**data)


PROJECT = Path(__file__).resolve().parents[1]  # the checkout, or /app in the image


def preset_path(path: str | Path) -> str | Path:
    """``path``, or where a relative one that is not here is in the project (its
    ``configs/`` presets): `fcn demo` run from another folder finds ``configs/demo.yaml``."""
    if isinstance(path, str) and "://" in path:
        return path
    p = Path(path)
    if p.is_absolute() or p.exists() or not (PROJECT / p).is_file():
        return path
    return PROJECT / p


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a YAML preset (a relative path not found here is looked up in the project, as
    ``preset_path``); ``overrides`` (e.g. from the CLI) win over the file. Errors start
    with ``config <path>:``."""
    from pipelines import storage

    p = storage.as_location(preset_path(path))
    where = f"config {path}"
    try:
        text = storage.read_text(p)
    except FileNotFoundError:  # other storage errors (a folder, denied) are one line too
        raise ConfigError(f"config file not found: {p}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{where}: not valid YAML{at}: {what}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of config keys (key: value lines), "
                          f"got a {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclass(frozen=True)
class StageResult:
    stage: str
    checkpoint: str  # directory of the final checkpoint
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)  # last validation + loss
    run_id: str | None = None  # MLflow run of the stage
    seconds: float = 0.0
