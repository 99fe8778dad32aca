"""FCN-8s training and inference throughput per precision mode, against this device's own dense
matmul rate and torchvision's fcn_resnet50, measured in one run.

    python bench/bench_model.py                                 # CPU: width 1.0 at 256^2
    python bench/bench_model.py --device cuda                   # GPU: 500^2, batch 1 and 8
    python bench/bench_model.py --device cuda --modes bf16-cl,bf16-cl-compile --batches 8

Needs only torch and this repository's fcn_core (torchvision for the fcn_resnet50 row, skipped
without it), so it runs on a bare GPU machine. Modes: fp32 (NCHW), fp32-cl (channels_last),
bf16 (autocast), bf16-cl, bf16-cl-compile (+ torch.compile); fp16-cl on CUDA.

FLOPs are counted as the step really runs them (``fcn_core.profile.train_flops``: no weight
gradient for the frozen final upscore, no input gradient for conv1_1) and cross-checked with
``torch.utils.flop_counter``. Each figure is the median of ``--iters`` timed steps after
warm-up, never the best. ``ratio`` = achieved / dense matmul of the same dtype, same run;
``of peak`` = achieved / the device's bf16 dense peak (GPUs in PEAK_TFLOPS, or --peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fcn_core import fcn8s, segmentation_loss  # noqa: E402
from fcn_core.precision import native_bf16  # noqa: E402
from fcn_core.profile import total_macs, train_flops  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fp32", "fp32-cl", "bf16", "bf16-cl", "bf16-cl-compile", "fp16-cl")
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0,
               "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, iters: int
                   ) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(device: torch.device, dtype: torch.dtype, cap: int, iters: int
                  ) -> tuple[float, int]:
    """Dense n x n matmul rate (TFLOP/s, median) and the n used: n doubles from 256 up to
    ``cap`` while one product takes under 50 ms, so a dtype that this device only emulates
    (bf16 on a CPU without avx512_bf16/AMX: ~100x slower) is timed in seconds, not minutes."""
    def product(n: int) -> Callable[[], torch.Tensor]:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        return lambda: a @ b

    n = 256
    while n < cap and median_seconds(product(n), device, 1, 1) < 0.05:
        n *= 2
    return 2 * n**3 / median_seconds(product(n), device, 2, iters) / 1e12, n


def mode_dtype(mode: str) -> str:
    """The dtype a mode computes in: fp32, bf16 or fp16."""
    return mode.split("-")[0]


def parse_mode(mode: str) -> tuple[torch.dtype, bool, bool]:
    """(autocast dtype, channels_last, compile)."""
    parts = mode.split("-")
    dtype = DTYPES[parts[0]]
    return dtype, "cl" in parts, "compile" in parts


def prepare(model: torch.nn.Module, x: torch.Tensor, mode: str
            ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.dtype]:
    dtype, channels_last, compiled = parse_mode(mode)
    if channels_last:  # NHWC: oneDNN's and cuDNN's preferred convolution layout
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    return net, x, dtype


def train_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str,
               warmup: int, iters: int) -> float:
    """Seconds per forward + backward + SGD step (median)."""
    net, x, dtype = prepare(model, x, mode)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-10,
                          momentum=0.99)
    scaler = torch.amp.GradScaler(x.device.type) if dtype == torch.float16 else None
    model.train()

    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = segmentation_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    return median_seconds(step, x.device, warmup, iters)


def infer_rate(model: torch.nn.Module, x: torch.Tensor, mode: str, warmup: int, iters: int
               ) -> float:
    net, x, dtype = prepare(model, x, mode)
    model.eval()

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype,
                                                    enabled=dtype != torch.float32):
            out = net(x)
            (out["out"] if isinstance(out, dict) else out).argmax(1)

    return median_seconds(forward, x.device, warmup, iters)


def fcn8s_for_bench(width: float, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = fcn8s(width=width).to(device)
    for name, m in model.named_modules():  # non-zero scores: every path does real work
        if name.split(".")[-1].startswith("score_"):
            torch.nn.init.normal_(m.weight, std=0.01)
    return model


def peak_for(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--modes", default=None,
                    help=f"comma-separated, of {', '.join(MODES)} (default: cpu fp32,fp32-cl,"
                         "bf16-cl, without bf16-cl where bf16 is emulated; cuda fp32,bf16,"
                         "bf16-cl,bf16-cl-compile)")
    ap.add_argument("--width", type=float, default=1.0, help="VGG16 width multiplier (1.0)")
    ap.add_argument("--size", type=int, default=0, help="square input (cpu 256, cuda 500)")
    ap.add_argument("--batches", default=None, help="comma-separated (cpu 1, cuda 1,8)")
    ap.add_argument("--iters", type=int, default=5, help="timed steps per row (median; 5)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps (cpu 1, cuda 5)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's bf16 dense peak, if not in the built-in table")
    ap.add_argument("--no-reference", action="store_true", help="skip fcn_resnet50")
    ap.add_argument("--save", action="store_true", help="append the results to bench/results/")
    args = ap.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    modes = (args.modes or ("fp32,bf16,bf16-cl,bf16-cl-compile" if gpu
                            else "fp32,fp32-cl,bf16-cl" if native_bf16(device)
                            else "fp32,fp32-cl")).split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {', '.join(bad)}: choose from {', '.join(MODES)}")
    size = args.size or (500 if gpu else 256)
    batches = [int(b) for b in (args.batches or ("1,8" if gpu else "1")).split(",")]
    warmup = args.warmup or (5 if gpu else 1)
    name = torch.cuda.get_device_name(device) if gpu else (platform.processor()
                                                            or platform.machine())
    peak = peak_for(device, args.peak_tflops)
    # fcn_resnet50's row runs in the fastest layout and dtype of the FCN rows
    reference_mode = next((m for m in ("bf16-cl", "fp32-cl") if m in modes), modes[0])
    print(f"device {device} ({name}), torch {torch.__version__}, "
          f"{'' if gpu else f'{torch.get_num_threads()} threads, '}FCN-8s width {args.width}, "
          f"{size}x{size}, median of {args.iters} steps after {warmup} warm-up")
    # The matmul rate of each dtype the modes (and the reference row) run in, in this run.
    dtypes = {mode_dtype(m) for m in modes + ([] if args.no_reference else [reference_mode])}
    mm, sizes = {}, {}
    for d in ("fp32", "bf16", "fp16"):
        if d in dtypes:
            mm[d], sizes[d] = matmul_tflops(device, DTYPES[d], 8192 if gpu else 2048,
                                            args.iters)
    print("dense matmul: " + ", ".join(f"{d} {mm[d]:.3g} TFLOP/s" + (
        f" (n={sizes[d]})" if sizes[d] != (8192 if gpu else 2048) else "") for d in mm)
          + (f"; bf16 peak {peak:.0f} TFLOP/s" if peak else ""))
    if "bf16" in dtypes and not native_bf16(device):
        print("note: this device has no native bf16 (a CPU without avx512_bf16/AMX, or a GPU "
              "before Ampere): bf16 is emulated and slower than fp32 here; `amp: auto` trains "
              "in fp32 on it")

    probe = fcn8s_for_bench(args.width, device)
    x1 = torch.randn(1, 3, size, size, device=device) * 50
    honest = train_flops(probe.train(), x1)
    naive = 6 * total_macs(probe.eval(), x1)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        segmentation_loss(probe.train()(x1), torch.zeros(1, size, size, dtype=torch.long,
                                                         device=device)).backward()
    print(f"FLOPs per image: train {honest.total / 1e9:.1f} G (forward "
          f"{honest.forward / 1e9:.1f}, input grads {honest.input_grad / 1e9:.1f}, weight "
          f"grads {honest.weight_grad / 1e9:.1f}); torch flop_counter "
          f"{fc.get_total_flops() / 1e9:.1f} G; '3 x forward' would say {naive / 1e9:.1f} G")
    del probe

    rows = []
    head = (f"{'net':<13} {'mode':<16} {'batch':>5} {'train img/s':>11} {'TFLOP/s':>8} "
            f"{'ratio':>6} {'infer img/s':>11} {'TFLOP/s':>8} {'ratio':>6}"
            + (f" {'of peak':>7}" if peak else ""))
    print(head)
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device=device) * 50
        y = torch.randint(0, 21, (batch, size, size), device=device)
        for mode in modes:
            ref = mm[mode_dtype(mode)]
            t_train = train_rate(fcn8s_for_bench(args.width, device), x, y, mode, warmup,
                                 args.iters)
            t_inf = infer_rate(fcn8s_for_bench(args.width, device), x, mode, warmup,
                               args.iters)
            tr = honest.total * batch / t_train / 1e12
            inf = honest.forward * batch / t_inf / 1e12
            row = {"net": "fcn8s", "mode": mode, "batch": batch, "size": size,
                   "width": args.width, "train_images_per_s": batch / t_train,
                   "train_tflops": tr, "infer_images_per_s": batch / t_inf,
                   "infer_tflops": inf, "train_ratio": tr / ref, "infer_ratio": inf / ref}
            rows.append(row)
            print(f"{'fcn8s':<13} {mode:<16} {batch:>5} {batch / t_train:>11.2f} {tr:>8.2f} "
                  f"{tr / ref:>6.2f} {batch / t_inf:>11.2f} {inf:>8.2f} {inf / ref:>6.2f}"
                  + (f" {max(tr, inf) / peak:>7.1%}" if peak else ""), flush=True)
        if not args.no_reference:
            try:
                from torchvision.models.segmentation import fcn_resnet50
            except ImportError:
                print("fcn_resnet50: torchvision is not installed here; reference skipped")
                continue
            net = fcn_resnet50(weights=None, weights_backbone=None, aux_loss=False).to(device)
            macs = total_macs(net.eval(), x[:1])
            mode = reference_mode
            t_inf = infer_rate(net, x, mode, warmup, args.iters)
            inf = 2 * macs * batch / t_inf / 1e12
            ref = mm[mode_dtype(mode)]
            rows.append({"net": "fcn_resnet50", "mode": mode, "batch": batch, "size": size,
                         "infer_images_per_s": batch / t_inf, "infer_tflops": inf,
                         "infer_ratio": inf / ref})
            print(f"{'fcn_resnet50':<13} {mode:<16} {batch:>5} {'':>11} {'':>8} {'':>6} "
                  f"{batch / t_inf:>11.2f} {inf:>8.2f} {inf / ref:>6.2f}", flush=True)
    if args.save:
        out = Path(__file__).resolve().parent / "results"
        out.mkdir(exist_ok=True)
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": str(device),
                  "device_name": name, "torch": torch.__version__, "matmul_tflops": mm,
                  "peak_tflops": peak, "iters": args.iters, "rows": rows,
                  "flops_per_image": {"train": honest.total, "forward": honest.forward,
                                      "naive_3x": naive}}
        with open(out / f"model-{device.type}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
