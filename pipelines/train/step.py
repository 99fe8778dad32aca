"""Plain torch: build a stage's net, one optimisation step, validation, replica checks.

Nothing here knows about Ray, MLflow or storage layouts (the worker and the driver do)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from fcn_core.fcn import FCN, SINGLE_HEAD, LateFusion, scores_untrained
from fcn_core.losses import multi_head_loss
from fcn_core.metrics import ConfusionMatrix
from fcn_core.models import build_model
from fcn_core.optim import param_groups
from fcn_core.precision import autocast, backward_step, unwrap
from fcn_core.surgery import promote, transplant_vgg16
from fcn_core.transforms import MEAN_BGR, MEAN_HHA
from fcn_core.zoo.torchvision_nets import AUX, AUX_WEIGHT
from pipelines import storage
from pipelines.config import StageConfig, TrainConfig
from pipelines.train.checkpoint import load_model

Log = Callable[[str], None]


def _label_keys(heads: list[str]) -> dict[str, str]:
    """Score head -> label column: the first head reads ``label``, a second ``label_geo``."""
    return dict(zip(heads, ("label", "label_geo"), strict=False))


def build_stage_model(cfg: TrainConfig, stage: StageConfig, num_classes: int,
                      init_checkpoint: str | None, log: Log = print,
                      previous: nn.Module | None = None) -> nn.Module:
    """The net a stage starts from: 32s (or at-once 8s) from VGG16 weights, otherwise the
    previous stage's final net promoted (the new skip starts at zero): ``previous`` when the
    same workers just trained it, else read from ``init_checkpoint``."""
    model = _initial_model(cfg, stage, num_classes, init_checkpoint, log, previous)
    if not cfg.learn_upsampling:  # the reference fixes every deconvolution (lr_mult: 0),
        freeze_upsampling(model)  # in every stage: a promoted net must not unfreeze them
    if stage.train == "score_only":  # the paper's FCN-32s-fixed: only the classifier learns
        learning = train_only_scores(model)
        log(f"train: score_only: {', '.join(learning)} learn; the rest is fixed")
    return model


def sync_batch_norm(model: nn.Module, use_gpu: bool, workers: int, log: Log = print
                    ) -> nn.Module:
    """A net with batch norms trained by several GPU workers normalises over all their
    batches (SyncBatchNorm, what users who scale out with BN need); on CPU workers (gloo)
    PyTorch's SyncBatchNorm does not run, so each worker keeps its own statistics."""
    if workers < 2 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                              for m in model.modules()):
        return model
    if not use_gpu:
        log(f"batch norm: {workers} CPU workers keep their own statistics (SyncBatchNorm "
            "needs GPUs)")
        return model
    log(f"batch norm: SyncBatchNorm across the {workers} workers")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def train_only_scores(model: nn.Module) -> list[str]:
    """Fix every parameter but the score_fr layers' (the last stage of a config: the config
    check refuses a stage after it); the names of those that still learn. Batch-norm layers
    of the fixed trunk (GoogLeNet's) stay in eval mode: they normalise with their running
    statistics and do not update them, so the trunk computes the same features throughout."""
    learning = []
    for name, p in model.named_parameters():
        keep = ".score_fr." in f".{name}"
        p.requires_grad_(keep)
        if keep:
            learning.append(name)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _keep_eval(m)
    return learning


def _keep_eval(m: nn.Module) -> None:
    """``m`` stays in eval mode whatever ``model.train()`` asks of it."""
    def train(mode: bool = True) -> nn.Module:
        return nn.Module.train(m, False)

    m.train = train  # type: ignore[method-assign]
    m.eval()


def freeze_upsampling(model: nn.Module) -> list[str]:
    """Fix every deconvolution (upscore*, upscore_pool*) at its current weights; the names."""
    frozen = [n for n, p in model.named_parameters() if "upscore" in n]
    for name, p in model.named_parameters():
        if "upscore" in name:
            p.requires_grad_(False)
    return frozen


def _initial_model(cfg: TrainConfig, stage: StageConfig, num_classes: int,
                   init_checkpoint: str | None, log: Log, previous: nn.Module | None
                   ) -> nn.Module:
    heads = cfg.heads or None
    if previous is not None or init_checkpoint:
        prev = previous if previous is not None else load_model(str(init_checkpoint))
        variant = cfg.stage_variant(stage)
        if variant in ("fcn8s_atonce", prev.config.variant):
            return prev
        return promote(prev)

    def one() -> nn.Module:
        return build_model(cfg.stage_variant(stage), num_classes=num_classes, width=cfg.width,
                           in_channels=cfg.in_channels, heads=heads)

    if cfg.input == "rgb-hha" and cfg.fusion_init:
        return fusion_from(cfg.fusion_init, stage, log)
    model: nn.Module = LateFusion(one(), one()) if cfg.input == "rgb-hha" else one()
    if cfg.backbone_weights:
        state = read_backbone(cfg.backbone_weights)
        nets = [model.color, model.hha] if isinstance(model, LateFusion) else [model]
        # What sits in the BGR slots of each net: colour (minus the dataset's mean) or HHA
        # (minus the HHA mean, in file order, as the reference feeds it).
        means = [MEAN_HHA] if cfg.input == "hha" else [MEAN_BGR[cfg.dataset], MEAN_HHA]
        for net, mean in zip(nets, means, strict=False):
            log(f"backbone {cfg.backbone_weights}: "
                f"{transplant(cfg.model or cfg.backbone, net, state, mean)}")
    else:
        what = f"{cfg.model} backbone" if cfg.model else f"{BACKBONE_NAMES[cfg.backbone]} trunk"
        log(f"warning: no backbone_weights given: the {what} starts from random weights")
    return model


BACKBONE_NAMES = {"vgg16": "VGG16", "alexnet": "AlexNet", "googlenet": "GoogLeNet"}


def transplant(backbone: str, net: nn.Module, state: dict[str, torch.Tensor],
               mean: tuple[float, float, float]) -> str:
    """Load a torchvision ``backbone`` state dict (or, for a ``model:`` net, its backbone's
    classification state dict) into ``net`` (conv1 re-expressed for BGR minus ``mean``); one
    line saying what was copied."""
    if backbone == "vgg16":
        return str(transplant_vgg16(net, state, mean_bgr=mean)).splitlines()[0]
    if backbone == "segnet":
        from fcn_core.zoo.segnet import transplant_vgg16_bn

        copied = transplant_vgg16_bn(net, state, mean_bgr=mean)  # type: ignore[arg-type]
        return f"{len(copied)} VGG16-BN tensors copied into segnet's encoder"
    if backbone == "deeplab_largefov":
        from fcn_core.zoo.deeplab import transplant_vgg16 as transplant_deeplab

        copied = transplant_deeplab(net, state, mean_bgr=mean)  # type: ignore[arg-type]
        return (f"{len(copied)} VGG16 tensors copied into deeplab_largefov (fc6, fc7 "
                "decimated from the classifier)")
    if backbone not in BACKBONE_NAMES:  # a model: net of torchvision's
        from fcn_core.zoo.torchvision_nets import transplant_torchvision_backbone

        copied = transplant_torchvision_backbone(net, state, mean_bgr=mean)  # type: ignore[arg-type]
        return f"{len(copied)} backbone tensors copied into {backbone}, the classifier dropped"
    if backbone == "alexnet":
        from fcn_core.alexnet import transplant_alexnet

        copied = transplant_alexnet(net, state, mean_bgr=mean)  # type: ignore[arg-type]
    else:
        from fcn_core.googlenet import transplant_googlenet

        copied = transplant_googlenet(net, state, mean_bgr=mean)  # type: ignore[arg-type]
    return f"{len(copied)} {BACKBONE_NAMES[backbone]} tensors copied, the classifier dropped"


def read_backbone(location: str) -> dict[str, torch.Tensor]:
    """A torchvision VGG16 (AlexNet, GoogLeNet) state dict from a local path or a bucket URI
    (nodes share no disk, so each worker reads it through pipelines.storage); tensors only
    (``weights_only``)."""
    return torch.load(storage.open_input(location), map_location="cpu", weights_only=True)


def fusion_from(fusion_init: dict[str, str], stage: StageConfig, log: Log = print) -> LateFusion:
    """A late-fusion net from a trained colour FCN-32s and a trained HHA FCN-32s
    (reference nyud-fcn32s-color-hha: surgery.transplant of both, suffixes color / hha)."""
    from pipelines.train.checkpoint import CheckpointError

    nets = {k: load_model(v) for k, v in fusion_init.items()}
    for k, net in nets.items():
        if not isinstance(net, FCN) or net.config.in_channels != 3:
            raise CheckpointError(f"fusion_init.{k} {fusion_init[k]}: not a single-stream "
                                  "3-channel FCN")
    color, hha = nets["color"], nets["hha"]
    if color.config != hha.config:
        raise CheckpointError(f"fusion_init: the colour and HHA nets differ ({color.config} "
                              f"vs {hha.config}); both must be the same FCN")
    if color.config.variant != stage.variant:
        raise CheckpointError(f"fusion_init: stage {stage.name} needs {stage.variant} nets, "
                              f"got {color.config.variant}")
    log(f"late fusion from {fusion_init['color']} (colour) and {fusion_init['hha']} (HHA)")
    return LateFusion(color, hha)


def set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, stage: StageConfig,
           step: int) -> float:
    lr = stage.lr
    if cfg.schedule == "poly":
        lr = stage.lr * (1 - step / stage.steps) ** cfg.poly_power
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr


def make_optimizer(model: nn.Module, cfg: TrainConfig, stage: StageConfig
                   ) -> torch.optim.Optimizer:
    """The reference solver's groups (biases: lr x bias_lr_mult, no decay) for SGD or Adam."""
    groups = param_groups(model, lr=stage.lr, weight_decay=cfg.weight_decay,
                          bias_lr_mult=cfg.bias_lr_mult)
    groups[0]["lr_mult"], groups[1]["lr_mult"] = 1.0, cfg.bias_lr_mult
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=stage.lr)
    return torch.optim.SGD(groups, lr=stage.lr, momentum=cfg.momentum)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               labels: dict[str, torch.Tensor], heads: list[str], normalize: bool,
               amp: str = "off", scaler: torch.amp.GradScaler | None = None,
               weight: torch.Tensor | None = None) -> float:
    """One SGD step; the forward pass (and the loss) under ``amp``'s autocast, weights fp32.
    ``weight``: per-class loss weights (``class_weights``) of a single-head net."""
    model.train()
    with autocast(amp, x.device):
        scores = model(x)
        aux = None
        if isinstance(scores, dict) and AUX in scores:  # torchvision's auxiliary classifier
            aux, scores = scores[AUX], scores[SINGLE_HEAD]
        if isinstance(scores, dict):
            keys = _label_keys(heads)
            loss = multi_head_loss(scores, {h: labels[keys[h]] for h in scores},
                                   normalize=normalize)
        else:
            loss = multi_head_loss(scores, labels["label"], normalize=normalize, weight=weight)
        if aux is not None:  # torchvision's 0.5, PSPNet's 0.4
            w_aux = getattr(unwrap(model), "aux_weight", AUX_WEIGHT)
            loss = loss + w_aux * multi_head_loss(aux, labels["label"], normalize=normalize,
                                                  weight=weight)
    backward_step(loss, optimizer, scaler)
    return float(loss.detach())


@torch.no_grad()
def validate(model: nn.Module, batches: Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]],
             num_classes: dict[str, int], heads: list[str], amp: str = "off"
             ) -> dict[str, ConfusionMatrix]:
    """One ConfusionMatrix per head over all batches (padding is 255: never counted).

    The forward passes run on the net under DDP's wrapper: workers hold different numbers of
    validation rows, and DDP's forward broadcasts buffers, a collective every rank must join.
    """
    model = unwrap(model)
    model.eval()
    keys = _label_keys(heads)
    cms = {h: ConfusionMatrix(num_classes[h]) for h in heads}
    # A net whose score layers are still zero (a stage from VGG16 weights, before its first
    # step) predicts class 0 everywhere: the same matrices without a pass over the rows.
    untrained = scores_untrained(model)
    for x, labels in batches:
        if untrained:
            for h in heads:
                cms[h].update(labels[keys[h]], torch.zeros_like(labels[keys[h]]))
            continue
        with autocast(amp, x.device):
            scores = model(x)
        scores = scores if isinstance(scores, dict) else {heads[0]: scores}
        for h, s in scores.items():
            cms[h].update(labels[keys[h]], s.argmax(1))
    return cms



def _all_reduce_hist(cms: dict[str, ConfusionMatrix], images: int = 0,
                     device: torch.device | str = "cpu") -> int:
    """Sum every worker's confusion matrices (in place) and image counts; return the total.

    The tensors live on ``device``, the worker's (``ray.train.torch.get_device()``): NCCL
    reduces CUDA tensors only, gloo CPU ones. float64 sums of counts are exact below 2**53.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return images
    for cm in cms.values():
        t = torch.from_numpy(cm.hist.astype(np.float64)).to(device)
        dist.all_reduce(t)
        cm.hist = t.round().to(torch.int64).cpu().numpy()
    n = torch.tensor([float(images)], dtype=torch.float64, device=device)
    dist.all_reduce(n)
    return int(n.item())


def mean_over_workers(value: float, device: torch.device | str = "cpu") -> float:
    """``value`` averaged over the worker group (itself outside one): a NaN or inf on any
    worker makes the mean NaN or inf, so every worker takes the same decision on it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def replicas_in_sync(model: nn.Module) -> bool:
    """True when every worker holds bit-identical parameters (what DDP promises); a cheap
    end-of-stage guard against silent desynchronisation."""
    import hashlib

    import torch.distributed as dist

    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    if not (dist.is_available() and dist.is_initialized()):
        return True
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    return len(set(digests)) == 1


def _scores(cms: dict[str, ConfusionMatrix], heads: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for h in heads:
        s = cms[h].scores()
        prefix = "" if h == heads[0] else f"{h}_"
        out.update({f"{prefix}{k}": v for k, v in s.items() if k != "per_class_iu"})
    return out


def output_stride(model: nn.Module) -> int:
    """The stride of a net's final score grid (an FCN's variant; a late fusion's streams')."""
    from fcn_core.precision import unwrap

    net = unwrap(model)
    net = getattr(net, "color", net)
    return int(getattr(net, "stride", 32))


def sampled_labels(labels: dict[str, torch.Tensor], p: float, stride: int, seed: int,
                   rank: int, step: int) -> dict[str, torch.Tensor]:
    """Loss sampling for one step: the label maps with each stride x stride cell dropped
    (set to ignore) with probability 1 - p, drawn from (seed, rank, step): a resumed step
    drops the same cells."""
    from fcn_core.losses import sample_loss_cells

    if p >= 1:
        return labels
    g = torch.Generator().manual_seed(int(np.random.default_rng([seed, rank, step, 4451])
                                          .integers(2**62)))
    return {k: sample_loss_cells(v, stride, p, g) if k.startswith("label") else v
            for k, v in labels.items()}
