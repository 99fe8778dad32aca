"""``fcn evaluate``, ``fcn register``, ``fcn models``, ``fcn predict``: models in use."""

from __future__ import annotations

import argparse
import math
import os

from flows.cli.common import (
    MLFLOW_STATE,
    add_inference_args,
    add_project_dir,
    add_result_arg,
    add_verbose,
    inference_options,
    positive_int,
    quiet_ray_logs,
    say,
    write_result,
)

MODEL_HELP = ("models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, or a checkpoint "
              "(a folder, checkpoint.pt, or its URI)")


def camera(text: str) -> tuple[float, float, float, float]:
    """--camera FX,FY,CX,CY: four numbers, focal lengths positive."""
    try:
        fx, fy, cx, cy = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FX,FY,CX,CY (four numbers in pixels), "
                                         f"got {text!r}") from None
    if not (fx > 0 and fy > 0) or not all(map(math.isfinite, (cx, cy))):
        raise argparse.ArgumentTypeError(f"focal lengths must be > 0 and every value finite, "
                                         f"got {text!r}")
    return fx, fy, cx, cy


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipelines.evaluate import evaluate

    quiet_ray_logs(args.verbose)
    result = evaluate(args.model, args.data, args.split, options=inference_options(args),
                      actors=args.actors, batch_size=args.batch_size, use_gpu=args.gpu,
                      run_name=args.run_name, log=say)
    print(result.table(compact=True))
    if result.run_id:
        print(f"\nlogged to MLflow run {result.run_id}: metrics.json, per_class_iu.md, "
              "confusion_matrix.png, samples.png")
    write_result(args, result.summary())
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from pipelines.evaluate import evaluate, evaluation_metrics
    from pipelines.registry import register
    from pipelines.shards import read_manifest

    quiet_ray_logs(args.verbose)
    manifest = read_manifest(args.data)
    name = args.name or f"fcn-{manifest.data['dataset']}"
    if args.metrics_from_run:  # scored already (fcn evaluate): reuse its run and metrics
        metrics, eval_run = evaluation_metrics(args.metrics_from_run), args.metrics_from_run
    else:
        result = evaluate(args.checkpoint, args.data, args.split, log=say)
        print(result.table(compact=True))
        metrics, eval_run = result.metrics, result.run_id

    def rescore(uri: str) -> float:
        return evaluate(uri, args.data, args.split, log_to_mlflow=False,
                        log=lambda m: None).metrics["mean_iu"]

    reg = register(args.checkpoint, name=name, metrics=metrics, split=args.split,
                   manifest=manifest.data, config_digest=args.config_digest or "-",
                   run_id=eval_run, evaluate_champion=rescore, log=say,
                   training_run_id=args.training_run, flow_run=args.flow_run)
    print(f"look it up as models:/{reg.name}/{reg.version}, models:/{reg.name}@candidate"
          + (f", models:/{reg.name}@champion" if reg.champion else ""))
    write_result(args, {"name": reg.name, "version": reg.version, "champion": reg.champion,
                        "decision": reg.decision, "reused": reg.reused})
    return 0


def _cell(col: str, value: object) -> str:
    """A table cell: scores (tags hold them as full-precision strings) to 4 decimals."""
    if col == "mean_iu":
        try:
            return f"{float(str(value)):.4f}"
        except ValueError:
            pass
    return str(value)


def _table(rows: list[dict], cols: tuple[str, ...]) -> None:
    cells = [{c: _cell(c, r[c]) for c in cols} for r in rows]
    widths = {c: max(len(c), *(len(r[c]) for r in cells)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for r in cells:
        print("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())


def cmd_models(args: argparse.Namespace) -> int:
    from pipelines.errors import UsageError
    from pipelines.registry import list_models, model_history

    if args.history:
        if not args.name:
            raise UsageError("--history needs a registered model NAME (fcn models NAME "
                             "--history)")
        history = model_history(args.name)
        if not history:
            print(f"{args.name} has never had a champion")
            return 0
        rows = [{**h, "until": h["until"] or "-", "current": "yes" if h["current"] else "",
                 **{k: h[k] if h[k] is not None else "-" for k in
                    ("replaced_version", "replaced_by", "mean_iu", "split")}}
                for h in history]
        _table(rows, ("version", "since", "until", "replaced_version", "replaced_by",
                      "mean_iu", "split", "current", "decision"))
        return 0
    rows = list_models(args.name)
    if not rows:
        print("no registered models" + (f" named {args.name}" if args.name else ""))
        return 0
    _table(rows, ("name", "version", "aliases", "stage", "mean_iu", "split", "created"))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipelines.companions import Sources
    from pipelines.predict import predict

    if args.verbose:  # Ray is imported only for large folders, and quieted there
        os.environ["FCN_VERBOSE"] = "1"
    sources = Sources(hha=tuple(args.hha or ()), depth=tuple(args.depth or ()),
                      rawdepth=tuple(args.rawdepth or ()), camera=args.camera)
    result = predict(args.model, args.inputs, args.out, options=inference_options(args),
                     log=say, max_pixels=args.max_pixels, fmt=args.format,
                     use_gpu=args.gpu, actors=args.actors, sources=sources)
    print(result.summary(args.out))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="score a model on a split: pixel acc, mean acc, mean IU, f.w. IU",
        description="Score a model on a split of an ingested dataset on Ray actors (a Ray "
                    "task reads each shard; the actors take parts of the shards as they come "
                    "and are kept for the next evaluation of the same process, e.g. the next "
                    "stage of a flow; a split of at most 64 images on the CPU is scored in "
                    "this process). Logs "
                    "metrics.json, the per-class table, a confusion-matrix image and sample "
                    "predictions to an MLflow run.")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True,
                   help="an ingested dataset: OUT/DATASET of fcn ingest (a path or a URI)")
    p.add_argument("--split", default="val", help="split to score (default val)")
    p.add_argument("--actors", type=positive_int, default=None,
                   help="Ray actors that score the split (default 2; a split of at most 64 "
                        "images is scored in this process unless --actors is given)")
    p.add_argument("--batch-size", type=positive_int, default=4,
                   help="images per actor call (default 4)")
    p.add_argument("--gpu", action="store_true",
                   help="one GPU per actor (GPU actors end with the call: they hold the GPU)")
    p.add_argument("--run-name", default=None, help="MLflow run name (default evaluate-SPLIT)")
    add_verbose(p)
    add_project_dir(p, MLFLOW_STATE)
    add_inference_args(p)
    add_result_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "register", help="evaluate a checkpoint and register it (candidate; champion gate)",
        description="Evaluate a checkpoint, log it as an MLflow model, register it as a "
                    "new version (alias candidate), and move alias champion to it only if its "
                    "mean IU on the split is at least the current champion's.")
    p.add_argument("--checkpoint", required=True,
                   help="a training checkpoint (a folder, checkpoint.pt, or its URI)")
    p.add_argument("--data", required=True,
                   help="an ingested dataset: OUT/DATASET of fcn ingest (a path or a URI)")
    p.add_argument("--split", default="val", help="split to score on (default val)")
    p.add_argument("--name", default=None, help="registered model name (default fcn-DATASET)")
    p.add_argument("--config-digest", default=None, help=argparse.SUPPRESS)
    p.add_argument("--flow-run", default=None, help=argparse.SUPPRESS)  # Prefect's, via a job
    p.add_argument("--training-run", default=None, metavar="RUN_ID",
                   help="the MLflow run of the stage that wrote the checkpoint (lineage; "
                        "default: found by the checkpoint's tag)")
    p.add_argument("--metrics-from-run", default=None, metavar="RUN_ID",
                   help="take the metrics of this MLflow evaluation run (of the same "
                        "checkpoint and split) instead of evaluating again")
    add_verbose(p)
    add_project_dir(p, MLFLOW_STATE)
    add_result_arg(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("models", help="registered models: versions, aliases, mean IU",
                       description="List registered FCN models with their versions, aliases "
                                   "(candidate, champion), stage, mean IU and creation time.")
    p.add_argument("name", nargs="?", default=None, help="one registered model name")
    p.add_argument("--history", action="store_true",
                   help="who was champion when: each version's time as champion, whom it "
                        "replaced and the gate's decision (MLflow keeps no alias history; "
                        "the registry records one in version tags)")
    add_project_dir(p, MLFLOW_STATE)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "predict", help="segment image files or folders",
        description="Write <name>.png (uint8 class ids, the input's size as a viewer shows it: "
                    "EXIF orientation applied) and <name>_color.png (overlay) for every image "
                    "(a two-head SIFT Flow net: also <name>_geometric.png and its overlay); "
                    "folders are searched recursively. Images are predicted in this process; "
                    "a folder of 64 or more goes on through Ray Data once the rest would take "
                    "over 20 s here (--actors N: all of it on N Ray actors from the start). "
                    "16-bit images are scaled to 8 bits, transparency is composited on black. "
                    "Unreadable or oversized inputs are reported and skipped (exit 2 only when "
                    "none could be used). A NYUD model that reads HHA, RGB-D or RGB + HHA "
                    "also takes each image's --hha or --depth file, matched by file name "
                    "(data/images/img_5001.png with data/depth/img_5001.png); HHA is computed "
                    "from --depth when not given. Such frames are read as stored (no EXIF "
                    "turn), so that they stay pixel-aligned with their depth.")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files and/or folders (paths or URIs)")
    p.add_argument("--out", required=True, help="output folder (a path or a URI)")
    p.add_argument("--max-pixels", type=positive_int, default=None, metavar="N",
                   help="refuse images above N pixels (default: FCN_MAX_IMAGE_PIXELS or "
                        "100,000,000)")
    p.add_argument("--gpu", action="store_true",
                   help="predict on a GPU (CUDA): this process's, or one per Ray actor")
    p.add_argument("--actors", type=positive_int, default=None, metavar="N",
                   help="predict on N Ray Data actors from the start (default: in this "
                        "process, handing the rest of a folder of 64 or more to 2 actors when it "
                        "would take over 20 s here)")
    p.add_argument("--format", choices=["default", "voc"], default="default",
                   help="default: <name>.png class ids + <name>_color.png overlay; voc: the "
                        "PASCAL VOC evaluation server's layout, OUT/results/VOC2012/"
                        "Segmentation/comp6_test_cls/<id>.png ('P' mode, VOC colour map) and "
                        "OUT/results.tgz to upload (a 21-class VOC model; ids must be unique)")
    nyud = p.add_argument_group(
        "NYUD models (input hha, rgbd or rgb-hha)",
        "Files or folders (searched recursively for .png), each file matched to the INPUT "
        "image of the same name; a single INPUT file and a single file pair whatever their "
        "names. Repeat a flag for more places. An image without its file is skipped, saying so.")
    nyud.add_argument("--hha", action="append", metavar="PATH",
                      help="HHA images (8-bit, 3 channels H1, H2, A, as the reference's "
                           "data/hha/*.png), for hha and rgb-hha models")
    nyud.add_argument("--depth", action="append", metavar="PATH",
                      help="depth maps (16-bit PNG, millimetres, as data/depth/*.png): read "
                           "by rgbd models; for hha and rgb-hha models HHA is computed from "
                           "them (about 0.2 s per 425x560 frame here)")
    nyud.add_argument("--rawdepth", action="append", metavar="PATH",
                      help="the sensor's raw depth (0 = no reading, data/rawdepth/*.png): "
                           "marks the holes when HHA is computed from --depth, as fcn ingest "
                           "--compute-hha does with data/rawdepth")
    nyud.add_argument("--camera", type=camera, default=None, metavar="FX,FY,CX,CY",
                      help="the depth camera's intrinsics in pixels, for computing HHA "
                           "(default: NYU Depth v2's colour camera, 518.86,519.47,325.58,"
                           "253.74)")
    add_verbose(p)
    add_project_dir(p, MLFLOW_STATE + " (models:/ URIs), and the registered models' "
                       "cache (FCN_MODEL_CACHE)")
    add_inference_args(p)
    p.set_defaults(func=cmd_predict)
