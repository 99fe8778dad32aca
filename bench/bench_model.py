"""FCN-8s forward+backward throughput vs. this machine's own matmul rate, measured in one run.

    python bench/bench_model.py                      # CPU, widths 1.0 and 0.25, 256^2 and 500^2
    python bench/bench_model.py --device cuda --dtype bf16 --batch 8

Prints images/s, achieved GFLOP/s (forward+backward counted as 3x the forward's 2*MAC) and
the ratio achieved / dense-matmul GFLOP/s from the same run (goal on CPU: >= 0.5). Appends
the table as JSON to bench/results/ when --save is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fcn_core import fcn8s, segmentation_loss  # noqa: E402
from fcn_core.profile import total_macs  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if reps % 4 == 0:
            sync(device)
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def train_step_rate(width: float, size: int, batch: int, iters: int, device: torch.device,
                    dtype: torch.dtype, channels_last: bool) -> tuple[float, float]:
    """(images/s, GFLOP/s) of forward + backward + SGD step on FCN-8s at this size."""
    torch.manual_seed(0)
    model = fcn8s(width=width).to(device)
    for name, m in model.named_modules():  # non-zero scores so every path does real work
        if name.split(".")[-1].startswith("score_"):
            torch.nn.init.normal_(m.weight, std=0.01)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-10,
                          momentum=0.99)
    x = torch.randn(batch, 3, size, size, device=device) * 50
    y = torch.randint(0, 21, (batch, size, size), device=device)
    macs = total_macs(model.eval(), x[:1].float()) * batch
    if channels_last:  # NHWC: oneDNN / cuDNN's preferred layout for convolutions
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            loss = segmentation_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocations, kernel selection
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / iters
    return batch / dt, 3 * 2 * macs / dt / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="autocast dtype for the model, and the matmul's dtype (default fp32)")
    ap.add_argument("--widths", default="1.0,0.25", help="comma-separated width multipliers")
    ap.add_argument("--sizes", default="256,500", help="comma-separated square input sizes")
    ap.add_argument("--batch", type=int, default=1, help="images per step (default 1)")
    ap.add_argument("--iters", type=int, default=0,
                    help="timed steps per configuration (default: 2 on CPU, 10 on GPU)")
    ap.add_argument("--layouts", default="nchw,nhwc",
                    help="memory layouts to time: nchw (contiguous), nhwc (channels_last)")
    ap.add_argument("--save", action="store_true", help="append the results to bench/results/")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    else:
        torch.backends.cudnn.benchmark = True
    dtype = DTYPES[args.dtype]
    iters = args.iters or (2 if device.type == "cpu" else 10)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device {device} ({name or platform.machine()}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, dtype {args.dtype}, batch {args.batch}, {iters} steps")

    mm = matmul_gflops(device, dtype, 2048 if device.type == "cpu" else 8192, 3.0)
    print(f"dense matmul: {mm:,.1f} GFLOP/s")
    rows = []
    print(f"{'width':>6} {'size':>5} {'layout':>6} {'img/s':>9} {'GFLOP/s':>10} {'ratio':>7}")
    for width in (float(w) for w in args.widths.split(",")):
        for size in (int(s) for s in args.sizes.split(",")):
            for layout in args.layouts.split(","):
                ips, gf = train_step_rate(width, size, args.batch, iters, device, dtype,
                                          channels_last=layout == "nhwc")
                rows.append({"width": width, "size": size, "layout": layout,
                             "images_per_s": ips, "gflops": gf, "ratio_to_matmul": gf / mm})
                print(f"{width:>6} {size:>5} {layout:>6} {ips:>9.3f} {gf:>10.1f} "
                      f"{gf / mm:>7.2f}", flush=True)
    # Re-measure matmul at the end: a ratio is only fair if the machine did not change speed.
    mm_end = matmul_gflops(device, dtype, 2048 if device.type == "cpu" else 8192, 3.0)
    print(f"dense matmul again: {mm_end:,.1f} GFLOP/s (drift {100 * (mm_end / mm - 1):+.0f}%)")
    if args.save:
        out = Path(__file__).resolve().parent / "results"
        out.mkdir(exist_ok=True)
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": str(device),
                  "device_name": name, "dtype": args.dtype, "batch": args.batch,
                  "matmul_gflops": [mm, mm_end], "rows": rows}
        with open(out / f"model-{device.type}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
