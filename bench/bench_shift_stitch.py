"""Shift-and-stitch (§3.2) against the skip nets (§4.2), on the demo's trained stages.

    .venv/bin/fcn demo --project-dir /tmp/demo        # first, once (~2 min here)
    python bench/bench_shift_stitch.py --project /tmp/demo
    python bench/bench_shift_stitch.py --project /tmp/demo --factors 1,2,4 --repeats 5

The paper makes FCN-32s's output denser two ways: shift-and-stitch (score f*f shifted copies
of each image and interlace the coarse maps, output stride 32/f) and skips that fuse finer
layers (FCN-16s, FCN-8s). It found the skips "more effective and efficient". This scores the
demo's FCN-32s with --shift-stitch F for each F, and its FCN-16s and FCN-8s plainly, on the
validation split in this process (``pipelines.evaluate.evaluate``, no MLflow logging), and
prints mean IU and seconds per image (the median of --repeats passes over the split, after
one pass that warms up), with each row's cost and mean IU gain against plain FCN-32s from the
same run. --save appends a JSON record to bench/results/shift_stitch.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STRIDE = {"32s": 32, "16s": 16, "8s": 8}  # each stage's output stride


def newest_run(project: Path) -> Path:
    runs = sorted((project / "runs").glob("*/8s/final"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"no trained demo stages under {project}/runs: run "
                         f"`.venv/bin/fcn demo --project-dir {project}` first")
    return runs[-1].parents[1]


def score(model: str, data: str, factor: int, repeats: int) -> tuple[float, float, int]:
    """(mean IU, seconds per image: median of ``repeats`` timed passes, images)."""
    from fcn_core.inference import InferenceOptions
    from pipelines.evaluate import evaluate

    options = InferenceOptions(shift_stitch=factor)

    def once() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        r = evaluate(model, data, "val", options=options, log_to_mlflow=False,
                     log=lambda m: None)
        return r.metrics["mean_iu"], time.perf_counter() - t0, r.images

    once()  # warm-up: first-call allocations, the model read
    runs = [once() for _ in range(repeats)]
    miou, _, n = runs[0]
    return miou, statistics.median(t for _, t, _ in runs) / n, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", required=True, help="a demo's --project-dir")
    ap.add_argument("--factors", default="1,2,4,8", help="shift-and-stitch F for FCN-32s")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes; median (3)")
    ap.add_argument("--save", action="store_true")
    a = ap.parse_args()
    project = Path(a.project).resolve()
    os.environ.setdefault("FCN_DATA_DIR", str(project))
    run = newest_run(project)
    data = str(project / "shards" / "synthetic")
    rows: list[dict[str, object]] = []
    cases = [(f"FCN-32s, shift-and-stitch F={f}" if f > 1 else "FCN-32s", "32s", f)
             for f in (int(x) for x in a.factors.split(","))]
    cases += [("FCN-16s", "16s", 1), ("FCN-8s", "8s", 1)]
    for label, stage, f in cases:
        miou, s_per_image, n = score(str(run / stage / "final"), data, f, a.repeats)
        rows.append({"row": label, "output stride": STRIDE[stage] // f, "mean_iu": miou,
                     "s_per_image": s_per_image})
        print(f"{label}: mean IU {miou:.4f}, {s_per_image * 1000:.1f} ms per image", flush=True)
    base = rows[0]
    print(f"\n{run.name} on {data} [val] ({n} images), {os.cpu_count()} CPUs, median of "
          f"{a.repeats} passes")
    print(f"{'row':<34}{'stride':>7}{'mean IU':>9}{'gain':>8}{'ms/image':>10}{'cost':>7}")
    for r in rows:
        print(f"{r['row']:<34}{r['output stride']:>7}{r['mean_iu']:>9.4f}"
              f"{r['mean_iu'] - base['mean_iu']:>+8.4f}{r['s_per_image'] * 1000:>10.1f}"
              f"{r['s_per_image'] / base['s_per_image']:>6.1f}x")
    if a.save:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "run": run.name,
                  "repeats": a.repeats, "rows": rows}
        with open(ROOT / "bench" / "results" / "shift_stitch.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
