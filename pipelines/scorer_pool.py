"""Scoring actors kept between evaluations in one driver.

Each Ray Data ``map_batches`` actor pool was new for every ``evaluate`` call: a process per
actor that imports torch, Ray Data and the project (~5 s of the ~6 s an evaluation of a few
images took on 2 cores, measured), paid again after every stage of a pipeline. Here the
actors outlive the call: a Ray task per shard reads the split into the object store, and each
shard's table, in parts of a batch, goes to the next free actor of a pool that the next
evaluation in this driver reuses. (Ray Data's read with a repartition, before, cost 1.2-1.9 s
of executor start-up per call on its own.) Each call loads its model into the actors again (a
checkpoint path can hold a new checkpoint). One pool is kept: the last one to come back.

CPU actors reserve no CPU (``num_cpus=0``) so that, idle between evaluations, they never hold
back a training run's workers or Ray Data's reads, and an evaluation beside a training run
that holds every CPU does not wait for it (nor do the shard reads: no CPU either, at most
``READS_AHEAD`` at once); their torch threads are set from the CPUs
they would have been given (``actor_cpus``), and ``SPREAD`` places them across the nodes. A
GPU actor holds its GPU, so a GPU pool ends with its call. A call has its pool to itself, and
a call that fails (an actor lost, a bad row) ends it: the next call, or Prefect's retry of the
task, starts a new one.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

_LOCK = threading.Lock()
_POOLS: dict[tuple[str, int, int], list[Any]] = {}  # (job id, actors, threads) -> handles
# (at most one entry: the pool that came back last)
READS_AHEAD = 4  # shard reads in flight at once (read_blocks)


class ScorerActor:
    """One scoring process: torch threads set once, a model loaded per evaluation."""

    def __init__(self, threads: int):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.scorer: Any = None

    def load(self, model_uri: str, tracking_uri: str | None, heads: list[dict[str, Any]],
             options: dict[str, Any], skip: tuple[str, ...], use_gpu: bool) -> bool:
        from pipelines.evaluate import Scorer

        self.scorer = None  # the previous model's memory goes first
        self.scorer = Scorer(model_uri, tracking_uri, heads, options, skip, use_gpu,
                             threads=0)
        return True

    def score(self, block: Any, start: int, stop: int, batch_size: int) -> dict[str, Any]:
        """The summed confusion matrices and image count of rows [start, stop) of a block (an
        Arrow table); {} for no rows."""
        from pipelines.evaluate import table_batches

        assert self.scorer is not None, "load() first"
        total: dict[str, Any] = {}
        for batch in table_batches(block.slice(start, stop - start), batch_size):
            out = self.scorer(batch)
            for k, v in out.items():
                total[k] = total[k] + v if k in total else v
        return total


@contextmanager
def borrowed(actors: int, threads: int, use_gpu: bool) -> Iterator[list[Any]]:
    """``actors`` live scoring actors for one evaluation: this driver's kept pool of that size
    (CPU) or new ones. A call has them to itself (a concurrent one gets a pool of its own); they
    are kept for the next call when this one succeeds (ending the pool kept before), and ended
    when it fails or used GPUs."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    key = (job, actors, threads)
    with _LOCK:
        for k in [k for k in _POOLS if k[0] != job]:  # a Ray since shut down: its actors are gone
            del _POOLS[k]
        handles = None if use_gpu else _POOLS.pop(key, None)
    if handles is None:
        handles = [_new(ray, threads, use_gpu) for _ in range(actors)]
    keep = False
    try:
        yield handles
        keep = not use_gpu
    finally:
        others: list[Any] = []
        if keep:
            with _LOCK:  # the one kept pool: this one
                others = [h for hs in _POOLS.values() for h in hs]
                _POOLS.clear()
                _POOLS[key] = handles
        else:
            others = handles
        _kill(others)


def _new(ray: Any, threads: int, use_gpu: bool) -> Any:
    opts: dict[str, Any] = {"num_cpus": 0, "num_gpus": 1 if use_gpu else 0, "max_restarts": 0,
                            "scheduling_strategy": "SPREAD"}
    return ray.remote(ScorerActor).options(**opts).remote(threads)


def _kill(handles: list[Any]) -> None:
    import ray

    for h in handles:
        try:
            ray.kill(h)
        except Exception:  # already gone, or Ray shut down
            pass


def release() -> None:
    """End every kept pool."""
    with _LOCK:
        ends = [h for hs in _POOLS.values() for h in hs]
        _POOLS.clear()
    _kill(ends)


def kept() -> int:
    """How many actors are kept for later calls."""
    with _LOCK:
        return sum(len(hs) for hs in _POOLS.values())


def _read_shard(fs: Any, path: str, columns: list[str]) -> Any:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=columns, filesystem=fs)


def read_blocks(locations: list[str], columns: list[str], ahead: int = READS_AHEAD
                ) -> Iterator[Any]:
    """Each shard read into the object store by a Ray task of its own (through
    ``pipelines.storage``'s filesystem, as every other access): ObjectRefs of Arrow tables,
    in order. A plain task costs ~0.04 s here where a Ray Data read of the same shards cost
    1.2-1.9 s (its executor's start, measured), a cost every evaluation paid again.

    The reads reserve no CPU, as the actors: an evaluation beside a training run that holds
    every CPU must not wait for its end (a read is Parquet I/O; the decoding is the actors').
    Nothing then bounds how many Ray runs at once, so at most ``ahead`` are in flight: the
    first ones start now (while the model loads), each one taken starts the next."""
    import ray

    from pipelines import storage

    fs = storage.filesystem(locations[0])
    task = ray.remote(num_cpus=0, max_retries=3)(_read_shard)
    todo = iter(locations)
    pending: deque[Any] = deque()

    def start_next() -> None:
        loc = next(todo, None)
        if loc is not None:
            pending.append(task.remote(fs, storage.resolve(loc)[1], columns))

    for _ in range(max(1, ahead)):
        start_next()

    def taken() -> Iterator[Any]:
        while pending:
            ref = pending.popleft()
            start_next()
            yield ref

    return taken()


def load(handles: list[Any], spec: dict[str, Any]) -> list[Any]:
    """Start loading a model into every actor (``ScorerActor.load``'s arguments); the refs to
    wait for before scoring."""
    return [h.load.remote(**spec) for h in handles]


def score_blocks(handles: list[Any], blocks: Iterable[tuple[Any, int]], loading: list[Any],
                 batch_size: int, depth: int = 1) -> Iterator[dict[str, Any]]:
    """Once ``loading`` is done, score the blocks ((ObjectRef of an Arrow table, rows)) in
    parts of ``batch_size`` rows, each on the next free actor (``depth`` parts queued on each:
    1 keeps the last parts from waiting behind another's queue on the CPU; a GPU's short calls
    want 2); yields each part's result as it arrives."""
    import ray

    ray.get(loading)
    # Lazily: a block's read (read_blocks) starts when the one ``ahead`` of it is taken.
    work = ((ref, a, min(a + batch_size, rows)) for ref, rows in blocks
            for a in range(0, rows, batch_size))
    free = [h for _ in range(depth) for h in handles]
    running: dict[Any, Any] = {}  # result ref -> actor
    while True:
        while free:
            item = next(work, None)
            if item is None:
                break
            actor = free.pop()
            running[actor.score.remote(*item, batch_size)] = actor
        if not running:
            return
        (done,), _ = ray.wait(list(running), num_returns=1)
        free.append(running.pop(done))
        yield ray.get(done)
