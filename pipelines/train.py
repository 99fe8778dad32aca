"""Staged FCN training with Ray Train: one TorchTrainer per stage, 32s -> 16s -> 8s.

Plain functions (``build_stage_model``, ``train_step``, ``validate``) know nothing of Ray;
every Ray Train call lives in ``train_loop_per_worker``; ``train_stage`` and ``train_pipeline``
are the driver, which also owns the MLflow runs (rank 0 of each stage logs per-step metrics
into the stage's run).
"""

from __future__ import annotations

import io
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fcn_core.fcn import BUILDERS, FCN, FCNConfig, LateFusion
from fcn_core.losses import multi_head_loss
from fcn_core.metrics import ConfusionMatrix
from fcn_core.optim import param_groups
from fcn_core.surgery import promote, transplant_vgg16
from fcn_core.transforms import MEAN_BGR
from pipelines import storage
from pipelines.config import StageConfig, StageResult, TrainConfig, from_dict
from pipelines.shards import model_input, read_manifest, training_batch

CHECKPOINT_FILE = "checkpoint.pt"
DONE_FILE = "stage_done.json"
Log = Callable[[str], None]


class StageFailed(RuntimeError):
    """A stage ended in failure after its retries; the message says how to resume."""


# ----------------------------------------------------------------- plain torch functions

def _label_keys(heads: list[str]) -> dict[str, str]:
    """Score head -> label column: the first head reads ``label``, a second ``label_geo``."""
    return dict(zip(heads, ("label", "label_geo"), strict=False))


def build_stage_model(cfg: TrainConfig, stage: StageConfig, num_classes: int,
                      init_checkpoint: str | None, log: Log = print) -> nn.Module:
    """The net a stage starts from: 32s (or at-once 8s) from VGG16 weights, otherwise the
    previous stage's final checkpoint promoted (the new skip starts at zero)."""
    heads = cfg.heads or None
    if init_checkpoint:
        prev = load_model(init_checkpoint)
        if stage.variant == "fcn8s_atonce" or prev.config.variant == stage.variant:
            return prev
        return promote(prev)

    def one() -> FCN:
        return BUILDERS[stage.variant](num_classes=num_classes, width=cfg.width,
                                       in_channels=cfg.in_channels, heads=heads)

    model: nn.Module = LateFusion(one(), one()) if cfg.input == "rgb-hha" else one()
    if cfg.backbone_weights:
        state = torch.load(cfg.backbone_weights, map_location="cpu", weights_only=True)
        nets = [model.color, model.hha] if isinstance(model, LateFusion) else [model]
        for net, mean in zip(nets, (MEAN_BGR[cfg.dataset], None), strict=False):
            report = transplant_vgg16(net, state, mean_bgr=mean if cfg.input != "hha" else None)
            log(f"backbone {cfg.backbone_weights}: {str(report).splitlines()[0]}")
    else:
        log("warning: no backbone_weights given: the VGG16 trunk starts from random weights")
    if not cfg.learn_upsampling:
        for name, p in model.named_parameters():
            if "upscore" in name:
                p.requires_grad_(False)
    return model


def model_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict without DDP's ``module.`` prefix, how to rebuild the net)."""
    net = model.module if hasattr(model, "module") else model
    kind = "late_fusion" if isinstance(net, LateFusion) else "fcn"
    return net.state_dict(), {"kind": kind, **net.config.to_dict()}


def checkpoint_file(checkpoint: str | Path) -> str:
    """The checkpoint.pt of a checkpoint directory (or the file itself): a location."""
    loc = storage.as_location(checkpoint)
    return storage.join(loc, CHECKPOINT_FILE) if storage.is_dir(loc) else loc


def read_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """The saved dict of a checkpoint directory (or its checkpoint.pt), local or in a
    bucket."""
    path = checkpoint_file(checkpoint)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise FileNotFoundError(f"{path} is not a readable checkpoint ({e})") from None
    except Exception as e:  # pickle's errors have no common base beyond Exception
        raise FileNotFoundError(f"{path} is not a checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "arch" not in state or "model" not in state:
        raise FileNotFoundError(f"{path} is not an FCN training checkpoint")
    return state


def load_model(checkpoint: str | Path) -> nn.Module:
    """Rebuild a net from a checkpoint directory (or its checkpoint.pt)."""
    state = read_checkpoint(checkpoint)
    arch = dict(state["arch"])
    kind = arch.pop("kind")
    cfg = FCNConfig(**arch)
    model: nn.Module = LateFusion(FCN(cfg), FCN(cfg)) if kind == "late_fusion" else FCN(cfg)
    model.load_state_dict(state["model"])
    return model


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
               labels: dict[str, torch.Tensor], heads: list[str], normalize: bool) -> float:
    model.train()
    scores = model(x)
    if isinstance(scores, dict):
        keys = _label_keys(heads)
        loss = multi_head_loss(scores, {h: labels[keys[h]] for h in scores}, normalize=normalize)
    else:
        loss = multi_head_loss(scores, labels["label"], normalize=normalize)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def validate(model: nn.Module, batches: Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]],
             num_classes: dict[str, int], heads: list[str]) -> dict[str, ConfusionMatrix]:
    """One ConfusionMatrix per head over all batches (padding is 255: never counted)."""
    model.eval()
    keys = _label_keys(heads)
    cms = {h: ConfusionMatrix(num_classes[h]) for h in heads}
    for x, labels in batches:
        scores = model(x)
        scores = scores if isinstance(scores, dict) else {heads[0]: scores}
        for h, s in scores.items():
            cms[h].update(labels[keys[h]], s.argmax(1))
    return cms


# ---------------------------------------------------------------------- the Ray worker

def _batches(shard: Any, cfg: TrainConfig, device: Any, train: bool, seed: int
             ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Decode + pad in Ray Data's prefetch thread (collate_fn), float conversion on device."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    mean = MEAN_BGR[cfg.dataset]

    class Collate(NumpyBatchCollateFn):
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            self.calls += 1
            b = training_batch(batch, mirror=train and cfg.mirror, seed=seed + self.calls,
                               multiple=cfg.pad_multiple)
            return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}

    it = shard.iter_torch_batches(
        batch_size=cfg.batch_size, collate_fn=Collate(), prefetch_batches=2,
        local_shuffle_buffer_size=4 * cfg.batch_size if train else None,
        local_shuffle_seed=seed if train else None)
    for batch in it:
        x, labels = model_input(batch, mean, device, cfg.input)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, labels


def _all_reduce_hist(cms: dict[str, ConfusionMatrix]) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    for cm in cms.values():
        t = torch.from_numpy(cm.hist.astype(np.float64))  # gloo: float64 sums are exact here
        dist.all_reduce(t)
        cm.hist = t.round().to(torch.int64).numpy()


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


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; all Ray Train calls of a stage are here."""
    import logging

    import ray.train
    import ray.train.torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # "Reporting training result"
    cfg = from_dict(loop["config"])
    stage = next(s for s in cfg.stages if s.name == loop["stage"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(loop.get("threads_per_worker", 1))))

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[{stage.name}] {msg}", flush=True)

    model = build_stage_model(cfg, stage, loop["num_classes"], loop["init_checkpoint"], log)
    heads = list((cfg.heads or {"out": loop["num_classes"]}).keys())
    classes = cfg.heads or {"out": loop["num_classes"]}
    optimizer = make_optimizer(model, cfg, stage)
    step, resumed_from = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = resumed_from = int(state["step"])
        log(f"resumed from the checkpoint at step {step}")
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    tracker = None
    if rank == 0 and loop.get("mlflow_run_id"):
        from pipelines.tracking import MetricLogger

        tracker = MetricLogger(loop["tracking_uri"], loop["mlflow_run_id"])

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    last_val: dict[str, float] = {}
    window_t, window_imgs = time.perf_counter(), 0
    epoch = 0

    def report(metrics: dict[str, float], save: bool) -> None:
        if save:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    sd, arch = model_state(model)
                    torch.save({"model": sd, "optimizer": optimizer.state_dict(), "step": step,
                                "stage": stage.name, "arch": arch, "config": cfg.to_dict()},
                               Path(d) / CHECKPOINT_FILE)
                ckpt = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
                ray.train.report(metrics, checkpoint=ckpt)
        else:
            ray.train.report(metrics)

    def run_validation() -> dict[str, float]:
        cms = validate(model, _batches(val_shard, cfg, device, False, cfg.seed), classes, heads)
        _all_reduce_hist(cms)
        return _scores(cms, heads)

    if step == 0 and cfg.val_every:  # where the stage starts: the previous stage's predictions
        init_val = run_validation()
        log("initial " + ", ".join(f"{k} {v:.3f}" for k, v in init_val.items()))
        if tracker is not None:
            tracker.log({f"init_{k}": v for k, v in init_val.items()}, 0)
    while step < stage.steps:
        for x, labels in _batches(train_shard, cfg, device, True, cfg.seed + 7919 * epoch):
            if cfg.fail_at_step is not None and step == cfg.fail_at_step and \
                    rank == world - 1 and _first_injection(loop["run_dir"]):
                raise RuntimeError(f"injected failure at step {step} (fail_at_step)")
            lr = set_lr(optimizer, cfg, stage, step)
            loss = train_step(model, optimizer, x, labels, heads, cfg.normalize_loss)
            step += 1
            window_imgs += x.shape[0] * world
            metrics = {"loss": loss, "lr": lr, "step": step, "resumed_from": resumed_from}
            val_due = cfg.val_every and step % cfg.val_every == 0 and step < stage.steps
            if val_due:
                last_val = run_validation()
                metrics.update(last_val)
            dt = time.perf_counter() - window_t
            if tracker is not None:
                tracker.log({"loss": loss, "lr": lr, "img_per_s": window_imgs / max(dt, 1e-9),
                             **(last_val if val_due else {})}, step)
            if step % max(1, min(cfg.checkpoint_every, 10)) == 0 or step == 1:
                miou = f"  mean IU {last_val['mean_iu']:.3f}" if "mean_iu" in last_val else ""
                log(f"step {step}/{stage.steps}  loss {loss:.4g}  lr {lr:.3g}  "
                    f"{window_imgs / dt:.1f} img/s{miou}")
                window_t, window_imgs = time.perf_counter(), 0
            if step % cfg.checkpoint_every == 0 or step == stage.steps:
                if step == stage.steps:
                    last_val = run_validation()
                    metrics.update(last_val)
                    metrics["replicas_in_sync"] = float(replicas_in_sync(model))
                    metrics["world_size"] = world
                report(metrics, save=True)
            if step >= stage.steps:
                break
        epoch += 1
    if step == resumed_from:  # resumed at the very end: nothing left but the final report
        last_val = run_validation()
        report({"loss": float("nan"), "step": step, "resumed_from": resumed_from,
                "replicas_in_sync": float(replicas_in_sync(model)), "world_size": world,
                **last_val}, save=True)
    if tracker is not None:
        tracker.log({f"final_{k}": v for k, v in last_val.items()}, step)
        tracker.flush()
    log(f"done: {step} steps" + (f", mean IU {last_val['mean_iu']:.3f}"
                                  if "mean_iu" in last_val else ""))


def _first_injection(run_dir: str) -> bool:
    """True once per stage run: a marker on shared storage survives the worker restart."""
    return storage.create_exclusive(storage.join(run_dir, ".failure_injected"))


# ------------------------------------------------------------------------- the driver

@dataclass(frozen=True)
class PipelineRun:
    run_id: str  # names the Ray Train runs (resume with the same id)
    storage: str  # location; <storage>/<run_id>/<stage>/ holds Ray Train's checkpoints
    mlflow_parent: str | None = None


def train_stage(cfg: TrainConfig, stage: StageConfig, data: str, run: PipelineRun,
                init_checkpoint: str | None, mlflow_run_id: str | None, log: Log = print
                ) -> StageResult:
    """Fit one stage with a TorchTrainer; return its final checkpoint and metrics."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.ray_env import init_ray
    from pipelines.shards import open_split
    from pipelines.tracking import tracking_uri

    log(init_ray())
    manifest = read_manifest(data)
    t0 = time.perf_counter()
    stage_dir = storage.join(run.storage, run.run_id, stage.name)
    done = storage.join(stage_dir, DONE_FILE)
    if storage.is_file(done):  # finished in an earlier attempt of this run (--resume)
        info = storage.read_json(done)
        log(f"stage {stage.name}: already finished in run {run.run_id}, reusing its checkpoint")
        return StageResult(stage.name, info["checkpoint"], info["steps"], info["metrics"],
                           mlflow_run_id, 0.0)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress lines
    train_ds, val_ds = open_split(data, cfg.train_split), open_split(data, cfg.val_split)
    if cfg.cache_dataset:  # read + decode the Parquet once, not once per epoch
        train_ds, val_ds = train_ds.materialize(), val_ds.materialize()
    datasets = {"train": train_ds.randomize_block_order(), "val": val_ds}
    run_fs, run_fs_path = storage.resolve(storage.join(run.storage, run.run_id))
    per_worker = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(), "stage": stage.name, "init_checkpoint": init_checkpoint,
            "num_classes": manifest.num_classes, "run_dir": str(stage_dir),
            "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri(),
            "threads_per_worker": cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker)),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=per_worker,
                                               placement_strategy=cfg.placement_strategy),
        run_config=ray.train.RunConfig(
            # pipelines.storage's filesystem: the same settings (endpoint, region, timeouts,
            # no implicit buckets) as every other access. Credentials: each node's env.
            name=f"{run.run_id}-{stage.name}", storage_path=run_fs_path,
            storage_filesystem=run_fs if storage.is_remote(run.storage) else None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets=datasets,
    )
    log(f"stage {stage.name}: {stage.steps} steps on {cfg.workers} worker(s) "
        f"({'GPU, nccl' if cfg.use_gpu else 'CPU, gloo'}), from "
        f"{init_checkpoint or (cfg.backbone_weights or 'random init')}")
    try:
        result = trainer.fit()
    except Exception as e:  # Ray raises its own error types for failed worker groups
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StageFailed(f"stage {stage.name} failed ({first}); continue it with "
                          f"`fcn train --resume {run.run_id}`") from e
    if result.error is not None:
        raise StageFailed(f"stage {stage.name} failed: {result.error}; continue it with "
                          f"`fcn train --resume {run.run_id}`") from result.error
    assert result.checkpoint is not None, "a finished stage always reports a checkpoint"
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    checkpoint = storage.location(result.checkpoint.filesystem, result.checkpoint.path,
                                  like=run.storage)
    info = {"checkpoint": checkpoint, "steps": int(metrics.get("step", 0)),
            "metrics": metrics}
    storage.write_json(done, info)
    return StageResult(stage.name, checkpoint, info["steps"], metrics,
                       mlflow_run_id, time.perf_counter() - t0)


def new_run_id(cfg: TrainConfig) -> str:
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def start_pipeline_run(cfg: TrainConfig, data: str | Path, where: str | Path | None = None,
                       resume: str | None = None, experiment: str | None = None,
                       log: Log = print) -> PipelineRun:
    """The MLflow parent run (created, or found again when resuming) and the run folder."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import data_dir, experiment_id, flatten, tracking_uri

    manifest = read_manifest(data)  # fails early with a clear message
    where = storage.as_location(where or data_dir() / "runs")
    storage.check_writable(where)
    run_id = resume or new_run_id(cfg)
    client = MlflowClient(tracking_uri())
    exp = experiment_id(client, experiment or f"fcn-{manifest.data['dataset']}")
    parent = _find_or_create_run(client, exp, run_id, None, "pipeline", cfg.name)
    if not resume:
        for k, v in flatten(cfg.to_dict()).items():
            client.log_param(parent, k, v[:6000])
        for k, v in (("manifest_fingerprint", manifest.fingerprint),
                     ("dataset", manifest.data["dataset"]),
                     ("dataset_version", manifest.data["version"]),
                     ("config_digest", cfg.digest())):
            client.set_tag(parent, k, v)
    log(f"pipeline run {run_id}: MLflow {tracking_uri()} experiment {exp} run {parent}")
    return PipelineRun(run_id, where, parent)


def run_stage(cfg: TrainConfig, stage: StageConfig, data: str | Path, run: PipelineRun,
              init_checkpoint: str | None, log: Log = print) -> StageResult:
    """One stage as a nested MLflow run of the pipeline run: train, then log its final
    metrics, checkpoint and config."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    exp = client.get_run(run.mlflow_parent).info.experiment_id
    child = _find_or_create_run(client, exp, run.run_id, run.mlflow_parent, stage.name,
                                f"{cfg.name}-{stage.name}")
    client.set_tag(child, "manifest_fingerprint", read_manifest(data).fingerprint)
    try:
        res = train_stage(cfg, stage, storage.as_location(data), run, init_checkpoint, child,
                          log)
    except BaseException:
        client.set_terminated(child, "FAILED")
        raise
    _log_stage_artifacts(client, child, res, cfg)
    client.set_terminated(child, "FINISHED")
    return res


def finish_pipeline_run(run: PipelineRun, ok: bool) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri

    MlflowClient(tracking_uri()).set_terminated(run.mlflow_parent, "FINISHED" if ok
                                                else "FAILED")


def train_pipeline(cfg: TrainConfig, data: str | Path, storage: str | Path | None = None,
                   resume: str | None = None, log: Log = print,
                   experiment: str | None = None, init_checkpoint: str | None = None,
                   finish: bool = True) -> tuple[PipelineRun, list[StageResult]]:
    """Every stage of ``cfg`` in order, each from the previous one's final checkpoint, all
    under one MLflow parent run with a nested run per stage. ``init_checkpoint`` starts the
    first stage from a checkpoint (a later stage run on its own); ``finish=False`` leaves
    the parent run open for the stages a scheduler runs next."""
    run = start_pipeline_run(cfg, data, storage, resume, experiment, log)
    results: list[StageResult] = []
    init = init_checkpoint
    try:
        for stage in cfg.stages:
            results.append(run_stage(cfg, stage, data, run, init, log))
            init = results[-1].checkpoint
    except BaseException:
        finish_pipeline_run(run, ok=False)
        raise
    if finish:
        finish_pipeline_run(run, ok=True)
    return run, results


def _find_or_create_run(client: Any, exp: str, run_id: str, parent: str | None, stage: str,
                        name: str) -> str:
    """The MLflow run of this pipeline run's ``stage`` ("pipeline" for the parent), reused
    when the pipeline run is resumed."""
    query = f"tags.pipeline_run = '{run_id}' and tags.stage = '{stage}'"
    found = client.search_runs([exp], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"pipeline_run": run_id, "stage": stage}
    if parent:
        tags["mlflow.parentRunId"] = parent
    return client.create_run(exp, tags=tags, run_name=name).info.run_id


def _log_stage_artifacts(client: Any, run_id: str, res: StageResult, cfg: TrainConfig) -> None:
    for k, v in res.metrics.items():
        if k not in ("step", "resumed_from") and np.isfinite(v):
            client.log_metric(run_id, f"final_{k}", v, step=res.steps)
    with tempfile.TemporaryDirectory() as d:
        import yaml

        ckpt = checkpoint_file(res.checkpoint)
        if storage.is_file(ckpt):
            client.log_artifact(run_id, storage.local_copy(ckpt, d), artifact_path="checkpoint")

        p = Path(d) / "config.yaml"
        p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        client.log_artifact(run_id, str(p))
    client.set_tag(run_id, "checkpoint", res.checkpoint)
