"""FCN-8s inference vs. torchvision's FCN-ResNet50, and Ray evaluation with 1 and 2 actors.

    python bench/bench_infer.py                  # 500x500, 5 timed images per net, 64 to evaluate
    python bench/bench_infer.py --threads 1 --iters 10
    python bench/bench_infer.py --quick          # smoke run: 128x128, 1 image per net, 8 images

1. forward images/s (eval, torch.no_grad, batch 1, + argmax to class ids) at --size^2 of
   FCN-8s (`fcn_core.fcn8s`) at width 1.0 (the real net) and 0.125 (the demo width) vs.
   torchvision's `fcn_resnet50(weights=None, weights_backbone=None, num_classes=21,
   aux_loss=False)` (random weights: nothing is downloaded), on the same random uint8 images,
   each preprocessed beforehand its own way (FCN: BGR minus the VOC mean; torchvision: RGB
   /255, ImageNet mean and std). Same process, same --threads. The nets take turns image by
   image, so a machine that changes speed affects all of them alike. Also prints each net's
   conv multiply-accumulates per image (`fcn_core.profile.total_macs`) and GMAC/s.
2. evaluation images/s of `pipelines.evaluate.evaluate` (Ray Data reads, scoring actors kept
   between calls: `pipelines.scorer_pool`; log_to_mlflow=False) on a generated, ingested VOC
   layout of --images val images of --size^2 in shards of --shard-rows rows, with actors=1
   and actors=2, and a plain loop in this process (`predict_row` per row, with the threads
   one actor gets; one over the median row's seconds). The model is FCN-8s at --eval-width
   saved as a training checkpoint. For each actor count, from no kept actors: a first call
   on a --small-image split (it starts the actors), the same call again, and a call on the
   val split, each timed whole (model loads, reads included). The first two differ by the
   actors' start-up; the last two give the steady rate and a call's fixed seconds. "Whole
   call" is the val call with the actors kept from an earlier call (a pipeline's second and
   later evaluations); "first call" adds the actors' start-up. An untimed evaluation comes
   first (worker imports, Parquet reader).

Ray is started (`pipelines.ray_env.init_ray`) before anything is timed: its start-up is not
in any number. Compare ratios from one run: absolute numbers vary with the machine's load.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fcn_core import fcn8s  # noqa: E402
from fcn_core.inference import InferenceOptions, predict_scores  # noqa: E402
from fcn_core.profile import total_macs  # noqa: E402
from fcn_core.transforms import MEAN_BGR, image_to_tensor  # noqa: E402
from pipelines import scorer_pool  # noqa: E402
from pipelines.evaluate import ROW_COLUMNS, actor_cpus, evaluate, predict_row  # noqa: E402
from pipelines.ingest import IngestConfig, ingest  # noqa: E402
from pipelines.registry import resolve_model  # noqa: E402
from pipelines.shards import read_manifest, read_split_table  # noqa: E402
from pipelines.sources import synthetic as synth  # noqa: E402
from pipelines.train import CHECKPOINT_FILE  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def quiet(msg: str) -> None:
    pass


def fmt(v: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def fcn_net(width: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = fcn8s(width=width)
    for name, m in model.named_modules():  # non-zero scores, as a trained net has
        if name.split(".")[-1].startswith("score_"):
            torch.nn.init.normal_(m.weight, std=0.01)
    return model.eval()


def torchvision_net() -> torch.nn.Module:
    from torchvision.models.segmentation import fcn_resnet50

    torch.manual_seed(0)
    return fcn_resnet50(weights=None, weights_backbone=None, num_classes=21,
                        aux_loss=False).eval()


def torchvision_input(rgb: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return ((x - mean) / torch.tensor(IMAGENET_STD).view(3, 1, 1))[None].contiguous()


def forward_rates(size: int, iters: int, channels_last: bool) -> list[dict]:
    """Images/s of each net, timed round-robin over the same images (one warm-up each)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(iters)]
    fcn_x = [image_to_tensor(im, MEAN_BGR["voc"])[None] for im in images]
    tv_x = [torchvision_input(im) for im in images]
    nets = [{"name": "FCN-8s", "width": "1.0", "net": fcn_net(1.0), "xs": fcn_x},
            {"name": "FCN-8s", "width": "0.125", "net": fcn_net(0.125), "xs": fcn_x},
            {"name": "torchvision fcn_resnet50", "width": "-", "net": torchvision_net(),
             "xs": tv_x}]
    for n in nets:
        n["gmac"] = total_macs(n["net"], n["xs"][0]) / 1e9
        if channels_last:
            n["net"] = n["net"].to(memory_format=torch.channels_last)
            n["xs"] = [x.contiguous(memory_format=torch.channels_last) for x in n["xs"]]

    def forward(n: dict, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if n["width"] == "-":
                return n["net"](x)["out"].argmax(1)
            return predict_scores(n["net"], x).argmax(1)

    for n in nets:
        out = forward(n, n["xs"][0])  # warm-up: allocations, oneDNN primitive selection
        assert out.shape == (1, size, size), out.shape
        n["seconds"] = 0.0
    for i in range(iters):
        for n in nets:
            t0 = time.perf_counter()
            forward(n, n["xs"][i])
            n["seconds"] += time.perf_counter() - t0
    for n in nets:
        n["ips"] = iters / n["seconds"]
        del n["net"], n["xs"]
    return nets


def save_checkpoint(folder: Path, width: float) -> Path:
    """An untrained FCN-8s in the training checkpoint format (as tests/test_registry.py)."""
    model = fcn_net(width)
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "arch": {"kind": "fcn", **model.config.to_dict()},
                "step": 0, "config": {"dataset": "voc", "input": "rgb"}},
               folder / CHECKPOINT_FILE)
    return folder


def plain_eval(ckpt: Path, data: Path, threads: int) -> float:
    """Images/s of the evaluation's per-row work in one loop in this process: one over the
    median row's seconds (the rows are all the same size), so a moment of other work on the
    machine does not move it as it moved one pass's total (0.55-0.87 of an actor's rate in
    three runs of one evening)."""
    torch.set_num_threads(threads)
    loaded = resolve_model(str(ckpt))
    rows = read_split_table(data, "val", list(ROW_COLUMNS)).to_pylist()
    predict_row(loaded, rows[0], InferenceOptions(), "cpu")  # warm-up
    seconds = []
    for row in rows:
        t0 = time.perf_counter()
        predict_row(loaded, row, InferenceOptions(), "cpu")
        seconds.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(seconds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=500, help="square image size (default 500)")
    ap.add_argument("--iters", type=int, default=5,
                    help="timed images per net in part 1, after one warm-up (default 5)")
    ap.add_argument("--images", type=int, default=64,
                    help="val images to evaluate in part 2 (default 64)")
    ap.add_argument("--eval-width", type=float, default=0.125,
                    help="FCN-8s width of the evaluated checkpoint (default 0.125)")
    ap.add_argument("--batch", type=int, default=4, help="evaluate's batch_size (default 4)")
    ap.add_argument("--shard-rows", type=int, default=16,
                    help="rows per Parquet shard at ingest (default 16; the ingest default "
                         "is 500); Ray Data may still read small shards as one block")
    ap.add_argument("--small", type=int, default=8,
                    help="images in the small split timed to separate fixed costs (default 8)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads for part 1 (default: CPU count)")
    ap.add_argument("--channels-last", action="store_true",
                    help="part 1: NHWC (channels_last) nets and inputs, for both sides")
    ap.add_argument("--skip-forward", action="store_true", help="only part 2")
    ap.add_argument("--skip-eval", action="store_true", help="only part 1")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 128x128, 1 timed image per net, 8 images to evaluate")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it")
    ap.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                    help="evaluate on this Ray cluster (its GCS address; the shards' folder must "
                         "be on every node) instead of a local Ray on this machine")
    args = ap.parse_args()
    if args.quick:
        args.size, args.iters, args.images, args.small, args.shard_rows = 128, 1, 8, 2, 2
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_infer_")).resolve()
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address
    else:
        os.environ.pop("RAY_ADDRESS", None)  # a local Ray: this measures one machine

    import ray

    from pipelines.ray_env import init_ray

    try:
        print(init_ray() + " (started before timing)")
        print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"ray {ray.__version__}; {args.size}x{args.size} images")
        rows_md = []
        if not args.skip_forward:
            torch.set_num_threads(args.threads)
            print(f"\n1. forward + argmax, batch 1, {args.iters} timed image(s) per net, "
                  f"{torch.get_num_threads()} thread(s), "
                  f"{'NHWC' if args.channels_last else 'NCHW'}")
            nets = forward_rates(args.size, args.iters, args.channels_last)
            tv = nets[-1]["ips"]
            print(f"  {'net':<26}{'width':>6}{'GMAC/img':>10}{'img/s':>9}{'GMAC/s':>9}"
                  f"{'vs tv':>7}")
            for n in nets:
                print(f"  {n['name']:<26}{n['width']:>6}{n['gmac']:>10.1f}{n['ips']:>9.3f}"
                      f"{n['gmac'] * n['ips']:>9.1f}{n['ips'] / tv:>7.2f}")
            rows_md.append("| net | width | GMAC/image | images/s | GMAC/s | ratio to "
                           "fcn_resnet50 |\n|---|---:|---:|---:|---:|---:|")
            rows_md += [f"| {n['name']} | {n['width']} | {n['gmac']:.1f} | {n['ips']:.3f} | "
                        f"{n['gmac'] * n['ips']:.1f} | {n['ips'] / tv:.2f} |" for n in nets]

        if not args.skip_eval:
            raw = synth.write_voc(work / "raw", n_train=args.small, n_val=args.images,
                                  size=(args.size, args.size), seed=0)
            data = ingest(IngestConfig(dataset="voc", root=raw, out=work / "shards",
                                       shard_rows=args.shard_rows), log=quiet).dataset_dir
            shards = len(read_manifest(data).shard_paths("val"))
            ckpt = save_checkpoint(work / "ckpt", args.eval_width)
            print(f"\n2. evaluate(): {args.images} val images of {args.size}x{args.size} in "
                  f"{shards} shard(s); FCN-8s width "
                  f"{args.eval_width}, batch_size {args.batch}, log_to_mlflow=False")

            def timed(split: str, actors: int) -> tuple[Any, float]:
                t0 = time.perf_counter()
                with warnings.catch_warnings():  # the small split may be one block: expected
                    if split == "train":
                        warnings.filterwarnings("ignore", "The minimum number of concurrent")
                    r = evaluate(str(ckpt), data, split, actors=actors, batch_size=args.batch,
                                 log_to_mlflow=False, log=quiet)
                return r, time.perf_counter() - t0

            timed("train", 1)  # warm-up, untimed: worker imports, Parquet reader
            res = {}
            for actors in (1, 2):
                scorer_pool.release()  # the first call below starts its actors
                _, t_first = timed("train", actors)
                _, t_small = timed("train", actors)  # the actors kept from the first call
                r, t_big = timed("val", actors)
                assert r.images == args.images, (r.images, args.images)
                # Steady rate from the difference of the two calls; n/a when the fixed
                # costs varied more than the extra images took (too few --images, or a
                # busy machine).
                extra = t_big - t_small
                marginal = (args.images - args.small) / extra if extra > 0.1 * t_big \
                    else float("nan")
                start = max(0.0, t_first - t_small)  # the actors' start-up
                res[actors] = {"hist": r.hist, "wall": args.images / t_big,
                               "first": args.images / (t_big + start), "start": start,
                               "steady": marginal, "fixed": t_big - args.images / marginal}
                cpus = actor_cpus(actors)
                print(f"  actors={actors} ({cpus:g} CPU's threads, {max(1, int(cpus))} each): "
                      f"{args.images / t_big:.2f} img/s over the whole call ({t_big:.1f} s, "
                      f"actors kept from an earlier call); {fmt(marginal)} img/s steady, "
                      f"{fmt(res[actors]['fixed'], 1)} s fixed; a first call also starts the "
                      f"actors: +{start:.1f} s ({res[actors]['first']:.2f} img/s)", flush=True)
            scorer_pool.release()
            assert np.array_equal(res[1]["hist"], res[2]["hist"]), "actors disagree"
            threads = max(1, int(actor_cpus(1)))
            plain = plain_eval(ckpt, data, threads)
            print(f"  plain loop in this process ({threads} thread(s)): {plain:.2f} img/s")
            r1, r2 = res[1], res[2]
            print(f"  ratio 2 actors / 1 actor: {r2['wall'] / r1['wall']:.2f} (whole call), "
                  f"{r2['first'] / r1['first']:.2f} (a first call, actors started), "
                  f"{fmt(r2['steady'] / r1['steady'])} (steady); 1 actor steady / plain loop: "
                  f"{fmt(r1['steady'] / plain)}")
            rows_md.append(f"\n| evaluation: {args.images} images of {args.size}^2, FCN-8s "
                           f"width {args.eval_width}, {shards} shard(s) | images/s (whole "
                           "call) | images/s (first call) | images/s (steady) | fixed s | "
                           "actors' start s | steady ratio to plain |\n"
                           "|---|---:|---:|---:|---:|---:|---:|")
            rows_md += [f"| plain loop, {threads} thread(s) | | | {plain:.2f} | | | 1.00 |"]
            rows_md += [f"| evaluate, {a} actor(s) | {r['wall']:.2f} | {r['first']:.2f} | "
                        f"{fmt(r['steady'])} | {fmt(r['fixed'], 1)} | {r['start']:.1f} | "
                        f"{fmt(r['steady'] / plain)} |" for a, r in res.items()]
            rows_md += [f"| 2 actors / 1 actor | {r2['wall'] / r1['wall']:.2f} | "
                        f"{r2['first'] / r1['first']:.2f} | {fmt(r2['steady'] / r1['steady'])} "
                        "| | | |"]
        print("\n" + "\n".join(rows_md))
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
