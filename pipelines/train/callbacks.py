"""Ray Train callbacks that run on the stage's controller (not on the workers)."""

from __future__ import annotations

from typing import Any

import ray.train

from pipelines import storage


class CheckpointLog(ray.train.UserCallback):
    """One line per checkpoint once Ray Train has registered it: from then on a lost worker
    or node resumes the stage there. (A worker's "step N" line says nothing of that: Ray
    Train takes a worker's report up to one poll interval, ~2 s, after the worker sent it.)"""

    def __init__(self, stage: str, like: str) -> None:
        self.stage, self.like = stage, like

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: ray.train.Checkpoint | None) -> None:
        if checkpoint is None or not metrics:
            return
        where = storage.location(checkpoint.filesystem, checkpoint.path, like=self.like)
        print(f"[{self.stage}] checkpoint at step {int(metrics[0].get('step', 0))}: {where}",
              flush=True)
