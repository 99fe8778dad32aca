"""Checkpoint I/O: tensors plus JSON metadata, at any location, never pickle.

A stage's checkpoint folder holds one file, ``checkpoint.pt``: ``torch.save`` of
``{"format", "model" (state dict), "optimizer" (training only), "arch", "config", "step",
"stage"}`` where everything but the tensors is plain JSON (checked when written), so
``torch.load(weights_only=True)`` reads it and a crafted file cannot run code. Files of the
older layout (the same keys, no ``format``) load the same way. Locations go through
``pipelines.storage`` (a local path or a URI such as ``s3://bucket/run/checkpoint``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcn_core.fcn import LateFusion
from fcn_core.precision import portable, unwrap
from fcn_core.serving import CHECKPOINT_FORMAT, load_checkpoint, net_from_checkpoint
from pipelines import storage
from pipelines.errors import UserError

CHECKPOINT_FILE = "checkpoint.pt"
Location = str | os.PathLike[str]


class CheckpointError(UserError, FileNotFoundError):
    """No checkpoint, or not a readable pickle-free FCN checkpoint, at a location; one line
    naming it (a FileNotFoundError, as callers of the older reader expect)."""


@dataclass(frozen=True)
class Checkpoint:
    location: str  # the checkpoint.pt itself
    state: dict[str, Any]  # as read_checkpoint returns it
    sha256: str  # of the file's bytes: the registry keys model versions by it


def model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict without DDP's ``module.`` or torch.compile's ``_orig_mod.`` prefix, with
    every tensor on the CPU and contiguous, how to rebuild the net)."""
    net = unwrap(model)
    kind = "late_fusion" if isinstance(net, LateFusion) else "fcn"
    return portable(net.state_dict()), {"kind": kind, **net.config.to_dict()}


def as_json(value: Any, what: str) -> Any:
    """``value`` as JSON gives it back (tuples become lists). A value JSON cannot hold is a
    TypeError now, when the checkpoint is written, not when someone loads it."""
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint {what} must be plain JSON values: {e}") from None


_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def check_weights_only(value: Any, where: str = "optimizer") -> None:
    """Raise TypeError (naming the entry) unless ``value`` holds only tensors and plain
    values in dicts, lists and tuples: what ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint {where}: key {k!r} is a {type(k).__name__}")
            check_weights_only(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_weights_only(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"checkpoint {where} is a {type(value).__name__}: only tensors and "
                        "plain values can be loaded without pickle")


def _encode(weights: dict[str, torch.Tensor], arch: dict[str, Any], *,
            optimizer: dict[str, Any] | None, step: int, stage: str,
            config: dict[str, Any] | None, mean_bgr: tuple[float, float, float] | None
            ) -> bytes:
    state: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "model": weights,
                             "arch": as_json(arch, "arch"),
                             "config": as_json(config or {}, "config"),
                             "step": int(step), "stage": str(stage)}
    check_weights_only(weights, "model")
    if optimizer is not None:
        check_weights_only(optimizer, "optimizer")
        state["optimizer"] = optimizer
    if mean_bgr is not None:
        state["mean_bgr"] = [float(v) for v in mean_bgr]
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def checkpoint_bytes(model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None,
                     step: int = 0, stage: str = "", config: dict[str, Any] | None = None,
                     mean_bgr: tuple[float, float, float] | None = None) -> bytes:
    """The bytes of ``checkpoint.pt`` for ``model`` (and the optimizer's state, to resume).
    ``mean_bgr`` records the input mean in the file itself (serving checkpoints)."""
    weights, arch = model_state(model)
    return _encode(weights, arch,
                   optimizer=portable(optimizer.state_dict()) if optimizer else None,
                   step=step, stage=stage, config=config, mean_bgr=mean_bgr)


def write_checkpoint(location: Location, model: nn.Module, **kwargs: Any) -> str:
    """Write ``checkpoint_bytes(model, **kwargs)`` to ``location`` (a file: a folder's
    ``checkpoint.pt``); readers see the old file or the new one. Returns the location."""
    loc = storage.as_location(location)
    storage.write_bytes(loc, checkpoint_bytes(model, **kwargs))
    return loc


def checkpoint_file(checkpoint: Location) -> str:
    """The checkpoint.pt of a checkpoint directory (or the file itself): a location."""
    loc = storage.as_location(checkpoint)
    return storage.join(loc, CHECKPOINT_FILE) if storage.is_dir(loc) else loc


def _read(checkpoint: Location) -> tuple[str, bytes]:
    path = checkpoint_file(checkpoint)
    try:
        return path, storage.read_bytes(path)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {storage.redact(path)}") from None


def _decode(path: str, data: bytes) -> dict[str, Any]:
    where = storage.redact(path)
    try:
        return load_checkpoint(data)
    except ValueError as e:
        raise CheckpointError(f"{where} is {e}") from None
    except (RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where} is not a readable checkpoint ({first})") from None
    except Exception as e:  # pickle's UnpicklingError: what weights_only refuses to run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where} is not a pickle-free checkpoint, refused to load "
                              f"it ({type(e).__name__}: {first[:200]})") from None


def read_checkpoint(checkpoint: Location) -> dict[str, Any]:
    """The saved dict of a checkpoint directory (or its checkpoint.pt), local or in a
    bucket; CheckpointError when there is none or it is not a pickle-free checkpoint."""
    return _decode(*_read(checkpoint))


def open_checkpoint(checkpoint: Location) -> Checkpoint:
    """``read_checkpoint`` plus where the file is and the sha256 of its bytes (one read)."""
    path, data = _read(checkpoint)
    return Checkpoint(path, _decode(path, data), hashlib.sha256(data).hexdigest())


def checkpoint_digest(checkpoint: Location) -> str:
    """sha256 of the checkpoint file's bytes: the same file gives the same digest anywhere."""
    return hashlib.sha256(_read(checkpoint)[1]).hexdigest()


def load_model(checkpoint: Location) -> nn.Module:
    """Rebuild a net from a checkpoint directory (or its checkpoint.pt)."""
    return net_from_checkpoint(read_checkpoint(checkpoint))


def serving_checkpoint(state: dict[str, Any], mean_bgr: tuple[float, float, float]) -> bytes:
    """A slim copy of a training checkpoint for a registered model: weights, arch, config
    and the input mean, without the optimizer state (half the bytes of an SGD checkpoint)."""
    return _encode(state["model"], state["arch"], optimizer=None,
                   step=int(state.get("step", 0)), stage=str(state.get("stage", "")),
                   config=dict(state.get("config") or {}), mean_bgr=mean_bgr)


def write_serving_checkpoint(state: dict[str, Any], mean_bgr: tuple[float, float, float],
                             folder: str | Path) -> str:
    """``serving_checkpoint`` written to ``folder``/checkpoint.pt (a local folder: MLflow
    logs artifacts from local files). Returns the file's path."""
    path = os.path.join(str(folder), CHECKPOINT_FILE)
    storage.write_bytes(path, serving_checkpoint(state, mean_bgr))
    return path
