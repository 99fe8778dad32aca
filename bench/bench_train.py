"""Ray Train stage overhead: one worker vs. a plain torch loop, fixed costs, 1 -> 2 workers.

    python bench/bench_train.py                    # FCN-32s, width 0.125, 256x256, batch 1
    python bench/bench_train.py --stage 8s --width 0.25 --size 375x500 --steps 100
    python bench/bench_train.py --quick            # smoke run: tiny images, few steps

Data: a generated VOC layout (`pipelines.sources.synthetic.write_voc`) ingested to Parquet
shards with `pipelines.ingest.ingest`, all in a temporary folder (removed at the end), with an
MLflow SQLite store beside it (MLFLOW_TRACKING_URI points there for the run).

1. step rate of ONE Ray Train worker (`start_pipeline_run` + `run_stage`, workers=1,
   val_every=0, checkpoint_every=steps) vs. a plain torch loop in this process on the same
   model (`build_stage_model`), optimizer (`make_optimizer`), lr schedule, channels_last
   setting, batch size, rows (`read_split_table` -> `training_batch` -> `model_input`) and
   torch thread count (the worker's `threads_per_worker`). The Ray side's step times are the
   timestamps of the stage run's per-step "loss" metric in MLflow (logged by rank 0 right
   after each optimizer step); the first --warmup steps are left out on both sides. The
   plain loop runs twice: with batches decoded beforehand (compute only) and decoding each
   batch inline; the first is timed again at the end to show drift. Goal: ratio >= 0.9.
2. fixed overhead of a stage: wall time from calling `run_stage` to step 1's timestamp
   (less one steady-state step), and from the last step's timestamp to `run_stage`
   returning (final validation, checkpoint, Ray Train shutdown, MLflow artifacts).
   Goal: <= 10 s each.
3. scaling: steady-state images/s with workers=1 and workers=2 (same batch per worker, so
   the global batch doubles), --cpus-per-worker each; the ratio (2.0 would be linear).

Ray is started (`pipelines.ray_env.init_ray`) before anything is timed: its start-up is not
in any number. Timings on a shared or busy machine vary; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fcn_core.precision import resolve_amp, resolve_channels_last  # noqa: E402
from fcn_core.transforms import MEAN_BGR  # noqa: E402
from pipelines.config import StageConfig, TrainConfig  # noqa: E402
from pipelines.ingest import IngestConfig, ingest  # noqa: E402
from pipelines.shards import model_input, read_manifest, read_split_table, training_batch  # noqa: E402
from pipelines.sources import synthetic as synth  # noqa: E402
from pipelines.train import (  # noqa: E402
    build_stage_model,
    finish_pipeline_run,
    make_optimizer,
    run_stage,
    set_lr,
    start_pipeline_run,
    train_step,
)

EXPERIMENT = "bench-train"


def quiet(msg: str) -> None:
    pass


def steady_rate(times: list[float], warmup: int) -> float:
    """Steps/s between the end of step ``warmup`` and the end of the last step."""
    k = min(warmup, len(times) - 2)
    return (len(times) - 1 - k) / max(times[-1] - times[k], 1e-9)


def worker_threads(cfg: TrainConfig) -> int:
    """The torch thread count `train_stages` gives each Ray Train worker."""
    return cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker))


def plain_loop(cfg: TrainConfig, data: Path, steps: int, warmup: int, predecoded: bool
               ) -> float:
    """Steady-state steps/s of the same stage as a plain loop in this process."""
    torch.set_num_threads(worker_threads(cfg))
    torch.manual_seed(cfg.seed)
    stage = cfg.stages[0]
    model = build_stage_model(cfg, stage, read_manifest(data).num_classes, None, quiet)
    optimizer = make_optimizer(model, cfg, stage)
    # as the workers do: channels_last auto is NCHW for fp32 on a CPU
    cl = resolve_channels_last(cfg.channels_last, "cpu", resolve_amp(cfg.amp, "cpu"))
    if cl:
        model = model.to(memory_format=torch.channels_last)
    rows = read_split_table(data, cfg.train_split, ["image", "label"]).to_pylist()
    mean, b = MEAN_BGR[cfg.dataset], cfg.batch_size

    def batch(i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chunk = [rows[(i * b + j) % len(rows)] for j in range(b)]
        nb = training_batch({k: [r[k] for r in chunk] for k in ("image", "label")},
                            mirror=cfg.mirror, seed=cfg.seed + i, multiple=cfg.pad_multiple)
        x, labels = model_input(nb, mean, "cpu", cfg.input)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels

    epoch = -(-len(rows) // b)  # batches per pass over the rows
    ready = [batch(i) for i in range(min(steps, epoch))] if predecoded else []
    times = []
    for step in range(steps):
        x, labels = ready[step % len(ready)] if predecoded else batch(step)
        set_lr(optimizer, cfg, stage, step)
        train_step(model, optimizer, x, labels, ["out"], cfg.normalize_loss)
        times.append(time.perf_counter())
    return steady_rate(times, warmup)


def ray_stage(cfg: TrainConfig, data: Path, storage: Path, warmup: int) -> dict[str, float]:
    """One stage through the pipeline's driver; rates and overheads from MLflow timestamps."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri

    run = start_pipeline_run(cfg, data, storage, experiment=EXPERIMENT, log=quiet)
    t_call = time.time()
    res = run_stage(cfg, cfg.stages[0], data, run, None, log=quiet)
    t_return = time.time()
    finish_pipeline_run(run, ok=True)
    hist = sorted(MlflowClient(tracking_uri()).get_metric_history(res.run_id, "loss"),
                  key=lambda m: m.step)
    steps = cfg.stages[0].steps
    assert [m.step for m in hist] == list(range(1, steps + 1)), [m.step for m in hist]
    times = [m.timestamp / 1000 for m in hist]  # ms resolution
    rate = steady_rate(times, warmup)
    return {"steps_per_s": rate, "images_per_s": rate * cfg.batch_size * cfg.workers,
            "start_raw": times[0] - t_call, "start": times[0] - t_call - 1 / rate,
            "end": t_return - times[-1], "total": t_return - t_call}


def parse_size(s: str) -> tuple[int, int]:
    h, _, w = s.partition("x")
    return int(h), int(w or h)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="32s", choices=["32s", "16s", "8s", "8s-atonce"],
                    help="which net trains (32s = FCN-32s, 8s = FCN-8s from scratch; "
                         "default 32s)")
    ap.add_argument("--width", type=float, default=0.125, help="VGG16 width (default 0.125)")
    ap.add_argument("--size", default="256", help="image size, N or HxW (default 256)")
    ap.add_argument("--steps", type=int, default=60, help="steps per stage (default 60)")
    ap.add_argument("--warmup", type=int, default=5,
                    help="first steps left out of every rate (default 5)")
    ap.add_argument("--batch", type=int, default=1, help="images per worker per step (default 1)")
    ap.add_argument("--images", type=int, default=32, help="generated train images (default 32)")
    ap.add_argument("--val-images", type=int, default=4,
                    help="generated val images: the stage's final validation (default 4)")
    ap.add_argument("--cpus-per-worker", type=float, default=0.5,
                    help="Ray CPUs per training worker (default 0.5, the project default; "
                         "torch threads = max(1, int(this)))")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 64x64 images, 15 steps, batch 2, 8 images")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it")
    args = ap.parse_args()
    if args.quick:
        args.size, args.steps, args.warmup, args.batch = "64", 15, 3, 2
        args.images, args.val_images = 8, 2
    if args.steps < args.warmup + 2:
        ap.error(f"--steps must be >= --warmup + 2, got steps={args.steps}, "
                 f"warmup={args.warmup}")
    h, w = parse_size(args.size)
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_train_")).resolve()
    os.environ.pop("RAY_ADDRESS", None)  # a local Ray: this measures one machine
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"

    import ray
    from mlflow.tracking import MlflowClient

    from pipelines.ray_env import init_ray

    try:
        t0 = time.perf_counter()
        raw = synth.write_voc(work / "raw", n_train=args.images, n_val=args.val_images,
                              size=(h, w), seed=0)
        print(f"generated {args.images} + {args.val_images} VOC-layout images of {h}x{w} in "
              f"{time.perf_counter() - t0:.1f} s under {work}")
        print(init_ray() + " (started before timing)")
        data = ingest(IngestConfig(dataset="voc", root=raw, out=work / "shards"),
                      log=quiet).dataset_dir
        MlflowClient().create_experiment(EXPERIMENT,
                                         artifact_location=(work / "artifacts").as_uri())

        cfg = TrainConfig(name="bench", dataset="voc", width=args.width,
                          stages=(StageConfig(args.stage, args.steps, 1e-10),),
                          batch_size=args.batch, workers=1, val_every=0,
                          checkpoint_every=args.steps, cpus_per_worker=args.cpus_per_worker)
        threads = worker_threads(cfg)
        print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"ray {ray.__version__}; FCN-{args.stage} width {args.width}, {h}x{w}, batch "
              f"{args.batch}/worker, {args.steps} steps ({args.warmup} warm-up left out), "
              f"{threads} torch thread(s) per worker, channels_last {cfg.channels_last} ("
              f"{resolve_channels_last(cfg.channels_last, 'cpu', resolve_amp(cfg.amp, 'cpu'))})")

        print("\n1. one worker vs. a plain loop (steady-state steps/s)")
        plain_pre = plain_loop(cfg, data, args.steps, args.warmup, predecoded=True)
        print(f"  plain loop, batches decoded beforehand: {plain_pre:.2f} steps/s", flush=True)
        plain_inline = plain_loop(cfg, data, args.steps, args.warmup, predecoded=False)
        print(f"  plain loop, decoding inline:            {plain_inline:.2f} steps/s",
              flush=True)
        r1 = ray_stage(cfg, data, work / "runs", args.warmup)
        print(f"  Ray Train, 1 worker:                    {r1['steps_per_s']:.2f} steps/s "
              f"| ratio {r1['steps_per_s'] / plain_pre:.2f} (pre-decoded), "
              f"{r1['steps_per_s'] / plain_inline:.2f} (inline)", flush=True)

        print("\n2. fixed overhead of the stage (1 worker)")
        print(f"  run_stage called -> step 1 done: {r1['start_raw']:.1f} s "
              f"({r1['start']:.1f} s less one steady step)")
        print(f"  last step done -> run_stage returned: {r1['end']:.1f} s "
              f"(whole stage {r1['total']:.1f} s)")

        print("\n3. scaling 1 -> 2 workers (steady-state images/s)")
        cfg2 = dataclasses.replace(cfg, workers=2)
        r2 = ray_stage(cfg2, data, work / "runs", args.warmup)
        scale = r2["images_per_s"] / r1["images_per_s"]
        print(f"  1 worker {r1['images_per_s']:.2f} img/s | 2 workers "
              f"{r2['images_per_s']:.2f} img/s | ratio {scale:.2f}")
        print(f"  2-worker stage: start {r2['start']:.1f} s, end {r2['end']:.1f} s", flush=True)

        plain_again = plain_loop(cfg, data, args.steps, args.warmup, predecoded=True)
        print(f"\nplain loop (pre-decoded) again: {plain_again:.2f} steps/s "
              f"(drift {100 * (plain_again / plain_pre - 1):+.0f}%)")

        ips = args.batch  # images per step of one worker
        print(f"\n| measure | Ray Train | plain torch | ratio | goal |\n|---|---:|---:|---:|---|\n"
              f"| steps/s, 1 worker vs. loop on pre-decoded batches | "
              f"{r1['steps_per_s']:.2f} | {plain_pre:.2f} | "
              f"{r1['steps_per_s'] / plain_pre:.2f} | >= 0.9 |\n"
              f"| steps/s, 1 worker vs. loop decoding inline | {r1['steps_per_s']:.2f} | "
              f"{plain_inline:.2f} | {r1['steps_per_s'] / plain_inline:.2f} | >= 0.9 |\n"
              f"| images/s, 1 worker | {r1['images_per_s']:.2f} | {plain_pre * ips:.2f} | "
              f"{r1['steps_per_s'] / plain_pre:.2f} | |")
        print(f"\n| stage fixed cost (1 worker) | seconds | goal |\n|---|---:|---|\n"
              f"| run_stage call -> step 1 done, less one steady step | {r1['start']:.1f} | "
              f"<= 10 |\n| last step done -> run_stage returns | {r1['end']:.1f} | <= 10 |")
        print(f"\n| workers | CPUs each | global batch | images/s | ratio to 1 worker |\n"
              f"|---:|---:|---:|---:|---:|\n"
              f"| 1 | {cfg.cpus_per_worker:g} | {args.batch} | {r1['images_per_s']:.2f} | "
              f"1.00 |\n| 2 | {cfg.cpus_per_worker:g} | {2 * args.batch} | "
              f"{r2['images_per_s']:.2f} | {scale:.2f} |")
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
