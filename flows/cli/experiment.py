"""``fcn experiment FILE``: a grid of configs through the pipeline, compared in one table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flows.cli.common import add_verbose, quiet_ray_logs
from flows.cli.pipeline import (
    _add_project_dir,
    _check_cluster_locations,
    check_sources,
    prefect_env,
)
from pipelines.errors import UsageError


def cmd_experiment(args: argparse.Namespace) -> int:
    from pipelines import preflight
    from pipelines.experiment import load_experiment
    from pipelines.storage import as_location

    exp = load_experiment(args.file)  # a bad file or row fails here, in one line
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    if rows:
        exp = exp.only(rows)
    for row in exp.rows:
        preflight.check_start(row.config)
    project = Path(args.project_dir)
    prefect_env(project)
    quiet_ray_logs(args.verbose)
    root = args.root
    if root is None:
        if exp.dataset != "synthetic":
            raise UsageError(f"{exp.name} trains on {exp.dataset}: give --root, the dataset "
                             f"folder as downloaded (see fcn ingest {exp.dataset} --help)")
        root = str(project.resolve() / "raw" / "synthetic")  # where `fcn demo` generates it
    args.root = root
    if args.out is None and exp.dataset == "synthetic":
        args.out = str(project.resolve() / "shards")  # the demo's: its ingest is cached
    _check_cluster_locations(args)
    check_sources(args, exp.dataset)
    t0 = time.perf_counter()
    print(f"fcn experiment {exp.name}: {len(exp.rows)} rows on {exp.dataset} [{exp.split}]: "
          f"{', '.join(r.label for r in exp.rows)}", flush=True)
    from flows.cli.pipeline import start_services

    start_services()
    from flows.experiment import experiment_flow

    kwargs = {k: as_location(v) for k, v in (("root", root), ("out", args.out),
                                              ("storage", args.storage),
                                              ("sbd_root", args.sbd_root),
                                              ("context_root", args.context_root)) if v}
    result = experiment_flow(spec=str(Path(args.file).resolve()), rows=rows, force=args.force,
                             protocol=args.protocol, **kwargs)
    print()
    print(Path(result["table"]["markdown"]).read_text())
    print(f"table: {result['table']['markdown']}")
    if "chart" in result["table"]:
        print(f"chart: {result['table']['chart']}")
    print(f"MLflow parent run: {result['mlflow_parent']} (the rows are its child runs)")
    print(f"done in {time.perf_counter() - t0:.0f} s (a second run reuses every finished row)")
    if result["failed"]:
        print(f"{len(result['failed'])} of {len(exp.rows)} rows failed: "
              f"{', '.join(result['failed'])}; run the same command again: only they rerun")
        return 1
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment", help="run a grid of configs (the paper's tables) and compare them",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every row of an experiment file through the pipeline (ingest once, "
                    "then per row: train its stages, evaluate the final net, measure its size, "
                    "GMAC (at 500x500, or the file's size) and speed), each row its own "
                    "Prefect subflow and MLflow "
                    "child run, and write the comparison table as markdown, an MLflow table "
                    "and a bar chart. Finished rows are cached: a second run trains nothing, "
                    "and a rerun after a failure runs only the failed rows.",
        epilog="presets (CPU, the demo's generated data, minutes each):\n"
               "  configs/paper/table1.yaml   backbones: FCN-AlexNet, FCN-VGG16, FCN-GoogLeNet\n"
               "  configs/paper/table2.yaml   FCN-32s-fixed, FCN-32s, FCN-16s, FCN-8s, "
               "at-once FCN-8s\n"
               "  configs/paper/sec4.4.yaml   loss sampling 1.0 vs 0.5, class balancing, "
               "jitter\n"
               "  configs/zoo/compare.yaml    FCN-8s against U-Net, SegNet, DeepLab v1/v3/v3+, "
               "PSPNet, RefineNet\n"
               "                              and torchvision's nets (~45 min on 2 CPUs)\n"
               "an experiment file: name, title, base (a config, relative to the file), set "
               "(keys for every row), size (GMAC input, default 500), rows: [{label, set: "
               "{config keys}, paper: mean IU}]")
    p.add_argument("file", help="an experiment file, e.g. configs/paper/table2.yaml")
    p.add_argument("--root", default=None,
                   help="the dataset folder as downloaded, a path or a URI (default for "
                        "synthetic: PROJECT_DIR/raw/synthetic, generated when missing)")
    p.add_argument("--sbd-root", default=None, help="pascal: SBD's benchmark_RELEASE/dataset")
    p.add_argument("--context-root", default=None, help="context: the PASCAL-Context annotations")
    p.add_argument("--protocol", default=None, help="pascal: seg11valid (default) or trainaug")
    p.add_argument("--out", default=None, help="shards folder or URI (default PROJECT_DIR/shards)")
    p.add_argument("--storage", default=None,
                   help="checkpoints folder or URI (default PROJECT_DIR/runs)")
    p.add_argument("--rows", default=None, metavar="LABEL,...",
                   help="run only these rows (their labels, comma-separated)")
    p.add_argument("--force", action="store_true", help="ignore cached ingest, stages and rows")
    _add_project_dir(p)
    add_verbose(p)
    p.set_defaults(func=cmd_experiment)
