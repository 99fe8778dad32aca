"""The ``fcn`` command line. Heavy engines are imported inside each command, so
``fcn --help`` answers at once."""

from __future__ import annotations

import argparse
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


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from fcn_core import ConfusionMatrix, fcn32s, promote, segmentation_loss

    print("fcn demo: the model core only. Ingest, Ray Train, MLflow and Prefect stages are not")
    print("built yet (issues 3-6); this run shows the staged FCN-32s -> 16s -> 8s chain on a")
    print(f"random {args.size[0]}x{args.size[1]} batch at width {args.width}.\n")
    torch.manual_seed(0)
    h, w = args.size
    x = torch.randn(2, 3, h, w) * 50
    target = torch.randint(0, 21, (2, h, w))
    model = fcn32s(width=args.width)
    for stage in ("32s", "16s", "8s"):
        if stage != "32s":
            model = promote(model)
        t0 = time.perf_counter()
        scores = model(x)
        loss = segmentation_loss(scores, target, normalize=True)
        loss.backward()
        dt = time.perf_counter() - t0
        cm = ConfusionMatrix(21).update(target, scores.argmax(1))
        print(f"FCN-{stage}: scores {tuple(scores.shape)}  offsets {model.offsets}  "
              f"loss {loss.item():.3f}  pixel acc {cm.scores()['pixel_acc']:.3f}  "
              f"fwd+bwd {dt * 1000:.0f} ms")
        model.zero_grad()
    print("\nNext: `fcn describe --variant fcn8s --width 1.0 --size 500x500` for the full net.")
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
    cfg = IngestConfig(dataset=args.dataset, root=Path(args.root), out=Path(args.out),
                       splits=splits, split_file=args.split_file, shard_rows=args.shard_rows)
    try:
        result = ingest(cfg, log=lambda msg: print(msg, flush=True))
    except (LayoutError, ManifestError) as exc:
        raise UsageError(str(exc)) from None
    print(result.summary())
    return 0


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
    from pipelines.train import train_pipeline

    _quiet_ray_logs(args.verbose)
    try:
        cfg = load_config(args.config, workers=args.workers,
                          backbone_weights=args.backbone_weights,
                          use_gpu=True if args.gpu else None)
        if args.stages:
            cfg = cfg.only_stages([s for s in args.stages.split(",") if s])
        run, results = train_pipeline(cfg, args.data, storage=args.storage, resume=args.resume,
                                      log=lambda m: print(m, flush=True))
    except (ConfigError, ManifestError) as exc:
        raise UsageError(str(exc)) from None
    print()
    print(stage_table(results))
    print(f"\npipeline run {run.run_id} (resume with --resume {run.run_id}); "
          f"MLflow parent run {run.mlflow_parent}")
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
                          log=lambda m: print(m, flush=True))
    except _lookup_errors() as exc:
        raise UsageError(str(exc)) from None
    print(result.table())
    if result.run_id:
        print(f"\nlogged to MLflow run {result.run_id}: metrics.json, per_class_iu.md, "
              "confusion_matrix.png, samples.png")
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
    from pipelines.evaluate import evaluate
    from pipelines.registry import register
    from pipelines.shards import read_manifest

    _quiet_ray_logs(args.verbose)
    try:
        manifest = read_manifest(args.data)
        name = args.name or f"fcn-{manifest.data['dataset']}"
        result = evaluate(args.checkpoint, args.data, args.split,
                          log=lambda m: print(m, flush=True))
        print(result.table())

        def rescore(uri: str) -> float:
            return evaluate(uri, args.data, args.split, log_to_mlflow=False,
                            log=lambda m: None).metrics["mean_iu"]

        reg = register(args.checkpoint, name=name, metrics=result.metrics, split=args.split,
                       manifest=manifest.data, config_digest=args.config_digest or "-",
                       run_id=result.run_id, evaluate_champion=rescore,
                       log=lambda m: print(m, flush=True))
    except _lookup_errors() as exc:
        raise UsageError(str(exc)) from None
    print(f"look it up as models:/{reg.name}/{reg.version}, models:/{reg.name}@candidate"
          + (f", models:/{reg.name}@champion" if reg.champion else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcn",
        description="Fully Convolutional Networks (FCN-32s/16s/8s on VGG16) for semantic "
                    "segmentation: model tools now; ingest, train, evaluate and register "
                    "commands arrive with the pipeline.")
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
    p.add_argument("--root", required=True, help="the dataset folder as downloaded")
    p.add_argument("--out", required=True, help="output folder; shards go to OUT/DATASET/")
    p.add_argument("--splits", default=None,
                   help="comma-separated splits, e.g. train,val (default: all the layout has)")
    p.add_argument("--split-file", default=None,
                   help="a split file to use instead (ids, or 'image label' pairs per line)")
    p.add_argument("--shard-rows", type=int, default=500, help="rows per shard (default 500)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own INFO logs")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "train", help="staged FCN-32s -> 16s -> 8s training with Ray Train, tracked in MLflow",
        description="Train the stages of a config in order, each from the previous stage's "
                    "final checkpoint, as Ray Train jobs (local Ray, or RAY_ADDRESS). Every "
                    "run is an MLflow parent run with a nested run per stage "
                    "(MLFLOW_TRACKING_URI, default: SQLite under ./data/mlflow).")
    p.add_argument("--config", required=True, help="a YAML preset, e.g. configs/demo.yaml")
    p.add_argument("--data", required=True, help="an ingested dataset: OUT/DATASET of fcn ingest")
    p.add_argument("--stages", default=None, help="subset of the config's stages, e.g. 16s,8s")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (config)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl)")
    p.add_argument("--backbone-weights", default=None,
                   help="local torchvision vgg16 state dict (.pth) to start FCN-32s from")
    p.add_argument("--storage", default=None, help="checkpoint folder (default ./data/runs)")
    p.add_argument("--resume", default=None, metavar="RUN_ID",
                   help="continue an interrupted pipeline run from its latest checkpoints")
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
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own INFO logs")
    _add_inference_args(p)
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
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own INFO logs")
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

    p = sub.add_parser("demo", help="run the staged FCN chain on a random batch",
                       description="Show FCN-32s promoted to 16s and 8s, with one "
                                   "forward/backward pass each, on random data.")
    p.add_argument("--width", type=_positive_float, default=0.125,
                   help="channel multiplier (default 0.125: fast on a laptop CPU)")
    p.add_argument("--size", type=_size, default=(64, 64), help="input HxW (default 64x64)")
    p.add_argument("--data", default="data", help="project data directory (default ./data)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        print(f"fcn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fcn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
