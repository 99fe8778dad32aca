"""`fcn train` on its own, as a user runs it: where a short run's time goes.

    python bench/bench_train_cli.py                    # 3 runs, ~1.5 min here
    python bench/bench_train_cli.py --runs 5 --save
    python bench/bench_train_cli.py --compare OLD      # against another checkout, in turns

A generated VOC layout (64 train + 8 val images, 64x64) is ingested once. Each run is a fresh
`fcn train --config C --data D` process with its own FCN_DATA_DIR (a new MLflow SQLite store)
and its own local Ray, training configs/demo.yaml's FCN-32s stage (width 1/8, 2 workers) for
--steps steps. Times are the arrival here of its output lines:

  start -> fit      the "stage 32s: ..." line (just before Ray Train's fit())
  fit -> step 1     the "[32s] step 1/" line
  step 1 -> table   the closing stage table (the steps, the final validation, checkpoint,
                    MLflow artifacts)
  table -> exit     the process's end (Ray's shutdown and the other exit handlers)
  total

Each figure is the median of --runs. ``--compare OLD`` also runs `python -m flows.cli train`
from the checkout OLD (its code on PYTHONPATH, so the local Ray's workers import it too),
taking turns with this one, and prints the ratio of the totals (this / OLD) from the same
run. --save appends a JSON record to bench/results/train_cli.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARKS = (("fit", "stage 32s:"), ("step 1", "[32s] step 1/"), ("table", "stage       steps"))
PHASES = ("start -> fit", "fit -> step 1", "step 1 -> table", "table -> exit", "total")


def prepare(work: Path, steps: int) -> tuple[Path, Path]:
    from pipelines.ingest import IngestConfig, ingest
    from pipelines.sources.synthetic import write_voc

    raw = write_voc(work / "raw", n_train=64, n_val=8, size=(64, 64))
    ingest(IngestConfig(dataset="voc", root=raw, out=work / "shards"), log=lambda m: None)
    text = (ROOT / "configs" / "demo.yaml").read_text()
    lines = [ln for ln in text.splitlines() if "{name: 16s" not in ln and "{name: 8s" not in ln]
    cfg = "\n".join(lines).replace("dataset: synthetic", "dataset: voc")
    cfg = cfg.replace("steps: 200", f"steps: {steps}")
    path = work / "train.yaml"
    path.write_text(cfg + "\n")
    return path, work / "shards" / "voc"


def one_run(command: list[str], cwd: Path, cfg: Path, data: Path, state: Path,
            pythonpath: str | None) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    env["FCN_DATA_DIR"] = str(state)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t0 = time.monotonic()
    proc = subprocess.Popen([*command, "train", "--config", str(cfg), "--data", str(data)],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen: dict[str, float] = {}
    out = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        for name, text in MARKS:
            if name not in seen and text in line:
                seen[name] = time.monotonic() - t0
    code = proc.wait()
    end = time.monotonic() - t0
    if code != 0 or len(seen) < len(MARKS):
        raise SystemExit(f"{' '.join(command)} train failed ({code}):\n{''.join(out)[-4000:]}")
    return {"start -> fit": seen["fit"], "fit -> step 1": seen["step 1"] - seen["fit"],
            "step 1 -> table": seen["table"] - seen["step 1"],
            "table -> exit": end - seen["table"], "total": end}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs of each; medians (3)")
    ap.add_argument("--steps", type=int, default=4, help="training steps (4)")
    ap.add_argument("--compare", default=None, metavar="CHECKOUT",
                    help="another checkout of the project, run in turns with this one")
    ap.add_argument("--save", action="store_true", help="append to bench/results/train_cli.jsonl")
    a = ap.parse_args()
    fcn = [str(Path(sys.executable).parent / "fcn")]
    sides = {"this": (fcn, ROOT, None)}
    if a.compare:
        other = Path(a.compare).resolve()
        sides["compare"] = ([sys.executable, "-m", "flows.cli"], other, str(other))
    with tempfile.TemporaryDirectory(prefix="bench-train-cli-") as d:
        work = Path(d)
        cfg, data = prepare(work, a.steps)
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
        for r in range(a.runs):
            for side, (command, cwd, path) in sides.items():
                runs[side].append(one_run(command, cwd, cfg, data, work / f"state-{side}-{r}",
                                          path))
                print(f"run {r + 1} {side}: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in runs[side][-1].items()), flush=True)
    print(f"\nfcn train, FCN-32s width 1/8, {a.steps} steps, 2 workers, {os.cpu_count()} "
          f"CPUs; seconds, median of {a.runs}")
    med = {side: {p: statistics.median(x[p] for x in rs) for p in PHASES}
           for side, rs in runs.items()}
    print(f"{'phase':<18}" + "".join(f"{s:>10}" for s in sides))
    for p in PHASES:
        print(f"{p:<18}" + "".join(f"{med[s][p]:10.2f}" for s in sides))
    if a.compare:
        print(f"total: this / {a.compare} = {med['this']['total'] / med['compare']['total']:.2f}")
    if a.save:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": a.steps,
                  "compare": a.compare, "runs": runs, "medians": med}
        with open(ROOT / "bench" / "results" / "train_cli.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
