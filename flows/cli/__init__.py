"""The ``fcn`` command line: one module per command group, one error policy (``errors``).

Heavy engines are imported inside each command, so ``fcn --help`` answers at once.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from flows.cli import data, errors, experiment, models, nets, pipeline, training
from flows.cli.training import stage_table

EPILOG = ("environment: RAY_ADDRESS (a Ray cluster: head:6379, or http://head:8265 to submit "
          "Ray jobs; auto: the `ray start` cluster of this machine; unset: a local Ray of "
          "this command's own), MLFLOW_TRACKING_URI (an MLflow server), PREFECT_API_URL (a Prefect "
          "server), FCN_DATA_DIR (local state, default ./data), FCN_MODEL_CACHE (registered "
          "models' checkpoints, default FCN_DATA_DIR/model-cache; off), AWS_ENDPOINT_URL / "
          "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION (s3:// locations). "
          "Exit status: 0 done, 2 a mistake in the input (one line says which), 1 a failure "
          "or a bug (with its traceback).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcn",
        description="Fully Convolutional Networks (FCN-32s/16s/8s on VGG16) for semantic "
                    "segmentation: ingest datasets with Ray Data, train the stages with Ray "
                    "Train, track and register models in MLflow, orchestrate with Prefect.",
        epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (nets, data, training, models, pipeline, experiment):
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser: its usage, not the top-level one
        command = _subcommands(parser).get(args.command, parser)
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "project_dir", None):  # the commands' local state (pipelines.tracking)
        os.environ["FCN_DATA_DIR"] = str(Path(args.project_dir).resolve())
    # Our own lines name the runs; MLflow would add a "View run ..." pair per run, and its
    # INFO lines (creating the SQLite tables, ...) are its internals: -v shows them.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # Ray folds worker lines that differ only in their numbers, from several processes within
    # 5 s, into one "[repeated 3x across cluster]" line printed later (with colour codes, in a
    # file too): short stages lost their checkpoint lines so. Ours are few, each says
    # something, and come as they are printed. (Read when Ray is imported: not yet here.)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if getattr(args, "verbose", False):
        os.environ["FCN_VERBOSE"] = "1"  # pipelines.ray_env: Ray's own logs too
    else:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        # (the champion gate and `fcn register` read models back: no tqdm bar per read)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return errors.run(func, args)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions
                 if isinstance(a, argparse._SubParsersAction)), {})


def _hangup(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def entry() -> None:
    """The ``fcn`` console script: ``main``, then the end of the process as Python ends it
    (threads joined, then the exit handlers: Ray's shutdown, Prefect's temporary server,
    MLflow's runs, logging), without the teardown that follows them: clearing the thousands
    of modules torch, Ray, Prefect and MLflow load took 1.6-2 s on 2 cores after a command
    was done (measured after `fcn demo`; ~0.3 s with torch alone).

    A hangup (the terminal closed) ends a command as Ctrl-C does, through its cleanup and
    those exit handlers, unless it is ignored (nohup): Prefect's temporary server runs in a
    session of its own (``flows.cli.pipeline.prefect_api_server``) and would outlive it."""
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signal.signal(signal.SIGHUP, _hangup)
    code = main()
    shutdown_threads = getattr(threading, "_shutdown", None)  # what Python does first
    if shutdown_threads is not None:
        shutdown_threads()  # non-daemon threads and executors' pending work finish
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["build_parser", "entry", "main", "stage_table"]
