"""Ray Train callbacks that run on the stage's controller (not on the workers)."""

from __future__ import annotations

from typing import Any

import ray.train

from pipelines import storage


class CheckpointLog(ray.train.UserCallback):
    """One line per checkpoint once Ray Train has registered it: from then on a lost worker
    or node resumes the stage there. (A worker's "step N" line says nothing of that: Ray
    Train takes a worker's report up to one poll interval, ~2 s, after the worker sent it.)"""

    def __init__(self, like: str) -> None:
        self.like = like  # how the run's storage is spelled (a path, or s3://...)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: ray.train.Checkpoint | None) -> None:
        if checkpoint is None or not metrics:
            return
        where = storage.location(checkpoint.filesystem, checkpoint.path, like=self.like)
        m = metrics[0]
        print(f"[{m.get('stage', '?')}] checkpoint at step {int(m.get('step', 0))}: {where}",
              flush=True)
