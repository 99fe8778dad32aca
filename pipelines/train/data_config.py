"""How the stage's datasets reach the Ray Train workers.

Ray Train's default ``DataConfig`` splits every dataset with ``streaming_split(equal=True)``, which
drops up to ``workers - 1`` rows so that each worker gets as many: right for SGD, wrong for
validation, whose confusion matrices are summed over workers (an all-reduce), so each row must be
scored exactly once. ``WholeValidation`` splits the validation dataset unequally (every row, once)
and leaves the training dataset to the default.
"""

from __future__ import annotations

from typing import Any

from ray.train import DataConfig

VAL = "val"


class WholeValidation(DataConfig):
    """``DataConfig`` whose validation split keeps every row (``equal=False``)."""

    def configure(self, datasets: dict[str, Any], world_size: int,
                  worker_handles: Any, worker_node_ids: Any, **kwargs: Any
                  ) -> list[dict[str, Any]]:
        rest = {k: v for k, v in datasets.items() if k != VAL}
        output = (super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
                  if rest else [{} for _ in range(world_size)])
        if VAL in datasets:
            ds = datasets[VAL]
            if ds.name is None:
                ds.set_name(VAL)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(VAL)
            hints = worker_node_ids if self._enable_shard_locality else None
            for i, split in enumerate(ds.streaming_split(world_size, equal=False,
                                                         locality_hints=hints)):
                output[i][VAL] = split
        return output
