"""Training configuration: frozen dataclasses, loaded from the YAML presets in configs/.

No inheritance between presets: each YAML file says everything it changes from the defaults
below, and the resolved config is saved with every checkpoint and logged to MLflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGE_VARIANTS = {"32s": "fcn32s", "16s": "fcn16s", "8s": "fcn8s", "8s-atonce": "fcn8s_atonce"}
INPUTS = ("rgb", "hha", "rgbd", "rgb-hha")  # NYUD: colour, HHA, 4-channel, late fusion
SCHEDULES = ("fixed", "poly")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement strategies
OPTIMIZERS = ("sgd", "adam")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the field."""


@dataclass(frozen=True)
class StageConfig:
    name: str  # "32s" | "16s" | "8s" | "8s-atonce"
    steps: int  # optimizer steps (global batches) in this stage
    lr: float  # base learning rate (the reference: 1e-10, 1e-12, 1e-14 with a summed loss)

    @property
    def variant(self) -> str:
        return STAGE_VARIANTS[self.name]


@dataclass(frozen=True)
class TrainConfig:
    name: str = "fcn"  # run name; MLflow run names and Ray Train run folders derive from it
    dataset: str = "voc"  # which mean / classes: voc | sbd | nyud | siftflow | synthetic
    train_split: str = "train"
    val_split: str = "val"
    # model
    width: float = 1.0  # VGG16 channel multiplier (1.0 = the real net)
    input: str = "rgb"  # rgb | hha | rgbd (4-channel conv1_1) | rgb-hha (late fusion)
    heads: dict[str, int] | None = None  # several score heads, e.g. {semantic: 33, geometric: 3}
    backbone_weights: str | None = None  # local torchvision vgg16 state dict; None = random
    learn_upsampling: bool = True  # paper: intermediate deconvs learn; reference code: fixed
    stages: tuple[StageConfig, ...] = (
        StageConfig("32s", 100, 1e-10), StageConfig("16s", 100, 1e-12),
        StageConfig("8s", 100, 1e-14))
    # optimisation (reference solver)
    optimizer: str = "sgd"  # sgd (the reference) | adam (trains a random-init trunk faster)
    batch_size: int = 1  # images per worker per step
    momentum: float = 0.99
    weight_decay: float = 5e-4
    bias_lr_mult: float = 2.0  # biases: lr x2, no decay
    normalize_loss: bool = False  # False: summed over pixels (reference), True: mean
    schedule: str = "fixed"  # fixed | poly (lr * (1 - step/steps) ** poly_power)
    poly_power: float = 0.9
    mirror: bool = True  # random left-right flips
    pad_multiple: int = 1  # pad batches up to a multiple of this (32 helps cuDNN/oneDNN)
    channels_last: bool = True  # NHWC convolutions: ~20% faster on CPU (bench_model.py)
    seed: int = 1337
    # distribution (Ray Train)
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # < 1 leaves CPUs for Ray Data on small machines
    placement_strategy: str = "PACK"  # workers on few nodes (PACK) or across nodes (SPREAD)
    checkpoint_every: int = 50  # steps between checkpoints (and resume points)
    val_every: int = 50  # steps between validations (0 = only at the end of a stage)
    max_failures: int = 2  # worker failures a stage survives (restart from a checkpoint)
    cache_dataset: bool = True  # keep the splits' shard bytes in Ray's object store
    threads_per_worker: int = 0  # torch threads per worker (0 = CPUs per worker, at least 1)
    fail_at_step: int | None = None  # fault injection: one worker raises once at this step

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name} {why}, got {name}={getattr(self, name)!r}")

        if self.width <= 0:
            raise bad("width", "must be > 0")
        if self.input not in INPUTS:
            raise bad("input", f"must be one of {', '.join(INPUTS)}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if self.placement_strategy not in PLACEMENTS:
            raise bad("placement_strategy", f"must be one of {', '.join(PLACEMENTS)}")
        for name in ("batch_size", "workers", "checkpoint_every", "pad_multiple"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be >= 1")
        if self.val_every < 0:
            raise bad("val_every", "must be >= 0")
        if self.cpus_per_worker <= 0:
            raise bad("cpus_per_worker", "must be > 0")
        if not self.stages:
            raise bad("stages", "must name at least one stage")
        names = [s.name for s in self.stages]
        if "8s-atonce" in names and len(names) > 1:
            raise bad("stages", "8s-atonce trains in one stage on its own")
        order = ["32s", "16s", "8s"]
        if "8s-atonce" not in names and names != order[order.index(names[0]):][:len(names)]:
            raise bad("stages", "must follow 32s -> 16s -> 8s (a suffix may start later)")
        for s in self.stages:
            if s.steps < 1 or s.lr <= 0:
                raise ConfigError(f"stage {s.name}: steps must be >= 1 and lr > 0, got "
                                  f"steps={s.steps}, lr={s.lr}")

    @property
    def in_channels(self) -> int:
        return {"rgb": 3, "hha": 3, "rgbd": 4, "rgb-hha": 3}[self.input]

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


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig, refusing unknown keys with their names."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(known))})")
    data = dict(data)
    if "stages" in data:
        stages = []
        for s in data["stages"]:
            if not isinstance(s, dict) or set(s) - {"name", "steps", "lr"} or "name" not in s:
                raise ConfigError(f"each stage needs name, steps, lr; got {s!r}")
            if s["name"] not in STAGE_VARIANTS:
                raise ConfigError(f"stage name must be one of {', '.join(STAGE_VARIANTS)}, "
                                  f"got {s['name']!r}")
            stages.append(StageConfig(str(s["name"]), int(s.get("steps", 100)),
                                      float(s.get("lr", 1e-10))))
        data["stages"] = tuple(stages)
    try:
        return TrainConfig(**data)
    except TypeError as e:
        raise ConfigError(str(e)) from None


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a YAML preset; ``overrides`` (e.g. from the CLI) win over the file."""
    from pipelines import storage

    p = storage.as_location(path)
    try:
        text = storage.read_text(p)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{p} is not valid YAML{where}: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of config keys")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(data)


@dataclass(frozen=True)
class StageResult:
    stage: str
    checkpoint: str  # directory of the final checkpoint
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)  # last validation + loss
    run_id: str | None = None  # MLflow run of the stage
    seconds: float = 0.0
