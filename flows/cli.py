"""The ``fcn`` command line. Heavy engines are imported inside each command, so
``fcn --help`` answers at once."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class UsageError(Exception):
    """A mistake the user can fix; printed as one line, never as a traceback."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"expected HxW with positive integers, got {text!r}")
    return h, w


def cmd_describe(args: argparse.Namespace) -> int:
    import torch

    from fcn_core.fcn import BUILDERS
    from fcn_core.profile import layer_stats

    model = BUILDERS[args.variant](num_classes=args.classes, width=args.width,
                                   in_channels=args.in_channels).eval()
    h, w = args.size
    x = torch.zeros(1, args.in_channels, h, w)
    stats = layer_stats(model, x)
    print(f"{args.variant}  width={args.width}  classes={args.classes}  input 1x"
          f"{args.in_channels}x{h}x{w}")
    print(f"{'layer':<28}{'kind':<17}{'output':<22}{'params':>12}{'MMAC':>12}")
    for s in stats:
        print(f"{s.name:<28}{s.kind:<17}{str(s.out_shape):<22}{s.params:>12,}{s.macs / 1e6:>12.1f}")
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"crop offsets: {model.offsets}")
    print(f"parameters: {n_params:,} ({n_train:,} trainable)   "
          f"GMAC per image: {sum(s.macs for s in stats) / 1e9:.2f}")
    return 0


def _quiet_ray_logs(verbose: bool) -> None:
    """Ray Data logs every operator's progress at INFO when stderr is not a terminal. Keep
    its progress bars on a terminal, and otherwise only our own progress lines."""
    import logging

    import ray.data  # configures Ray's loggers on import: adjust them after

    if verbose:
        return
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    for name in ("ray", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipelines.ingest import IngestConfig, ingest
    from pipelines.shards import ManifestError
    from pipelines.sources import LayoutError

    _quiet_ray_logs(args.verbose)
    splits = tuple(s for s in args.splits.split(",") if s) if args.splits else None
    cfg = IngestConfig(dataset=args.dataset, root=args.root, out=args.out,
                       splits=splits, split_file=args.split_file, shard_rows=args.shard_rows)
    try:
        result = ingest(cfg, log=lambda msg: print(msg, flush=True))
    except (LayoutError, ManifestError) as exc:
        raise UsageError(str(exc)) from None
    print(result.summary())
    _write_result(args, dataclasses.asdict(result))
    return 0


def _write_result(args: argparse.Namespace, result: dict) -> None:
    """--result-json: the command's result for a caller that ran it as a Ray job."""
    if getattr(args, "result_json", None):
        from pipelines import storage

        storage.write_json(args.result_json, result)


def stage_table(results: list) -> str:
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


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError, load_config
    from pipelines.shards import ManifestError
    from pipelines.train import StageFailed, train_pipeline

    _quiet_ray_logs(args.verbose)
    try:
        cfg = load_config(args.config, workers=args.workers,
                          backbone_weights=args.backbone_weights,
                          use_gpu=True if args.gpu else None)
        if args.stages:
            cfg = cfg.only_stages([s for s in args.stages.split(",") if s])
        run, results = train_pipeline(cfg, args.data, storage=args.storage, resume=args.resume,
                                      log=lambda m: print(m, flush=True),
                                      init_checkpoint=args.init_checkpoint,
                                      finish=not args.keep_open)
    except (ConfigError, ManifestError) as exc:
        raise UsageError(str(exc)) from None
    except StageFailed as exc:
        print(f"fcn train: {exc}", file=sys.stderr)
        return 1
    print()
    print(stage_table(results))
    print(f"\npipeline run {run.run_id} (resume with --resume {run.run_id}); "
          f"MLflow parent run {run.mlflow_parent}")
    _write_result(args, {"run": dataclasses.asdict(run),
                         "stages": [dataclasses.asdict(r) for r in results]})
    return 0


def _inference_options(args: argparse.Namespace):
    from fcn_core.inference import InferenceOptions

    scales = tuple(float(s) for s in args.scales.split(",")) if args.scales else (1.0,)
    return InferenceOptions(window=args.window, scales=scales, flip=args.flip)


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, default=None,
                   help="sliding-window inference with this crop size (default: whole image)")
    p.add_argument("--scales", default=None,
                   help="multi-scale averaging, e.g. 0.75,1,1.25 (default: 1)")
    p.add_argument("--flip", action="store_true", help="also average the mirrored image")


def _lookup_errors() -> tuple:
    from pipelines.config import ConfigError
    from pipelines.registry import ModelLookupError
    from pipelines.shards import ManifestError

    return (ModelLookupError, ManifestError, ConfigError)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipelines.evaluate import evaluate

    _quiet_ray_logs(args.verbose)
    try:
        result = evaluate(args.model, args.data, args.split, options=_inference_options(args),
                          actors=args.actors, batch_size=args.batch_size, use_gpu=args.gpu,
                          run_name=args.run_name, log=lambda m: print(m, flush=True))
    except _lookup_errors() as exc:
        raise UsageError(str(exc)) from None
    print(result.table())
    if result.run_id:
        print(f"\nlogged to MLflow run {result.run_id}: metrics.json, per_class_iu.md, "
              "confusion_matrix.png, samples.png")
    _write_result(args, result.summary())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pipelines.registry import list_models

    try:
        rows = list_models(args.name)
    except _lookup_errors() as exc:
        raise UsageError(str(exc)) from None
    if not rows:
        print("no registered models" + (f" named {args.name}" if args.name else ""))
        return 0
    cols = ("name", "version", "aliases", "stage", "mean_iu", "split", "created")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipelines.predict import predict

    _quiet_ray_logs(args.verbose)
    try:
        result = predict(args.model, args.inputs, args.out, options=_inference_options(args),
                         log=lambda m: print(m, flush=True))
    except _lookup_errors() as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {len(result.written)} prediction(s) to {args.out} (<name>.png class ids, "
          f"<name>_color.png overlay); skipped {len(result.skipped)}")
    return 1 if result.skipped and not result.written else 0


def cmd_register(args: argparse.Namespace) -> int:
    from pipelines.evaluate import evaluate, evaluation_metrics
    from pipelines.registry import register
    from pipelines.shards import read_manifest

    _quiet_ray_logs(args.verbose)
    try:
        manifest = read_manifest(args.data)
        name = args.name or f"fcn-{manifest.data['dataset']}"
        if args.metrics_from_run:  # scored already (fcn evaluate): reuse its run and metrics
            metrics, eval_run = evaluation_metrics(args.metrics_from_run), args.metrics_from_run
        else:
            result = evaluate(args.checkpoint, args.data, args.split,
                              log=lambda m: print(m, flush=True))
            print(result.table())
            metrics, eval_run = result.metrics, result.run_id

        def rescore(uri: str) -> float:
            return evaluate(uri, args.data, args.split, log_to_mlflow=False,
                            log=lambda m: None).metrics["mean_iu"]

        reg = register(args.checkpoint, name=name, metrics=metrics, split=args.split,
                       manifest=manifest.data, config_digest=args.config_digest or "-",
                       run_id=eval_run, evaluate_champion=rescore,
                       log=lambda m: print(m, flush=True))
    except _lookup_errors() as exc:
        raise UsageError(str(exc)) from None
    print(f"look it up as models:/{reg.name}/{reg.version}, models:/{reg.name}@candidate"
          + (f", models:/{reg.name}@champion" if reg.champion else ""))
    _write_result(args, {"name": reg.name, "version": reg.version, "champion": reg.champion,
                         "decision": reg.decision})
    return 0


def prefect_env(data: Path) -> None:
    """Before Prefect is imported: keep its database in the project's data folder (so the
    Prefect UI can show the runs later) unless PREFECT_API_URL names a server."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
    # The temporary local API can take longer than Prefect's default to start on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not os.environ.get("PREFECT_API_URL"):
        home = Path(os.environ.setdefault("PREFECT_HOME", str((data / "prefect").resolve())))
        home.mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level
    os.environ.setdefault("FCN_DATA_DIR", str(data.resolve()))


def _pipeline_params(args: argparse.Namespace) -> dict:
    from pipelines.storage import as_location

    params = {"dataset": args.dataset, "root": as_location(args.root),
              "config": str(Path(args.config).resolve()), "split": args.split,
              "force": args.force}
    if args.out:
        params["out"] = as_location(args.out)
    if args.storage:
        params["storage"] = as_location(args.storage)
    if getattr(args, "evaluate", "every") == "final":
        params["evaluate_every_stage"] = False
    if args.name:
        params["model_name"] = args.name
    return params


def cmd_run(args: argparse.Namespace) -> int:
    prefect_env(Path(args.data))
    _quiet_ray_logs(args.verbose)
    from pipelines.config import load_config

    try:
        load_config(args.config)  # a bad config fails here, in one line
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _check_cluster_locations(args)
    from flows.pipeline import fcn_pipeline
    from pipelines.jobs import JobFailed
    from pipelines.train import StageFailed

    try:
        summary = fcn_pipeline(**_pipeline_params(args))
    except JobFailed as exc:  # the job's own line; a user's mistake exits 2
        print(f"fcn run: {exc}", file=sys.stderr)
        return 2 if exc.usage else 1
    except StageFailed as exc:
        print(f"fcn run: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


def _check_cluster_locations(args: argparse.Namespace) -> None:
    """With Ray Jobs the steps run on cluster nodes that share no disk with this machine:
    every location they read or write must be a URI they reach."""
    from pipelines.jobs import check_jobs_api, jobs_address
    from pipelines.storage import is_remote

    address = jobs_address()
    if not address:
        return
    for flag, value in (("--root", args.root), ("--out", args.out),
                        ("--storage", args.storage)):
        if value is None or not is_remote(value):
            raise UsageError(f"RAY_ADDRESS={address} runs each step as a Ray job on the "
                             f"cluster, whose nodes cannot read this machine's disk: give "
                             f"{flag} as a URI they reach (e.g. s3://bucket/...), got "
                             f"{value or 'the local default'}")
    check_jobs_api(address)  # a dashboard that does not answer fails now, in one line


def cmd_deploy(args: argparse.Namespace) -> int:
    prefect_env(Path(args.data))
    from prefect.schedules import Cron

    from flows.pipeline import fcn_pipeline
    from pipelines.config import load_config

    try:
        load_config(args.config)
        Cron(args.cron)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _check_cluster_locations(args)
    print(f"serving deployment fcn-pipeline/{args.deployment} on cron {args.cron!r}; "
          "Ctrl-C stops it (runs stay scheduled in the Prefect API)", flush=True)
    fcn_pipeline.serve(name=args.deployment, cron=args.cron,
                       parameters=_pipeline_params(args))
    return 0


def print_summary(summary: dict) -> None:
    from pipelines.tracking import tracking_uri

    print("\nper-stage results on the validation split (whole images, reference metrics):")
    print(f"{'stage':<8}{'pixel acc':>11}{'mean acc':>10}{'mean IU':>9}{'f.w. IU':>9}")
    for ev in summary["evaluations"]:
        m = ev["metrics"]
        label = next((s["stage"] for s in summary["stages"] if s["checkpoint"] == ev["model"]),
                     ev["model"])
        print(f"FCN-{label:<4}{m['pixel_acc']:>11.3f}{m['mean_acc']:>10.3f}"
              f"{m['mean_iu']:>9.3f}{m['fw_iu']:>9.3f}")
    reg = summary["registration"]
    print(f"\nregistered {reg['name']} version {reg['version']}: {reg['decision']}")
    print(f"look it up:   models:/{reg['name']}@champion   (or @candidate, or /"
          f"{reg['version']})")
    print(f"MLflow:       {tracking_uri()}")


def cmd_demo(args: argparse.Namespace) -> int:
    data = Path(args.data)
    prefect_env(data)
    _quiet_ray_logs(args.verbose)
    t0 = time.perf_counter()
    print(f"fcn demo: the whole pipeline through Prefect on a generated dataset, all state in "
          f"{data.resolve()}/\n  ingest (Ray Data) -> FCN-32s -> 16s -> 8s (Ray Train, 2 "
          "workers) -> evaluate -> register (MLflow)\n", flush=True)
    from flows.pipeline import fcn_pipeline

    summary = fcn_pipeline(dataset="synthetic", root=str((data / "raw" / "synthetic").resolve()),
                           config=str(Path(args.config).resolve()),
                           out=str((data / "shards").resolve()), force=args.force)
    print_summary(summary)
    ious = [ev["metrics"]["mean_iu"] for ev in summary["evaluations"]]
    if len(ious) == 3:
        verdict = "holds" if ious[2] >= ious[1] >= ious[0] else "does NOT hold this time"
        print(f"\nthe paper's point, finer strides help (8s >= 16s >= 32s mean IU): {verdict} "
              f"({ious[0]:.3f} -> {ious[1]:.3f} -> {ious[2]:.3f})")
    mlflow_db = data.resolve() / "mlflow"
    print("\nexplore it:")
    print(f"  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri "
          f"sqlite:///{mlflow_db}/mlflow.db --port 5000   # http://127.0.0.1:5000")
    print(f"  Prefect UI:  PREFECT_HOME={data.resolve()}/prefect .venv/bin/prefect server start"
          "   # http://127.0.0.1:4200")
    print(f"  predict:     .venv/bin/fcn predict --model models:/"
          f"{summary['registration']['name']}@champion {data.resolve()}/raw/synthetic/VOCdevkit"
          f"/VOC2012/JPEGImages --out {data.resolve()}/predictions")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s (a second `make demo` reuses the cached "
          "ingest and stages; `fcn demo --force` retrains)")
    return 0


def _add_result_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--result-json", default=None, metavar="LOCATION",
                   help="also write the result as JSON to this path or URI (what `fcn run` "
                        "reads back from a Ray job)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcn",
        description="Fully Convolutional Networks (FCN-32s/16s/8s on VGG16) for semantic "
                    "segmentation: ingest datasets with Ray Data, train the stages with Ray "
                    "Train, track and register models in MLflow, orchestrate with Prefect.",
        epilog="environment: RAY_ADDRESS (a Ray cluster: head:6379, or http://head:8265 to "
               "submit Ray jobs), MLFLOW_TRACKING_URI (an MLflow server), PREFECT_API_URL (a "
               "Prefect server), FCN_DATA_DIR (default ./data), AWS_ENDPOINT_URL / "
               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION (s3:// "
               "locations)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("describe", help="print an FCN's layers, shapes, crop offsets and cost",
                       description="Build an FCN and print every conv, pool and deconvolution "
                                   "with its output shape, parameters and multiply-accumulates "
                                   "for one input size.")
    p.add_argument("--variant", choices=["fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce"],
                   default="fcn8s", help="which net (default: fcn8s)")
    p.add_argument("--width", type=_positive_float, default=1.0,
                   help="channel multiplier of VGG16 (1.0 = the real net; default 1.0)")
    p.add_argument("--classes", type=int, default=21, help="number of classes (default 21)")
    p.add_argument("--in-channels", type=int, default=3, help="3 = BGR, 4 = RGB-D (default 3)")
    p.add_argument("--size", type=_size, default=(500, 500), help="input HxW (default 500x500)")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser(
        "ingest", help="read a dataset's own layout into validated Parquet shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read a dataset as downloaded, decode and validate every example with Ray "
                    "Data, and write Parquet shards, manifest.json and quarantine.parquet "
                    "under OUT/DATASET/. Re-running on unchanged files does nothing; changed "
                    "files make a new version and keep the old one. Uses the Ray cluster in "
                    "RAY_ADDRESS when set, else a local Ray.",
        epilog="layouts:\n"
               "  voc        VOCdevkit/VOC20xx: JPEGImages/, SegmentationClass/ or "
               "SegmentationClassAug/, ImageSets/Segmentation/*.txt\n"
               "  sbd        benchmark_RELEASE/dataset: img/, cls/*.mat, train.txt, val.txt\n"
               "  nyud       data/images|depth|hha/img_NNNN.png, segmentation/img_NNNN.mat, "
               "train|val|test.txt or splits.mat\n"
               "  siftflow   Images/, SemanticLabels/, GeoLabels/ "
               "(spatial_envelope_256x256_static_8outdoorcategories), trainval.txt, test.txt\n"
               "  synthetic  generates a small VOC layout at --root when it is empty, then "
               "ingests it")
    p.add_argument("dataset", choices=["voc", "sbd", "nyud", "siftflow", "synthetic"])
    p.add_argument("--root", required=True,
                   help="the dataset folder as downloaded: a path or a URI (s3://bucket/voc)")
    p.add_argument("--out", required=True,
                   help="output folder or URI; shards go to OUT/DATASET/")
    p.add_argument("--splits", default=None,
                   help="comma-separated splits, e.g. train,val (default: all the layout has)")
    p.add_argument("--split-file", default=None,
                   help="a split file to use instead (ids, or 'image label' pairs per line)")
    p.add_argument("--shard-rows", type=int, default=500, help="rows per shard (default 500)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own INFO logs")
    _add_result_arg(p)
    p.set_defaults(func=cmd_ingest)

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
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (config)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl)")
    p.add_argument("--backbone-weights", default=None,
                   help="local torchvision vgg16 state dict (.pth) to start FCN-32s from")
    p.add_argument("--storage", default=None,
                   help="checkpoints: a folder or a URI every Ray node can reach, e.g. "
                        "s3://bucket/runs (default ./data/runs)")
    p.add_argument("--resume", default=None, metavar="RUN_ID",
                   help="continue an interrupted pipeline run from its latest checkpoints")
    p.add_argument("--init-checkpoint", default=None, metavar="CKPT",
                   help="start the first stage from this checkpoint (with --stages, to run "
                        "a later stage on its own)")
    p.add_argument("--keep-open", action="store_true",
                   help="leave the MLflow parent run open (a scheduler runs the next stages)")
    _add_result_arg(p)
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own INFO logs")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate", help="score a model on a split: pixel acc, mean acc, mean IU, f.w. IU",
        description="Score a model on a split of an ingested dataset with Ray Data batch "
                    "inference (an actor pool; each actor loads the model once). Logs "
                    "metrics.json, the per-class table, a confusion-matrix image and sample "
                    "predictions to an MLflow run.")
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, or a "
                        "checkpoint directory")
    p.add_argument("--data", required=True, help="an ingested dataset: OUT/DATASET")
    p.add_argument("--split", default="val", help="split to score (default val)")
    p.add_argument("--actors", type=int, default=2, help="Ray actors (default 2)")
    p.add_argument("--batch-size", type=int, default=4, help="images per actor call")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--run-name", default=None, help="MLflow run name (default evaluate-SPLIT)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own INFO logs")
    _add_inference_args(p)
    _add_result_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "register", help="evaluate a checkpoint and register it (candidate; champion gate)",
        description="Evaluate a checkpoint, log it as an MLflow PyTorch model, register it as a "
                    "new version (alias candidate), and move alias champion to it only if its "
                    "mean IU on the split is at least the current champion's.")
    p.add_argument("--checkpoint", required=True, help="a training checkpoint directory")
    p.add_argument("--data", required=True, help="an ingested dataset: OUT/DATASET")
    p.add_argument("--split", default="val")
    p.add_argument("--name", default=None, help="registered model name (default fcn-DATASET)")
    p.add_argument("--config-digest", default=None, help=argparse.SUPPRESS)
    p.add_argument("--metrics-from-run", default=None, metavar="RUN_ID",
                   help="take the metrics of this MLflow evaluation run (of the same "
                        "checkpoint and split) instead of evaluating again")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own INFO logs")
    _add_result_arg(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("models", help="registered models: versions, aliases, mean IU",
                       description="List registered FCN models with their versions, aliases "
                                   "(candidate, champion), stage, mean IU and creation time.")
    p.add_argument("name", nargs="?", default=None, help="one registered model name")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "predict", help="segment image files or folders",
        description="Write <name>.png (uint8 class ids, the input's size) and <name>_color.png "
                    "(overlay) for every image; folders are searched recursively and large "
                    "ones run through Ray Data. Unreadable inputs are reported and skipped.")
    p.add_argument("--model", required=True, help="a model URI or checkpoint, as for evaluate")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own INFO logs")
    _add_inference_args(p)
    p.set_defaults(func=cmd_predict)

    def pipeline_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="a YAML preset, e.g. configs/demo.yaml")
        p.add_argument("--dataset", required=True,
                       choices=["voc", "sbd", "nyud", "siftflow", "synthetic"])
        p.add_argument("--root", required=True,
                       help="the dataset folder as downloaded: a path or a URI")
        p.add_argument("--out", default=None,
                       help="shards folder or URI (default DATA/shards)")
        p.add_argument("--storage", default=None,
                       help="checkpoints folder or URI (default DATA/runs)")
        p.add_argument("--evaluate", choices=["every", "final"], default="every",
                       help="score every stage's checkpoint (default) or only the final one")
        p.add_argument("--split", default="val", help="split to evaluate on (default val)")
        p.add_argument("--name", default=None, help="registered model (default fcn-DATASET)")
        p.add_argument("--data", default="data", help="project data folder (default ./data)")
        p.add_argument("--force", action="store_true", help="ignore cached ingest and stages")

    p = sub.add_parser(
        "run", help="run the whole pipeline once through Prefect",
        description="ingest -> train 32s/16s/8s -> evaluate -> register, as a Prefect flow "
                    "run (PREFECT_API_URL selects a server; without it Prefect's local API). "
                    "With RAY_ADDRESS=http://head:8265 each step runs as a Ray job on that "
                    "cluster, and --root, --out and --storage must be URIs its nodes reach "
                    "(s3://bucket/...); with RAY_ADDRESS=head:6379 this process is the driver.")
    pipeline_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own INFO logs")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "deploy", help="serve the pipeline as a scheduled Prefect deployment",
        description="Serve fcn-pipeline as a Prefect deployment with a cron schedule from this "
                    "process (it runs the scheduled flow runs until stopped). For a Prefect "
                    "server with work pools, see the README's `prefect deploy` route.")
    pipeline_args(p)
    p.add_argument("--cron", required=True, help='e.g. "0 3 * * *" (every day at 03:00)')
    p.add_argument("--deployment", default="scheduled", help="deployment name")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser(
        "demo", help="the whole pipeline on a generated dataset (what `make demo` runs)",
        description="Generate a small dataset in VOC layout and run ingest -> FCN-32s -> 16s "
                    "-> 8s -> evaluate -> register through Prefect on a local Ray, an MLflow "
                    "SQLite store and Prefect's local API, all under --data.")
    p.add_argument("--data", default="data", help="project data folder (default ./data)")
    p.add_argument("--config", default="configs/demo.yaml", help="training preset")
    p.add_argument("--force", action="store_true", help="ignore cached ingest and stages")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own INFO logs")
    p.set_defaults(func=cmd_demo)
    return parser


def _redact(text: str) -> str:
    from pipelines.storage import redact

    return redact(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own lines name the runs; MLflow would add a "View run ..." pair per run.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except (UsageError, ValueError, FileNotFoundError, ConnectionError) as exc:
        print(f"fcn {args.command}: error: {_redact(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # storage errors (pipelines.storage.StorageError) are one line
        from pipelines.storage import StorageError, redact

        if not isinstance(exc, StorageError):
            raise
        print(f"fcn {args.command}: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fcn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
