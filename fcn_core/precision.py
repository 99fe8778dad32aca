"""Devices, mixed precision and compilation for training and inference, on CPU or CUDA.

``amp`` is one of ``off`` (fp32), ``bf16`` (autocast to bfloat16: no loss scaling needed; CPUs
with avx512_bf16/AMX and Ampere+ GPUs run it natively), ``fp16`` (autocast to float16 with a
``GradScaler``; CUDA only) or ``auto`` (bf16 where the device runs it natively, else off).
Weights, optimizer state and checkpoints stay fp32 in every mode.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

AMP = ("off", "bf16", "fp16", "auto")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 natively: a CUDA device with bf16 tensor cores, or a CPU
    with avx512_bf16 / AMX (oneDNN's check). Elsewhere bf16 is emulated, and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        if torch.version.hip:  # every ROCm GPU torch supports
            return True
        # Compute capability 8 (Ampere) and later. Not torch.cuda.is_bf16_supported(): by
        # default it counts emulation, and says True on a V100 or T4.
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.cuda.get_device_properties(index).major >= 8
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_amp(amp: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` where the device runs it natively, else ``off``; others as given."""
    return ("bf16" if native_bf16(device) else "off") if amp == "auto" else amp


def resolve_channels_last(setting: bool | str, device: torch.device | str, amp: str) -> bool:
    """``auto`` -> NHWC on a GPU and under bf16/fp16 autocast (the fast layout of cuDNN and
    oneDNN's bf16 kernels), NCHW for fp32 on a CPU: FCN-8s at full width trained 1.3-1.5x
    faster in NCHW there on an AVX2 CPU, about as fast on an avx512 one
    (``bench/bench_model.py``). ``amp`` is the resolved one (``resolve_amp``); a bool as
    given."""
    if setting != "auto":
        return bool(setting)
    return torch.device(device).type != "cpu" or amp in ("bf16", "fp16")


def channels_last_note(asked: bool | str, device: torch.device | str, amp: str) -> str | None:
    """What a run's log says about ``channels_last: auto``'s choice; None for true/false."""
    if asked != "auto":
        return None
    on = resolve_channels_last(asked, device, amp)
    why = ("on a GPU" if torch.device(device).type != "cpu" else f"{amp} autocast" if on
           else "fp32 on a CPU")
    return f"channels_last auto: {'NHWC' if on else 'NCHW'} ({why})"


def amp_note(asked: str, amp: str, device: torch.device | str) -> str | None:
    """What a run's log says about its precision, or None: ``auto``'s choice, and a warning
    where bf16 is asked for on a CPU that only emulates it (an AVX2 CPU: bf16 matmuls ~100x
    slower than fp32 here; ``bench/bench_model.py`` measures it)."""
    device = torch.device(device)
    if asked == "auto":
        why = ("" if device.type != "cpu" else " (native bf16: avx512_bf16/AMX)" if amp == "bf16"
               else " (no native bf16 on this CPU: no avx512_bf16/AMX)")
        return f"amp auto: {amp} on {device.type}{why}"
    if amp == "bf16" and device.type == "cpu" and not native_bf16(device):
        return ("warning: amp bf16 on a CPU without avx512_bf16/AMX: bf16 is emulated here, "
                "many times slower than fp32; amp: auto (or off) trains in fp32 on it")
    return None


def pick_device(use_gpu: bool) -> torch.device:
    """``cuda`` (this process's current CUDA device) when asked for and present, else ``cpu``;
    asked for a GPU where none is visible, a RuntimeError rather than a silent CPU run."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("a GPU was requested but torch sees no CUDA device here "
                           "(CUDA_VISIBLE_DEVICES, the driver, or a CPU-only torch build)")
    return torch.device("cuda", torch.cuda.current_device())


def check_amp(amp: str, device: torch.device | str) -> None:
    if amp not in AMP or amp == "auto":
        raise ValueError(f"amp must be one of off, bf16, fp16 (auto resolved with "
                         f"resolve_amp), not {amp!r}")
    if amp == "fp16" and torch.device(device).type != "cuda":
        raise ValueError("amp fp16 needs a CUDA device (a GradScaler and fp16 kernels): "
                         "use amp bf16 on CPUs")


def autocast(amp: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """The forward pass's autocast context (a no-op for ``off``). Losses autocast computes in
    fp32 (cross entropy, log-softmax) stay fp32, as torch's autocast lists say."""
    check_amp(amp, device)
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[amp])


def grad_scaler(amp: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (gradients underflow in fp16 without one); None otherwise."""
    check_amp(amp, device)
    return torch.amp.GradScaler(torch.device(device).type) if amp == "fp16" else None


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler | None) -> None:
    """``loss.backward(); optimizer.step()``, through the scaler when there is one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def maybe_compile(model: nn.Module, enabled: bool, log: Callable[[str], None] = print
                  ) -> nn.Module:
    """``torch.compile(model)`` when enabled. Where compilation fails (no C++ compiler, an
    unsupported op or platform), the model runs eagerly and a warning says so: compile is a
    speed option, never a reason for a run to fail."""
    if not enabled:
        return model
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # a graph that fails falls back to eager
        return torch.compile(model)
    except Exception as e:  # noqa: BLE001 - any failure to set up compile means: run eagerly
        log(f"warning: torch.compile is not available here ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); running the model eagerly")
        warnings.warn(f"torch.compile failed: {e}", RuntimeWarning, stacklevel=2)
        return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain net under torch.compile's ``_orig_mod`` and DDP's ``module`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or (
                hasattr(model, "module") and isinstance(model.module, nn.Module)):
            model = model.module
        else:
            return model


def portable(value: Any) -> Any:
    """``value`` with every tensor on the CPU in the default (contiguous) layout: what a
    checkpoint holds, so a GPU- or channels_last-trained checkpoint loads anywhere."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").contiguous()
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable(v) for v in value)
    return value


@contextlib.contextmanager
def inference_mode(amp: str, device: torch.device | str) -> Iterator[None]:
    """no_grad + autocast for an evaluation or prediction pass."""
    with torch.no_grad(), autocast(amp, device):
        yield
