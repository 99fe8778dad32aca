"""A first stage's start against Ray Train's own floor, in one local Ray.

    python bench/bench_stage_start.py              # 3 runs, ~2 min here
    python bench/bench_stage_start.py --runs 5 --save

Each run is a fresh process with its own local Ray (``init_ray``, as ``fcn train`` starts it)
and a small ingested dataset; after Ray has settled it times, in alternating order:

- floor: a ``TorchTrainer`` with the same workers whose train function only builds an Adam
  optimizer for a 2x2 linear layer: ``fit()`` to the function's first line (Ray Train's
  controller and worker processes, Ray and torch imported), and to the optimizer built
  (``torch.optim`` imports ``torch._dynamo`` on first use);
- ours: ``pipelines.train.train_stages`` of one 2-step FCN-32s stage of configs/demo.yaml:
  its "stage 32s: ..." line (just before ``fit()``) to its "[32s] step 1" line, as
  bench/bench_pipeline.py times a stage's start. Before it, as ``fcn run`` does while its
  ingest runs, ``pipelines.prestart`` has Ray start the run's processes (and the settle time
  lets them come up); the floor's trainer starts its own, as plain Ray Train does.

Every time is a line's arrival here (the workers' lines come through Ray's log monitor, the
same way for both). Prints each run and the medians; ``ours / floor`` below 1 is what the
prestart saves beyond our own work. Appends a JSON record to
bench/results/stage_start.jsonl with --save.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    order = sys.argv[2].split(",")
    settle = float(sys.argv[3])
    workers = {"workers": int(sys.argv[4])} if sys.argv[4] != "config" else {}
    os.environ["FCN_DATA_DIR"] = str(out / "state")
    from pipelines.ray_env import init_ray
    print(init_ray(2), flush=True)
    import ray, ray.train
    from ray.train.torch import TorchTrainer
    from pipelines.config import load_config
    from pipelines.ingest import IngestConfig, ingest
    from pipelines.prestart import prestart_train_processes
    from pipelines.train import PipelineRun, train_stages
    from pipelines.train.driver import scaling_config

    cfg = load_config("configs/demo.yaml", stages=[{"name": "32s", "steps": 2, "lr": 3e-4}],
                      val_every=0, checkpoint_every=100, **workers)
    ingest(IngestConfig(dataset="synthetic", root=str(out / "raw"), out=str(out / "shards"),
                        synthetic_size=(64, 64), engine="local"), log=lambda m: None)
    time.sleep(settle)  # Ray's own start (prestarted workers, dashboard) is over, as in a run

    def floor(_):
        if ray.train.get_context().get_world_rank() == 0:
            print("FLOOR loop", flush=True)
        import torch
        torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
        if ray.train.get_context().get_world_rank() == 0:
            print("FLOOR optimizer", flush=True)

    for what in order:
        if what == "floor":
            print("FLOOR fit", flush=True)
            TorchTrainer(floor, scaling_config=scaling_config(cfg), run_config=ray.train.RunConfig(
                storage_path=str(out / "floor"), name="floor")).fit()
        else:
            # As `fcn run` does while ingest runs: Ray Train's processes started ahead
            prestart_train_processes(cfg.workers).join()
            time.sleep(settle)
            run = PipelineRun(f"bench-{time.time_ns()}", str(out / "runs"))
            train_stages(cfg, list(cfg.stages), str(out / "shards" / "synthetic"), run, None, {},
                         log=lambda m: print(m, flush=True))
        time.sleep(settle / 2)  # the worker group's shutdown is over
    print("BENCH done", flush=True)
    """)

MARKS = {"floor fit": "FLOOR fit", "floor loop": "FLOOR loop",
         "floor optimizer": "FLOOR optimizer", "ours fit": "stage 32s: ",
         "ours step 1": "[32s] step 1/"}


def marks(lines: list[tuple[float, str]]) -> dict[str, float]:
    """The first arrival time of each mark's line."""
    found: dict[str, float] = {}
    for t, text in lines:
        for name, needle in MARKS.items():
            if needle in text:
                found.setdefault(name, t)
    return found


def figures(found: dict[str, float]) -> dict[str, float]:
    floor_loop = found["floor loop"] - found["floor fit"]
    floor_opt = found["floor optimizer"] - found["floor fit"]
    ours = found["ours step 1"] - found["ours fit"]
    return {"floor: fit -> train function": floor_loop,
            "floor: fit -> optimizer built": floor_opt,
            "ours: fit -> first step": ours,
            "ours / floor (optimizer built)": ours / floor_opt}


def run_once(order: str, settle: float, workers: int | None = None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-stage-start-") as d:
        lines: list[tuple[float, str]] = []
        t0 = time.perf_counter()
        cmd = [sys.executable, "-c", CHILD, d, order, str(settle),
               str(workers) if workers else "config"]
        with subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, bufsize=1) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        if proc.returncode != 0:
            sys.stderr.write("\n".join(text for _, text in lines[-30:]) + "\n")
            raise SystemExit(f"the benchmark's process failed (exit {proc.returncode})")
    return figures(marks(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs; figures are medians (3)")
    ap.add_argument("--save", action="store_true", help="append to bench/results/")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds to wait after Ray's start (half that after each trainer) "
                         "before timing the next thing (5; 0 only to check the script runs)")
    ap.add_argument("--workers", type=int, default=None,
                    help="Ray Train workers of both trainers (configs/demo.yaml's: 2)")
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        order = "floor,ours" if i % 2 == 0 else "ours,floor"
        runs.append(run_once(order, args.settle, args.workers))
        print(f"run {i + 1}/{args.runs} ({order}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in runs[-1].items()), flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"\nmedians of {args.runs} runs (s; the last row a ratio)")
    for k, v in med.items():
        print(f"{k:<34} {v:8.2f}")
    if args.save:
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": runs, "median": med}
        path = ROOT / "bench" / "results" / "stage_start.jsonl"
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"appended to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
