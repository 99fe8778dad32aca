"""Ingest and loader throughput, Ray Data vs. a plain single process, measured in one run.

    python bench/bench_ingest.py                 # 500 VOC-layout images of 500x375
    python bench/bench_ingest.py --images 100    # quicker

1. ingest rows/s: `pipelines.ingest` (Ray Data, all CPUs) vs. a loop in one process doing the
   same decode + validate + Parquet write (the same `_example_row` function).
2. training-loader images/s: Ray Data streaming the Parquet shards (`training_batch`) vs. a
   torch DataLoader reading the raw JPEG/PNG files, both with the same number of workers.
Prints both ratios (> 1 means Ray Data is faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fcn_core.transforms import MEAN_BGR, image_to_tensor, label_to_tensor, pad_batch  # noqa: E402
from pipelines.ingest import SHARD_SCHEMA, IngestConfig, _example_row, ingest  # noqa: E402
from pipelines.shards import model_input, read_manifest, training_batch  # noqa: E402
from pipelines.sources import decode_image, decode_label, voc  # noqa: E402
from pipelines.sources import synthetic as synth  # noqa: E402


def single_process_ingest(records, out: Path, shard_rows: int) -> int:
    out.mkdir(parents=True)
    rows, shard, n = [], 0, 0
    for rec in records:
        row = _example_row(rec, "voc", voc.NUM_CLASSES)
        if row["reason"] is None:
            rows.append({k: row[k] for k in SHARD_SCHEMA.names})
        if len(rows) == shard_rows:
            pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA),
                           out / f"part-{shard:05d}.parquet")
            n, shard, rows = n + len(rows), shard + 1, []
    if rows:
        pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA),
                       out / f"part-{shard:05d}.parquet")
        n += len(rows)
    return n


class RawFiles(torch.utils.data.Dataset):
    def __init__(self, records):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        rec = self.records[i]
        return (image_to_tensor(decode_image(rec.image), MEAN_BGR["voc"]),
                label_to_tensor(decode_label(rec)))


def collate(items):
    return pad_batch([a for a, _ in items], [b for _, b in items])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500, help="generated images (default 500)")
    ap.add_argument("--size", default="375x500", help="HxW of the images (default 375x500)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                    help="loader workers on both sides (default: CPU count)")
    ap.add_argument("--batch", type=int, default=8, help="loader batch size (default 8)")
    ap.add_argument("--shard-rows", type=int, default=100)
    ap.add_argument("--keep", default=None, help="work in this folder and keep it")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_ingest_"))

    import ray

    from pipelines.ray_env import init_ray

    t0 = time.perf_counter()
    raw = synth.write_voc(work / "raw", n_train=args.images, n_val=0, size=(h, w), seed=0)
    print(f"generated {args.images} VOC-layout images of {h}x{w} in "
          f"{time.perf_counter() - t0:.1f} s under {work}")
    records, _ = voc.list_records(raw, splits=["train"])

    init_ray(num_cpus=args.workers)
    print(f"Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs (started before timing)")
    shutil.rmtree(work / "ray_out", ignore_errors=True)
    t0 = time.perf_counter()
    res = ingest(IngestConfig(dataset="voc", root=raw, out=work / "ray_out", splits=("train",),
                              shard_rows=args.shard_rows), log=lambda m: None)
    t_ray = time.perf_counter() - t0
    shutil.rmtree(work / "loop_out", ignore_errors=True)
    t0 = time.perf_counter()
    n_loop = single_process_ingest(records, work / "loop_out", args.shard_rows)
    t_loop = time.perf_counter() - t0
    assert n_loop == res.rows["train"], (n_loop, res.rows)
    r_ray, r_loop = res.rows["train"] / t_ray, n_loop / t_loop
    print(f"ingest: Ray Data {r_ray:.1f} rows/s ({t_ray:.1f} s) | single process "
          f"{r_loop:.1f} rows/s ({t_loop:.1f} s) | ratio {r_ray / r_loop:.2f}")

    # Loaders: a warm-up pass (worker start-up, imports), then one timed pass each; same
    # batch size and worker count. Training runs many epochs: the steady state is what counts.
    paths = read_manifest(res.dataset_dir).shard_paths("train")
    ds = ray.data.read_parquet(paths, override_num_blocks=len(paths)).map_batches(
        training_batch, batch_size=args.batch, batch_format="numpy", num_cpus=1,
        concurrency=args.workers)
    loader = torch.utils.data.DataLoader(RawFiles(records), batch_size=args.batch,
                                         num_workers=args.workers, collate_fn=collate,
                                         persistent_workers=True)

    def ray_pass() -> int:  # uint8 through Ray; float BGR-mean tensors made here, as in training
        return sum(model_input(b, MEAN_BGR["voc"])[0].shape[0]
                   for b in ds.iter_torch_batches(batch_size=args.batch))

    def raw_pass() -> int:
        return sum(x.shape[0] for x, _ in loader)

    rates = {}
    for name, one_pass in (("ray", ray_pass), ("raw", raw_pass)):
        one_pass()
        t0 = time.perf_counter()
        n = one_pass()
        rates[name] = (n, n / (time.perf_counter() - t0))
    (n_ray, l_ray), (n_raw, l_raw) = rates["ray"], rates["raw"]
    assert n_ray == n_raw == len(records)
    print(f"loader: Ray Data from shards {l_ray:.1f} img/s | DataLoader on raw files "
          f"{l_raw:.1f} img/s ({args.workers} workers each) | ratio {l_ray / l_raw:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
