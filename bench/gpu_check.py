"""A tiny FCN-8s trained a few steps and evaluated on the CPU and on a second device from the
same weights and data: the metrics must agree within float tolerance (issue 12's GPU check).

    python bench/gpu_check.py --device cuda        # on the device machine (torch + fcn_core)

Prints the four metrics on each device and the largest difference; exits 1 when the mean IU
differs by more than --tol or a loss by more than 1e-3 relative. Also saves the device-trained
checkpoint's state and reloads it on the CPU (checkpoints are device-free).
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fcn_core import ConfusionMatrix, fcn8s, segmentation_loss  # noqa: E402
from fcn_core.precision import autocast, portable  # noqa: E402


def run(model: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor, device: torch.device,
        steps: int, amp: str) -> tuple[list[float], dict[str, float], torch.nn.Module]:
    model = copy.deepcopy(model).to(device)
    for m in model.modules():  # drop6/drop7 masks come from each device's own RNG
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                          momentum=0.9)
    losses = []
    model.train()
    for i in range(steps):
        x, y = xs[i % len(xs)][None].to(device), ys[i % len(ys)][None].to(device)
        with autocast(amp, device):
            loss = segmentation_loss(model(x), y, normalize=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    cm = ConfusionMatrix(21)
    model.eval()
    with torch.no_grad(), autocast(amp, device):
        for x, y in zip(xs, ys, strict=True):
            cm.update(y[None], model(x[None].to(device)).argmax(1).cpu())
    scores = {k: float(v) for k, v in cm.scores().items() if k != "per_class_iu"}
    return losses, scores, model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="the device to compare with the CPU")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--amp", default="off", choices=["off", "bf16"])
    ap.add_argument("--tol", type=float, default=0.02, help="largest mean IU difference")
    args = ap.parse_args()
    torch.manual_seed(0)
    net = fcn8s(width=1 / 8)
    for name, m in net.named_modules():  # non-zero scores: the steps do real work
        if name.split(".")[-1].startswith("score_"):
            torch.nn.init.normal_(m.weight, std=0.01)
    xs = torch.randn(4, 3, 64, 64) * 50
    ys = torch.randint(0, 21, (4, 64, 64))
    ys[:, :32] = 0  # a learnable structure: the top half is background
    device = torch.device(args.device)
    if device.type == "cuda":  # same arithmetic as the CPU: no TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cpu_l, cpu_s, _ = run(net, xs, ys, torch.device("cpu"), args.steps, args.amp)
    dev_l, dev_s, dev_net = run(net, xs, ys, device, args.steps, args.amp)
    print(f"{'':<10} " + " ".join(f"{k:>14}" for k in cpu_s))
    for name, s in (("cpu", cpu_s), (str(device), dev_s)):
        print(f"{name:<10} " + " ".join(f"{v:>14.6f}" for v in s.values()))
    loss_diff = max(abs(a - b) / max(abs(a), 1e-9) for a, b in zip(cpu_l, dev_l, strict=True))
    iu_diff = abs(cpu_s["mean_iu"] - dev_s["mean_iu"])
    print(f"losses: largest relative difference {loss_diff:.2e} over {args.steps} steps; "
          f"mean IU difference {iu_diff:.2e}")
    buf = io.BytesIO()
    torch.save(portable(dev_net.state_dict()), buf)
    back = fcn8s(width=1 / 8)
    back.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), map_location="cpu",
                                    weights_only=True))
    print("device-trained checkpoint reloaded on the CPU: ok")
    ok = iu_diff <= args.tol and (args.amp != "off" or loss_diff <= 1e-3)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
