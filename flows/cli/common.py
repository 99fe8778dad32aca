"""Argument types and helpers shared by the command modules."""

from __future__ import annotations

import argparse
from typing import Any


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"expected HxW with positive integers, got {text!r}")
    return h, w


def scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers like 0.75,1,1.25, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be > 0, got {text!r}")
    return values


def say(msg: str) -> None:
    """Progress lines as they happen (a Ray job's log streams them)."""
    print(msg, flush=True)


def quiet_ray_logs(verbose: bool) -> None:
    """Only our own progress lines from Ray Data (``pipelines.ray_env.quiet_ray_data``)."""
    from pipelines.ray_env import quiet_ray_data

    quiet_ray_data(verbose)


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Ray's own INFO logs and internal warnings")


def add_result_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--result-json", default=None, metavar="LOCATION",
                   help="also write the result as JSON to this path or URI (what `fcn run` "
                        "reads back from a Ray job)")


def write_result(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """--result-json: the command's result for a caller that ran it as a Ray job."""
    if getattr(args, "result_json", None):
        from pipelines import storage

        storage.write_json(args.result_json, result)


def add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=positive_int, default=None,
                   help="sliding-window inference with this crop size (default: whole image)")
    p.add_argument("--scales", type=scales, default=None,
                   help="multi-scale averaging, e.g. 0.75,1,1.25 (default: 1)")
    p.add_argument("--flip", action="store_true", help="also average the mirrored image")
    p.add_argument("--shift-stitch", type=positive_int, default=1, metavar="F",
                   help="shift-and-stitch (the paper's section 3.2): score F*F copies of each "
                        "image shifted by stride/F pixels and interlace them into a map F "
                        "times finer before upsampling; F must divide the FCN's output stride "
                        "(32, 16 or 8). Default 1: off")
    p.add_argument("--crf", action="store_true",
                   help="refine the probabilities with DeepLab's fully connected CRF (10 "
                        "mean-field iterations, DeepLab-LargeFOV's kernels; pydensecrf2, "
                        "the 'crf' extra). RGB models only")


def inference_options(args: argparse.Namespace) -> Any:
    from fcn_core.inference import InferenceOptions

    return InferenceOptions(window=args.window, scales=args.scales or (1.0,), flip=args.flip,
                            shift_stitch=args.shift_stitch, crf=args.crf)


MLFLOW_STATE = "MLflow's SQLite store, unless MLFLOW_TRACKING_URI names a server"


def add_project_dir(p: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    """``--project-dir``: the folder of the local state (``FCN_DATA_DIR``); ``main`` makes a
    given one the command's ``FCN_DATA_DIR``, so the flag wins over the variable."""
    p.add_argument("--project-dir", default=default, metavar="DIR",
                   help=f"local state: {what} (default: FCN_DATA_DIR or ./data)")


AMP_HELP = ("mixed precision (default: the config's amp; a config without one: off): bf16 "
            "autocast, native on CPUs with avx512_bf16/AMX and Ampere+ GPUs (emulated and slow "
            "elsewhere); fp16 with a GradScaler, GPUs only; auto: bf16 where native, else fp32")
