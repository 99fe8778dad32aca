"""Shards on the local disk vs in an S3 server, measured in one run (same generated set).

    python bench/bench_storage.py                       # starts a SeaweedFS S3 server itself
    python bench/bench_storage.py --s3 s3://bucket/x    # an S3 you already have (AWS_* vars)

1. ingest rows/s: `pipelines.ingest` (Ray Data) writing shards to a local folder vs to S3
   (the raw files are local in both: the difference is the shard output path).
2. training-loader images/s: Ray Data streaming a split's shards (`open_split` ->
   `training_batch` -> `model_input`, what a training worker runs) from disk vs from S3.
Each measure is repeated (--repeats, alternating the order) and the median is printed with
every run; the ratios are S3 / local (goal: loader >= 0.7).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # tests/servers.py: the SeaweedFS helper

from fcn_core.transforms import MEAN_BGR  # noqa: E402
from pipelines import storage  # noqa: E402
from pipelines.ingest import IngestConfig, ingest  # noqa: E402
from pipelines.shards import model_input, open_split, training_batch  # noqa: E402
from pipelines.sources import synthetic as synth  # noqa: E402


def loader_rate(data: str, batch: int) -> tuple[int, float]:
    ds = open_split(data, "train").map_batches(training_batch, batch_size=batch,
                                               batch_format="numpy", num_cpus=1)
    t0 = time.perf_counter()
    n = sum(model_input(b, MEAN_BGR["voc"])[0].shape[0]
            for b in ds.iter_torch_batches(batch_size=batch))
    return n, n / (time.perf_counter() - t0)


def ingest_rate(raw: Path, out: str, shard_rows: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    res = ingest(IngestConfig(dataset="voc", root=raw, out=out, splits=("train",),
                              shard_rows=shard_rows), log=lambda m: None)
    return res.rows["train"], res.rows["train"] / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300, help="generated images (default 300)")
    ap.add_argument("--size", default="375x500", help="HxW of the images (default 375x500)")
    ap.add_argument("--batch", type=int, default=8, help="loader batch size (default 8)")
    ap.add_argument("--shard-rows", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3, help="runs per measure (median shown)")
    ap.add_argument("--s3", default=None,
                    help="an s3:// prefix to use (AWS_* variables); default: start SeaweedFS")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench_storage_"))
    server = None
    if args.s3:
        remote = args.s3.rstrip("/")
    else:
        from servers import SeaweedS3

        server = SeaweedS3(work / "s3").start()
        os.environ.update(server.env())
        remote = server.create_bucket("bench")
        print(f"SeaweedFS S3 on {server.endpoint} (ready in {server.ready_seconds:.1f} s)")

    import ray

    from pipelines.ray_env import init_ray

    try:
        raw = synth.write_voc(work / "raw", n_train=args.images, n_val=0, size=(h, w), seed=0)
        print(f"{args.images} VOC-layout images of {h}x{w}; {init_ray()}")
        ray.data.DataContext.get_current().enable_progress_bars = False
        rates: dict[str, list[float]] = {"ingest local": [], "ingest s3": [],
                                         "loader local": [], "loader s3": []}
        datasets = {}
        for i in range(args.repeats):
            order = ("local", "s3") if i % 2 == 0 else ("s3", "local")
            for where in order:
                tag = uuid.uuid4().hex[:8]
                out = str(work / f"out-{tag}") if where == "local" else \
                    storage.join(remote, f"out-{tag}")
                n, r = ingest_rate(raw, out, args.shard_rows)
                rates[f"ingest {where}"].append(r)
                datasets[where] = storage.join(out, "voc")
            for where in order:
                loader_rate(datasets[where], args.batch)  # warm-up: worker start-up
                n, r = loader_rate(datasets[where], args.batch)
                assert n == args.images, n
                rates[f"loader {where}"].append(r)
            print(f"run {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()))
        med = {k: statistics.median(v) for k, v in rates.items()}
        unit = {"ingest": "rows/s", "loader": "img/s"}
        print(f"\n{'measure':<10}{'local':>12}{'S3':>12}{'S3 / local':>12}   (median of "
              f"{args.repeats})")
        for what in ("ingest", "loader"):
            lo, s3 = med[f"{what} local"], med[f"{what} s3"]
            print(f"{what:<10}{lo:>12.1f}{s3:>12.1f}{s3 / lo:>12.2f}   {unit[what]}")
        ok = med["loader s3"] / med["loader local"] >= 0.7
        print(f"goal loader S3 >= 0.7 x local: {'met' if ok else 'NOT met'}")
    finally:
        ray.shutdown()
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
