"""Ingest and loader throughput, Ray Data vs. a plain single process, measured in one run.

    python bench/bench_ingest.py                 # 500 VOC-layout images of 500x375
    python bench/bench_ingest.py --images 100    # quicker

1. ingest rows/s: `pipelines.ingest` with Ray Data on all CPUs (`engine="ray"`) vs. the same
   call in one process (`engine="local"`): both list the files, fingerprint them, decode,
   validate, write the shards, the quarantine and the manifest (the same functions; only the
   executor differs). Median of --runs runs, the order alternating.
2. training-loader images/s with the same number of decoding workers W (default: CPU count),
   after a warm-up pass, each against a torch DataLoader reading the raw JPEG/PNG files with
   W worker processes:
   - held rows (`sampling: shuffle | random`, the default): W processes, as W Ray Train workers,
     each holding its 1/W of the shards' rows and running the training loop's own loader
     (`pipelines.train.worker._sampled_batches`: decode + pad one step ahead in a thread);
   - stream (`sampling: stream`): Ray Data reading the shards, decoding in W tasks.
Prints the ratios (> 1: faster than the raw-file DataLoader).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fcn_core.transforms import MEAN_BGR, image_to_tensor, label_to_tensor, pad_batch  # noqa: E402
from pipelines.ingest import IngestConfig, ingest  # noqa: E402
from pipelines.shards import model_input, read_manifest, training_batch  # noqa: E402
from pipelines.sources import decode_image, decode_label, voc  # noqa: E402
from pipelines.sources import synthetic as synth  # noqa: E402


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


def held_worker(dataset_dir: str, rank: int, world: int, batch: int, barrier, out) -> None:
    """One of W processes: this rank's rows of the shards, held as the training loop holds
    them, then the loop's own loader for a warm-up pass and a timed pass."""
    torch.set_num_threads(1)
    from pipelines.config import from_dict
    from pipelines.shards import read_split_table
    from pipelines.train.sampling import RowSampler
    from pipelines.train.worker import TRAIN_COLUMNS, _sampled_batches

    table = read_split_table(dataset_dir, "train")
    mine = table.take(list(range(rank, table.num_rows, world)))
    cols = {c: mine[c].to_pylist() if c in mine.column_names else [None] * mine.num_rows
            for c in TRAIN_COLUMNS}
    cfg = from_dict({"dataset": "voc", "batch_size": batch, "sampling": "shuffle",
                     "workers": world})
    rows = RowSampler(cols, "shuffle", cfg.seed, batch, rank)
    steps = -(-rows.n // batch)  # one pass over this worker's rows
    it = _sampled_batches(rows, cfg, "cpu", 0)
    for _ in range(steps):  # warm-up
        next(it)
    barrier.wait()
    t0 = time.perf_counter()
    n = sum(next(it)[0].shape[0] for _ in range(steps))
    out.put((n, time.perf_counter() - t0))


def held_pass(dataset_dir: str, world: int, batch: int) -> tuple[int, float]:
    """(images, seconds) of W held-rows loaders running at once."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(world), ctx.Queue()
    procs = [ctx.Process(target=held_worker, args=(dataset_dir, r, world, batch, barrier, out))
             for r in range(world)]
    for p in procs:
        p.start()
    got = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return sum(n for n, _ in got), max(t for _, t in got)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500, help="generated images (default 500)")
    ap.add_argument("--size", default="375x500", help="HxW of the images (default 375x500)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                    help="loader workers on both sides (default: CPU count)")
    ap.add_argument("--batch", type=int, default=8, help="loader batch size (default 8)")
    ap.add_argument("--shard-rows", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3, help="ingest runs per engine (median)")
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

    def timed_ingest(engine: str, run: int) -> tuple[float, int]:
        out = work / f"{engine}_out{run}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        res = ingest(IngestConfig(dataset="voc", root=raw, out=out, splits=("train",),
                                  shard_rows=args.shard_rows, engine=engine),
                     log=lambda m: None)
        took = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        return took, res.rows["train"]

    times: dict[str, list[float]] = {"ray": [], "local": []}
    for run in range(args.runs):
        for engine in (("ray", "local") if run % 2 == 0 else ("local", "ray")):
            took, n = timed_ingest(engine, run)
            assert n == len(records), (engine, n)
            times[engine].append(took)
    t_ray, t_loop = statistics.median(times["ray"]), statistics.median(times["local"])
    r_ray, r_loop = len(records) / t_ray, len(records) / t_loop
    print(f"ingest (median of {args.runs}): Ray Data {r_ray:.1f} rows/s ({t_ray:.2f} s) | one "
          f"process {r_loop:.1f} rows/s ({t_loop:.2f} s) | ratio {r_ray / r_loop:.2f}  "
          f"[ray {', '.join(f'{t:.2f}' for t in times['ray'])}; local "
          f"{', '.join(f'{t:.2f}' for t in times['local'])} s]")

    # The loaders read the shards of one more ingest, kept.
    res = ingest(IngestConfig(dataset="voc", root=raw, out=work / "shards", splits=("train",),
                              shard_rows=args.shard_rows, engine="local"), log=lambda m: None)
    # Loaders: a warm-up pass (worker start-up, imports), then one timed pass each; same
    # batch size and worker count. Training runs many epochs: the steady state is what counts.
    paths = read_manifest(res.dataset_dir).shard_paths("train")
    ds = ray.data.read_parquet(paths, override_num_blocks=len(paths)).map_batches(
        training_batch, batch_size=args.batch, batch_format="numpy", num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=args.workers))
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
    n_held, t_held = held_pass(res.dataset_dir, args.workers, args.batch)
    l_held = n_held / t_held
    print(f"loader ({args.workers} workers each): held rows from shards {l_held:.1f} img/s "
          f"| Ray Data stream from shards {l_ray:.1f} img/s | DataLoader on raw files "
          f"{l_raw:.1f} img/s | ratio held {l_held / l_raw:.2f}, stream {l_ray / l_raw:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
