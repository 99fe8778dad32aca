"""``fcn train``: the config's stages in order with Ray Train, tracked in MLflow."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from flows.cli.common import (
    AMP_HELP,
    MLFLOW_STATE,
    add_project_dir,
    add_result_arg,
    add_verbose,
    positive_int,
    quiet_ray_logs,
    say,
    write_result,
)


def stage_table(results: list[Any]) -> str:
    """The closing table of a training run, one row per stage."""
    head = (f"{'stage':<10}{'steps':>7}{'loss':>10}{'pixel acc':>11}{'mean acc':>10}"
            f"{'mean IU':>9}{'f.w. IU':>9}{'time s':>8}  checkpoint")
    rows = [head, "-" * len(head)]
    for r in results:
        m = r.metrics

        def f(k: str, m: dict = m) -> str:
            return f"{m[k]:.3f}" if k in m else "-"

        rows.append(f"{r.stage:<10}{r.steps:>7}{f('loss'):>10}{f('pixel_acc'):>11}"
                    f"{f('mean_acc'):>10}{f('mean_iu'):>9}{f('fw_iu'):>9}{r.seconds:>8.0f}"
                    f"  {r.checkpoint}")
    return "\n".join(rows)


def fusion_pair(value: str | None) -> dict[str, str] | None:
    """``color=CKPT,hha=CKPT`` -> {"color": CKPT, "hha": CKPT} (checked by the config)."""
    if value is None:
        return None
    from pipelines.errors import UsageError

    pairs = [p.split("=", 1) for p in value.split(",") if p]
    if any(len(p) != 2 for p in pairs):
        raise UsageError(f"--fusion-init must be color=CKPT,hha=CKPT, got {value!r}")
    return dict(pairs)


def start_early(cfg: Any, args: argparse.Namespace) -> None:
    """Once the input is checked, and only for a local Ray: start it in this thread with the
    MLflow store beside it, and have it start the first stage's Ray Train processes
    (``pipelines.prestart``) while the MLflow runs are made. On a cluster the stage's own
    driver connects when it runs."""
    import os

    from pipelines import preflight
    from pipelines.ray_env import address_kind

    if address_kind(os.environ.get("RAY_ADDRESS")) != "local":
        return
    preflight.check_training(cfg, args.data, args.init_checkpoint)
    from flows.cli.pipeline import start_services

    start_services(cfg.workers, prefect=False)


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.train import train_pipeline

    quiet_ray_logs(args.verbose)
    cfg = load_config(args.config, workers=args.workers,
                      backbone_weights=args.backbone_weights,
                      use_gpu=True if args.gpu else None, amp=args.amp,
                      compile=True if args.compile else None,
                      fusion_init=fusion_pair(args.fusion_init))
    if args.stages:
        cfg = cfg.only_stages([s for s in args.stages.split(",") if s])
    start_early(cfg, args)
    run, results = train_pipeline(cfg, args.data, storage=args.storage, resume=args.resume,
                                  log=say, init_checkpoint=args.init_checkpoint,
                                  finish=not args.keep_open)
    print()
    print(stage_table(results))
    print(f"\npipeline run {run.run_id} (resume with --resume {run.run_id}); "
          f"MLflow parent run {run.mlflow_parent}")
    write_result(args, {"run": dataclasses.asdict(run),
                        "stages": [dataclasses.asdict(r) for r in results]})
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="staged FCN-32s -> 16s -> 8s training with Ray Train, tracked in MLflow",
        description="Train the stages of a config in order, each from the previous stage's "
                    "final checkpoint, as Ray Train jobs (local Ray, or RAY_ADDRESS). Every "
                    "run is an MLflow parent run with a nested run per stage "
                    "(MLFLOW_TRACKING_URI, default: SQLite under ./data/mlflow).")
    p.add_argument("--config", required=True, help="a YAML preset, e.g. configs/demo.yaml")
    p.add_argument("--data", required=True,
                   help="an ingested dataset: OUT/DATASET of fcn ingest (a path or a URI)")
    p.add_argument("--stages", default=None, help="subset of the config's stages, e.g. 16s,8s")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="Ray Train workers (default: the config's)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl)")
    p.add_argument("--amp", choices=["off", "bf16", "fp16", "auto"], default=None,
                   help=AMP_HELP)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the net (runs eagerly, with a warning, where it fails)")
    p.add_argument("--backbone-weights", default=None,
                   help="torchvision vgg16 state dict (.pth) to start FCN-32s from: a local "
                        "path every node has, or a URI (s3://bucket/vgg16.pth)")
    p.add_argument("--storage", default=None,
                   help="checkpoints: a folder or a URI every Ray node can reach, e.g. "
                        "s3://bucket/runs (default PROJECT_DIR/runs)")
    p.add_argument("--resume", default=None, metavar="RUN_ID",
                   help="continue an interrupted pipeline run from its latest checkpoints")
    p.add_argument("--fusion-init", default=None, metavar="color=CKPT,hha=CKPT",
                   help="input rgb-hha: start from a trained colour FCN-32s and a trained HHA "
                        "FCN-32s (their score_fr averaged, as the reference late fusion)")
    p.add_argument("--init-checkpoint", default=None, metavar="CKPT",
                   help="start the first stage from this checkpoint (with --stages, to run "
                        "a later stage on its own)")
    p.add_argument("--keep-open", action="store_true",
                   help="leave the MLflow parent run open (a scheduler runs the next stages)")
    add_result_arg(p)
    add_verbose(p)
    add_project_dir(p, MLFLOW_STATE + ", and the default checkpoint folder (--storage)")
    p.set_defaults(func=cmd_train)
