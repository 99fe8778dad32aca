"""Where the time of a whole pipeline run goes: `fcn demo --force` in a fresh project folder,
every output line timestamped as it arrives, split into phases.

    python bench/bench_pipeline.py                     # configs/demo.yaml, ~5-7 min here
    python bench/bench_pipeline.py --config my.yaml --runs 3

Phases: start (process start to its first line: imports), ingest (to the first stage's start),
then per stage: start (the driver's "stage S: N steps" line to the first step), steps (first to
last step), end (last step to the next phase: final validation, checkpoint, Ray Train shut
down, MLflow), then evaluation + registration + Prefect's share (the rest), and the final mean
IU of each stage. With --runs N, each figure is the median over the runs. Appends a JSON
record to bench/results/pipeline.jsonl with --save.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FCN = ROOT / ".venv" / "bin" / "fcn"

# A stage starts with its Prefect task's first line: the chain's ("stages 32s, 16s, 8s: ...
# steps on 2 worker(s)", the first stage's start) or a later stage's ("stage 16s: in the
# same worker group, ...").
STAGE_START = re.compile(r"stages? (\w+)(?:, \w+)*: (?:.*steps on \d+ worker|in the same "
                         r"worker group)")
STEP = re.compile(r"\[(\w+)\] step (\d+)/(\d+)")
EVAL = re.compile(r"(scor|evaluat)", re.I)
TABLE_ROW = re.compile(r"^\s*(?:FCN-)?(32s|16s|8s)\b.*?(\d\.\d{3})\s+(\d\.\d{3})\s+(\d\.\d{3})")


def run_once(config: str, keep: bool) -> tuple[dict[str, float], list[tuple[float, str]]]:
    project = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    cmd = [str(FCN), "demo", "--project-dir", str(project), "--config", config, "--force"]
    t0 = time.perf_counter()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write("\n".join(text for _, text in lines[-30:]) + "\n")
        raise SystemExit(f"fcn demo failed (exit {proc.returncode})")
    if not keep:
        subprocess.run(["rm", "-rf", str(project)], check=False)
    return phases(lines, total), lines


def phases(lines: list[tuple[float, str]], total: float) -> dict[str, float]:
    out: dict[str, float] = {"total": total, "start": lines[0][0] if lines else total}
    starts: dict[str, float] = {}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    order: list[str] = []
    for t, text in lines:
        if m := STAGE_START.search(text):
            starts.setdefault(m.group(1), t)
            order.append(m.group(1)) if m.group(1) not in order else None
        elif m := STEP.search(text):
            stage, step, steps = m.group(1), int(m.group(2)), int(m.group(3))
            if step == 1:
                first.setdefault(stage, t)
            if step == steps:
                last[stage] = t
    if not order:
        return out
    out["ingest"] = starts[order[0]] - out["start"]
    for i, s in enumerate(order):
        nxt = starts[order[i + 1]] if i + 1 < len(order) else None
        out[f"{s} start"] = first.get(s, starts[s]) - starts[s]
        out[f"{s} steps"] = last.get(s, first.get(s, starts[s])) - first.get(s, starts[s])
        if nxt is not None:
            out[f"{s} end"] = nxt - last.get(s, nxt)
    end_last = last.get(order[-1], starts[order[-1]])
    # The last stage's end, evaluation, registration and the summary share what is left: the
    # first evaluation line after the last step splits it.
    after = [t for t, text in lines if t > end_last and EVAL.search(text)]
    split = after[0] if after else end_last
    out[f"{order[-1]} end"] = split - end_last
    out["evaluate + register + Prefect"] = total - split
    for _, text in lines:
        if m := TABLE_ROW.search(text):
            out[f"{m.group(1)} mean IU"] = float(m.group(4))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--runs", type=int, default=1, help="runs; figures are medians (1)")
    ap.add_argument("--keep", action="store_true", help="keep the project folders")
    ap.add_argument("--log", action="store_true", help="print the timestamped output too")
    ap.add_argument("--save", action="store_true", help="append to bench/results/")
    args = ap.parse_args()
    results = []
    for i in range(args.runs):
        res, lines = run_once(args.config, args.keep)
        results.append(res)
        if args.log:
            for t, text in lines:
                print(f"{t:8.1f}  {text}")
        print(f"run {i + 1}/{args.runs}: {res['total']:.0f} s", flush=True)
    keys = list(dict.fromkeys(k for r in results for k in r))
    print(f"\n{'phase':<32} {'seconds' if args.runs == 1 else 'median s':>9}")
    for k in keys:
        vals = [r[k] for r in results if k in r]
        v = statistics.median(vals)
        print(f"{k:<32} {v:>9.3f}" if "mean IU" in k else f"{k:<32} {v:>9.1f}")
    if args.save:
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        with open(out / "pipeline.jsonl", "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "config": args.config, "runs": results}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
