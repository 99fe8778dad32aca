"""Checks that run before any Ray work starts: a user's mistake is one line naming the thing
and the fix, never a stage that fails (or spins) after Ray has started.

``train_pipeline`` and ``run_stage`` call ``check_training``, ``start_pipeline_run`` calls
``check_data`` and (with a resume id) ``check_resume``; each check is public so that a CLI
can run it before it submits a job. Every error
is a ``UserError`` (``PreflightError``): the CLI prints it as one line and exits 2, Prefect
does not retry it.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable

from pyarrow.fs import FileType

from pipelines import storage
from pipelines.config import TrainConfig
from pipelines.errors import UsageError
from pipelines.shards import Manifest, read_manifest

# What a checkpoint folder holds (the training code's CHECKPOINT_FILE, which a test compares;
# not imported: that module imports torch and this one, and a CLI checks without torch).
CHECKPOINT_FILE = "checkpoint.pt"
# Run ids are "<config name>-<date>-<hex>"; config names are [A-Za-z0-9._-] (config.py).
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


class PreflightError(UsageError, ValueError):
    """Training cannot start with these inputs; the message names the input and the fix."""


class DatasetMismatch(PreflightError):
    """The config is for one dataset, the ingested data is another."""


class MissingInput(PreflightError):
    """A file the run starts from (backbone weights, an init checkpoint) is not there."""


class UnknownRun(PreflightError):
    """``--resume RUN_ID`` names no pipeline run."""


class SplitTooSmall(PreflightError):
    """A split that is missing, empty, or has fewer rows than training workers."""


def check_dataset_name(cfg: TrainConfig, dataset: str) -> None:
    """Before an ingest that feeds this config (``fcn run --dataset``): the same dataset."""
    if dataset != cfg.dataset:
        raise DatasetMismatch(
            f"config {cfg.name!r} is for dataset {cfg.dataset!r} but the run ingests "
            f"{dataset!r}: use a config for {dataset} or --dataset {cfg.dataset}")


def check_dataset(cfg: TrainConfig, manifest: Manifest) -> None:
    """The config's dataset (its mean, classes, input columns) is the manifest's."""
    have = manifest.data.get("dataset")
    if have != cfg.dataset:
        raise DatasetMismatch(
            f"config {cfg.name!r} is for dataset {cfg.dataset!r} but the data at "
            f"{manifest.root} is {have!r}: give --data an ingested {cfg.dataset} dataset "
            f"(OUT/{cfg.dataset}) or use a config for {have}")
    if cfg.heads:  # the first head is scored against `label`, whose classes the manifest has
        head, n = next(iter(cfg.heads.items()))
        if n != manifest.num_classes:
            raise DatasetMismatch(
                f"heads.{head}: {n} classes, but the labels at {manifest.root} have "
                f"{manifest.num_classes}: set heads.{head} to {manifest.num_classes}")


def check_splits(cfg: TrainConfig, manifest: Manifest) -> None:
    """Both splits exist and have at least one row per training worker: with fewer, Ray
    Train's equal split gives a worker an empty shard, and its ``while step < steps`` loop
    never ends (the other workers wait for it in DDP's all-reduce)."""
    splits = manifest.data.get("splits", {})
    have = ", ".join(f"{s} {v.get('rows', 0)}" for s, v in splits.items()) or "none"
    for key, split in (("train_split", cfg.train_split), ("val_split", cfg.val_split)):
        if split not in splits:
            close = difflib.get_close_matches(split, list(splits), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SplitTooSmall(
                f"{key} {split!r} is not in {manifest.location}{hint}: set {key} in the "
                f"config to one of its splits (rows: {have})")
        rows = int(splits[split].get("rows", 0))
        if rows == 0:
            rejected = int(splits[split].get("rejected", 0))
            why = f"; {rejected} rejected, see {manifest.data.get('quarantine')}" \
                if rejected else ""
            raise SplitTooSmall(
                f"split {split!r} of {manifest.root} is empty (0 rows{why}): ingest data "
                f"into it or set {key} to a split with rows (rows: {have})")
        if rows < cfg.workers:
            raise SplitTooSmall(
                f"split {split!r} of {manifest.root} has {rows} row(s), fewer than the "
                f"{cfg.workers} training workers (each needs at least one): use "
                f"--workers {rows} (workers: {rows} in the config) or ingest more rows")


def check_backbone_weights(cfg: TrainConfig) -> None:
    """``backbone_weights`` (``--backbone-weights``) is a non-empty file: a local path (which
    every node must then have) or a bucket URI, which each worker reads itself."""
    if cfg.backbone_weights is None:
        return
    loc = cfg.backbone_weights
    fix = (f"give --backbone-weights (backbone_weights) a torchvision {cfg.backbone} state "
           "dict, or leave it out to start from random weights")
    path = storage.redact(storage.as_location(loc))
    info = storage.info(storage.as_location(loc))
    if info.type == FileType.Directory:
        raise MissingInput(f"backbone weights {path}: is a folder, not a file: {fix}")
    if info.type != FileType.File:
        raise MissingInput(f"backbone weights {path}: no such file: {fix}")
    if not info.size:
        raise MissingInput(f"backbone weights {path}: the file is empty: {fix}")


def check_init_checkpoint(checkpoint: str | os.PathLike[str],
                          what: str = "--init-checkpoint") -> None:
    """``--init-checkpoint``: a stage's checkpoint folder (with checkpoint.pt) or the file."""
    loc = storage.as_location(checkpoint)
    fix = f"give {what} a stage's checkpoint folder or its {CHECKPOINT_FILE}"
    name = "init checkpoint" if what == "--init-checkpoint" else what
    if storage.is_dir(loc):
        if not storage.is_file(storage.join(loc, CHECKPOINT_FILE)):
            raise MissingInput(f"{name} {storage.redact(loc)}: a folder without "
                               f"{CHECKPOINT_FILE}: {fix}")
    elif not storage.is_file(loc):
        raise MissingInput(f"{name} {storage.redact(loc)}: no such file or folder: "
                           f"{fix}")


def check_data(cfg: TrainConfig, data: str | os.PathLike[str]) -> Manifest:
    """The ingested data at ``data`` (one line if there is none) is the config's dataset,
    with both splits usable by ``cfg.workers`` workers. Returns its manifest."""
    manifest = read_manifest(data)
    check_dataset(cfg, manifest)
    check_splits(cfg, manifest)
    return manifest


def check_start(cfg: TrainConfig, init_checkpoint: str | None = None) -> None:
    """What a stage starts from: ``init_checkpoint`` when given, else the backbone weights
    (when the config names them)."""
    if init_checkpoint:
        check_init_checkpoint(init_checkpoint)
    elif cfg.fusion_init:
        for stream, loc in cfg.fusion_init.items():
            check_init_checkpoint(loc, f"fusion_init.{stream}")
    else:
        check_backbone_weights(cfg)


def check_local_gpus(cfg: TrainConfig) -> None:
    """``use_gpu`` where the training will run on this machine (RAY_ADDRESS unset): as many
    CUDA devices as workers, checked before ``fcn run`` ingests (which can take an hour on a
    real dataset) rather than when the first stage asks Ray for them. Torch's count is the
    one that matters: a worker trains on the devices torch sees."""
    if not cfg.use_gpu or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < cfg.workers:
        fewer = ", lower workers (--workers)" if have else ""
        raise UsageError(f"--gpu needs {cfg.workers} GPU(s), one per training worker, and "
                         f"this machine has {have} that torch can use: leave --gpu out{fewer}, "
                         "or set RAY_ADDRESS to a cluster with GPUs")


def check_training(cfg: TrainConfig, data: str | os.PathLike[str],
                   init_checkpoint: str | None = None) -> Manifest:
    """Everything a training run (or one stage of it) needs, checked before any Ray work:
    ``check_data`` and ``check_start``. Returns the manifest."""
    manifest = check_data(cfg, data)
    check_start(cfg, init_checkpoint)
    return manifest


def _recent_runs(where: str, limit: int = 5) -> list[str]:
    """Names of the newest run folders under ``where`` (none if it does not exist)."""
    if not storage.is_dir(where):
        return []
    dirs = [i for i in storage.listdir(where) if i.type == FileType.Directory]
    dirs.sort(key=lambda i: i.mtime_ns or 0, reverse=True)
    return [i.base_name for i in dirs[:limit]]


def check_resume(run_id: str, where: str | os.PathLike[str],
                 tracked: Callable[[], bool] | None = None, tracking: str = "MLflow") -> None:
    """``--resume RUN_ID`` names a run that exists: its folder under ``where`` (the runs
    location), or else its MLflow parent run (``tracked()``, asked only when the folder is
    absent: a run stopped before its first stage wrote anything). Otherwise an error, never
    a silent new run."""
    loc = storage.as_location(where)
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise UnknownRun(f"--resume {run_id!r}: not a pipeline run id (they look like "
                         f"NAME-YYYYMMDD-HHMMSS-abc123, as `fcn train` prints them)")
    if storage.is_dir(storage.join(loc, run_id)):
        return
    if tracked is not None and tracked():
        return
    recent = _recent_runs(loc)
    close = difflib.get_close_matches(run_id, recent, n=1, cutoff=0.8)
    hint = f"; did you mean {close[0]!r}?" if close else \
        (f"; the newest there: {', '.join(recent)}" if recent else "")
    raise UnknownRun(f"--resume {run_id}: no such pipeline run in {storage.redact(loc)} or "
                     f"in {tracking}{hint} (leave out --resume to start a new run)")
