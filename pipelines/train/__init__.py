"""Staged FCN training with Ray Train: one TorchTrainer for consecutive stages, 32s -> 16s -> 8s.

- ``step``: plain torch (build a stage's net, one step, validation); knows nothing of Ray.
- ``checkpoint``: tensors + JSON, no pickle (``torch.load(weights_only=True)`` reads them).
- ``worker``: every Ray Train call, in the loop each worker runs.
- ``driver``: one TorchTrainer per chain of stages and the MLflow runs (the public entry
  points).
"""

from pipelines.train.checkpoint import (
    CHECKPOINT_FILE,
    checkpoint_file,
    load_model,
    read_checkpoint,
    write_checkpoint,
)
from pipelines.train.driver import (
    PipelineRun,
    StageFailed,
    finish_pipeline_run,
    new_run_id,
    run_stage,
    start_pipeline_run,
    train_pipeline,
    train_stages,
)
from pipelines.train.step import (
    build_stage_model,
    make_optimizer,
    replicas_in_sync,
    set_lr,
    train_step,
    validate,
)
from pipelines.train.worker import train_loop_per_worker

__all__ = [
    "CHECKPOINT_FILE", "PipelineRun", "StageFailed", "build_stage_model", "checkpoint_file",
    "finish_pipeline_run", "load_model", "make_optimizer", "new_run_id", "read_checkpoint",
    "replicas_in_sync", "run_stage", "set_lr", "start_pipeline_run", "train_loop_per_worker",
    "train_pipeline", "train_stages", "train_step", "validate", "write_checkpoint",
]
