"""Staged FCN training with Ray Train: one TorchTrainer for consecutive stages, 32s -> 16s -> 8s.

- ``step``: plain torch (build a stage's net, one step, validation); knows nothing of Ray.
- ``checkpoint``: tensors + JSON, no pickle (``torch.load(weights_only=True)`` reads them).
- ``worker``: every Ray Train call, in the loop each worker runs.
- ``driver``: one TorchTrainer per chain of stages and the MLflow runs (the public entry
  points).

The names below are imported on first use (PEP 562): Ray Train's controller unpickles
``callbacks.CheckpointLog``, and importing this package must not make it import torch and the
model zoo (~1.5 s of CPU in the controller before it starts the workers).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "checkpoint": ("CHECKPOINT_FILE", "checkpoint_file", "load_model", "read_checkpoint",
                   "write_checkpoint"),
    "driver": ("PipelineRun", "StageFailed", "finish_pipeline_run", "new_run_id", "run_stage",
               "start_pipeline_run", "train_pipeline", "train_stages"),
    "step": ("build_stage_model", "make_optimizer", "replicas_in_sync", "set_lr", "train_step",
             "validate"),
    "worker": ("train_loop_per_worker",),
}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE)


def __getattr__(name: str) -> Any:
    module = _MODULE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE))
