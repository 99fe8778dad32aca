"""`fcn predict` end to end, as a user runs it: one image and a folder, from a checkpoint and
from an MLflow registry on SQLite (the demo's), each a fresh `fcn` process.

    python bench/bench_predict.py               # 128 images of 128x128, median of 3 runs
    python bench/bench_predict.py --images 16 --runs 1 --size 32    # smoke run

A random FCN-8s at width 1/8 (the demo's net) is written as a training checkpoint and
registered (`pipelines.registry.register`) in a new SQLite store; --images random JPEGs of
--size^2 are written to a folder. Timed, wall clock of the whole command (Python start,
imports, model lookup, reading, predicting, writing both PNGs):

  one image, checkpoint   `fcn predict --model CKPT one.jpg`
  one image, registry     `fcn predict --model models:/bench@champion one.jpg` (the version's
                          checkpoint in the model cache, as registration left it)
  ..., no cache           the same with FCN_MODEL_CACHE=off (MLflow resolves and downloads)
  folder, registry        `fcn predict --model models:/bench@champion FOLDER` (the default:
                          here, the rest to Ray only when it would take over 20 s)
  folder, Ray from start  the same with `--actors 2` (a local Ray started by the command)

The runs take turns (one of each per round), so a machine that changes speed affects all
alike; each figure is the median of --runs. The last line is the ratio of the default folder
run to the Ray-from-the-start one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(work: Path, images: int, size: int) -> dict[str, str]:
    import numpy as np
    import torch
    from PIL import Image

    from fcn_core import fcn8s
    from pipelines.registry import register
    from pipelines.train.checkpoint import write_checkpoint

    torch.manual_seed(0)
    ck = work / "ck"
    ck.mkdir()
    write_checkpoint(str(ck / "checkpoint.pt"), fcn8s(width=1 / 8),
                     config={"dataset": "voc", "input": "rgb"})
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["FCN_DATA_DIR"] = str(work / "project")  # registration fills its model cache
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    manifest = {"dataset": "voc", "source": {"fingerprint": "f" * 8}, "version": "v1"}
    register(str(ck), name="bench", metrics={"mean_iu": 0.5}, split="val", manifest=manifest,
             config_digest="d", log=lambda m: None)
    folder = work / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{i:04d}.jpg", quality=90)
    return {"ck": str(ck), "one": str(folder / "0000.jpg"), "folder": str(folder)}


def timed(args: list[str], env: dict[str, str]) -> float:
    t0 = time.monotonic()
    r = subprocess.run([str(Path(sys.executable).parent / "fcn"), "predict", *args],
                       capture_output=True, text=True, env=env, timeout=900)
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"fcn predict {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128, help="images in the folder (128)")
    ap.add_argument("--size", type=int, default=128, help="square image size (128)")
    ap.add_argument("--runs", type=int, default=3, help="rounds; figures are medians (3)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as d:
        work = Path(d)
        paths = prepare(work, a.images, a.size)
        env = {**os.environ, "FCN_DATA_DIR": str(work / "project")}
        cases = {
            "one image, checkpoint": ["--model", paths["ck"], paths["one"]],
            "one image, registry": ["--model", "models:/bench@champion", paths["one"]],
            "one image, registry, no cache": ["--model", "models:/bench@champion",
                                              paths["one"]],
            "folder, registry": ["--model", "models:/bench@champion", paths["folder"]],
            "folder, Ray from the start": ["--model", "models:/bench@champion",
                                           paths["folder"], "--actors", "2"],
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for r in range(a.runs):
            for k, args in cases.items():
                no_cache = {"FCN_MODEL_CACHE": "off"} if k.endswith("no cache") else {}
                times[k].append(timed([*args, "--out", str(work / f"out-{r}-{len(times[k])}")],
                                      {**env, **no_cache}))
        print(f"fcn predict, {a.images} images of {a.size}x{a.size} in the folder, "
              f"FCN-8s width 1/8, {os.cpu_count()} CPUs, median of {a.runs}")
        print(f"{'case':<30} {'seconds':>8}   runs")
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            print(f"{k:<30} {med[k]:8.2f}   {' '.join(f'{x:.2f}' for x in v)}")
        print(f"folder: default / Ray from the start = "
              f"{med['folder, registry'] / med['folder, Ray from the start']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
