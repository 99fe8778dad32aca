"""``fcn ingest``: a dataset as downloaded -> validated Parquet shards."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from flows.cli.common import (
    add_result_arg,
    add_verbose,
    positive_int,
    quiet_ray_logs,
    say,
    size,
    write_result,
)

if TYPE_CHECKING:
    from pipelines.ingest import IngestConfig


def ingest_config(args: argparse.Namespace) -> IngestConfig:
    """The ingest that ``fcn ingest ARGS`` asks for (what a Ray job of it will do)."""
    from pipelines.errors import UsageError
    from pipelines.ingest import IngestConfig
    from pipelines.sources.datasets import DATASETS

    first = DATASETS[args.dataset].roots[0]
    if args.root is None:
        flag = "--root" if first == "root" else f"--{first}-root"
        raise UsageError(f"{args.dataset} needs {flag} (the dataset folder as downloaded)")
    splits = tuple(s for s in args.splits.split(",") if s) if args.splits else None
    return IngestConfig(dataset=args.dataset, root=args.root, out=args.out,
                        splits=splits, split_file=args.split_file, shard_rows=args.shard_rows,
                        synthetic_size=args.synthetic_size, sbd_root=args.sbd_root,
                        context_root=args.context_root, protocol=args.protocol,
                        allow_missing=args.allow_missing, compute_hha=args.compute_hha,
                        engine=args.engine)


def ingest_args(cfg: IngestConfig) -> list[str]:
    """``fcn ingest`` arguments for ``cfg`` (a Ray job's entrypoint); ``ingest_config`` of
    them gives ``cfg`` back (tested), so a job ingests what the flow asked for."""
    args = ["ingest", cfg.dataset, "--root", cfg.root, "--out", cfg.out,
            "--shard-rows", str(cfg.shard_rows)]
    args += ["--splits", ",".join(cfg.splits)] if cfg.splits else []
    args += ["--split-file", cfg.split_file] if cfg.split_file else []
    if cfg.dataset == "synthetic":
        h, w = cfg.synthetic_size
        args += ["--synthetic-size", str(h) if h == w else f"{h}x{w}"]
    for flag, value in (("--sbd-root", cfg.sbd_root), ("--context-root", cfg.context_root),
                        ("--protocol", cfg.protocol)):
        args += [flag, value] if value else []
    args += ["--allow-missing"] if cfg.allow_missing else []
    args += ["--compute-hha"] if cfg.compute_hha else []
    args += ["--engine", cfg.engine] if cfg.engine != "auto" else []
    return args


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipelines.ingest import ingest

    quiet_ray_logs(args.verbose)
    result = ingest(ingest_config(args), log=say)
    print(result.summary())
    write_result(args, dataclasses.asdict(result))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from pipelines.sources.datasets import NAMES, layouts_help

    p = sub.add_parser(
        "ingest", help="read a dataset's own layout into validated Parquet shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read a dataset as downloaded, decode and validate every example with Ray "
                    "Data (small datasets in this process, see --engine), and write Parquet "
                    "shards, manifest.json and quarantine.parquet "
                    "under OUT/DATASET/ (that folder is what --data of train, evaluate and "
                    "register takes). Re-running on unchanged files does nothing; changed "
                    "files make a new version and keep the old one. Uses the Ray cluster in "
                    "RAY_ADDRESS when set, else a local Ray.",
        epilog=layouts_help())
    p.add_argument("dataset", choices=NAMES)
    p.add_argument("--root", "--voc-root", dest="root", default=None,
                   help="the dataset folder as downloaded: a path or a URI (s3://bucket/voc); "
                        "for pascal and context, the VOC devkit (--voc-root)")
    p.add_argument("--sbd-root", default=None,
                   help="pascal: SBD's benchmark_RELEASE/dataset (img/, cls/, train.txt)")
    p.add_argument("--context-root", default=None,
                   help="context: the PASCAL-Context annotations (trainval/*.mat, labels.txt, "
                        "59_labels.txt)")
    p.add_argument("--protocol", default=None,
                   help="pascal: seg11valid (default; SBD train -> seg11valid, the FCN "
                        "paper's) or trainaug (train_aug 10,582 -> VOC2012 val 1,449); "
                        "a non-default protocol goes to OUT/DATASET-PROTOCOL/")
    p.add_argument("--allow-missing", action="store_true",
                   help="pascal: go on when validation ids are missing from the VOC tree or "
                        "also in SBD train (refused by default; the counts go into the "
                        "manifest)")
    p.add_argument("--compute-hha", action="store_true",
                   help="nyud: compute HHA (Gupta et al. 2014) from data/depth in the decode "
                        "step, with data/rawdepth's zeros as missing pixels when present, "
                        "instead of reading data/hha")
    p.add_argument("--out", required=True,
                   help="output folder or URI; shards go to OUT/DATASET/")
    p.add_argument("--splits", default=None,
                   help="comma-separated splits, e.g. train,val (default: all the layout has)")
    p.add_argument("--split-file", default=None,
                   help="a split file to use instead (ids, or 'image label' pairs per line)")
    p.add_argument("--shard-rows", type=positive_int, default=500,
                   help="rows per shard (default 500)")
    p.add_argument("--synthetic-size", type=size, default=(128, 128), metavar="HxW",
                   help="synthetic: the generated images' size, N or HxW (default 128, as "
                        "fcn demo and fcn run); ROOT is generated when empty")
    p.add_argument("--engine", choices=("auto", "ray", "local"), default="auto",
                   help="ray: decode with Ray Data on the cluster's CPUs; local: in this "
                        "process; auto (default): ray when RAY_ADDRESS names a cluster, else "
                        "local for at most 256 examples (where starting Ray Data costs more "
                        "than the work) and ray above")
    add_verbose(p)
    add_result_arg(p)
    p.set_defaults(func=cmd_ingest)
