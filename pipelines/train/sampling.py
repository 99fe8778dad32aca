"""Which training rows each step sees: the reference's random draw, an epoch shuffle, or the
stream as stored.

- ``random``: the reference data layers (voc_layers.py & co.) draw a uniformly random image
  at every iteration, with replacement, from a seeded generator (seed 1337).
- ``shuffle``: a new permutation of the rows every epoch (every row once per epoch).
- ``stream``: Ray Data's streaming order (shard by shard, a small local shuffle buffer); for
  splits too large to hold in a worker's memory.

``random`` and ``shuffle`` hold the worker's share of the split as encoded bytes (a VOC
SBD-train split is ~1 GB in all) and pick rows by step number, so an order is reproducible
from the seed and a resumed stage sees exactly the rows it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.config import SAMPLING

__all__ = ["SAMPLING", "IN_MEMORY", "RowSampler", "collect_rows", "rows_from_shards",
           "share", "step_indices"]
IN_MEMORY: tuple[str, ...] = ("random", "shuffle")


def step_indices(n: int, step: int, batch_size: int, mode: str, seed: int,
                 rank: int = 0) -> np.ndarray:
    """Row indices (batch_size,) of global step ``step`` (0-based) for one worker of ``n`` rows.

    A function of (seed, rank, step) only, so any step can be recomputed after a restart."""
    if n < 1:
        raise ValueError(f"n must be >= 1 (rows to sample from), got n={n}")
    if mode == "random":  # with replacement, independent per step
        return np.random.default_rng([seed, rank, step]).integers(0, n, size=batch_size)
    if mode == "shuffle":  # position p of the endless sequence of epoch permutations
        pos = step * batch_size + np.arange(batch_size)
        epochs = pos // n
        out = np.empty(batch_size, np.int64)
        for e in np.unique(epochs):
            perm = np.random.default_rng([seed, rank, int(e), 1]).permutation(n)
            sel = epochs == e
            out[sel] = perm[pos[sel] % n]
        return out
    raise ValueError(f"mode must be one of {', '.join(IN_MEMORY)}, got mode={mode!r}")


@dataclass
class RowSampler:
    """A worker's rows (column -> list of values, as Ray Data's numpy batches hold them) and
    the order ``mode`` draws them in."""

    columns: dict[str, list[Any]]
    mode: str
    seed: int
    batch_size: int
    rank: int = 0

    @property
    def n(self) -> int:
        return len(self.columns["id"])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The rows of step ``step``, as a Ray Data numpy batch (object arrays of bytes)."""
        idx = step_indices(self.n, step, self.batch_size, self.mode, self.seed, self.rank)
        out: dict[str, np.ndarray] = {}
        for k, v in self.columns.items():
            col = np.empty(len(idx), dtype=object)
            col[:] = [v[i] for i in idx]
            out[k] = col
        return out

    def batches(self, start: int) -> Iterator[dict[str, np.ndarray]]:
        step = start
        while True:
            yield self.batch(step)
            step += 1


def collect_rows(shard: Any, columns: list[str]) -> dict[str, list[Any]]:
    """Read a worker's whole dataset shard once (encoded bytes) into column lists."""
    out: dict[str, list[Any]] = {c: [] for c in columns}
    for batch in shard.iter_batches(batch_format="pyarrow", batch_size=256):
        names = set(batch.column_names)
        for c in columns:
            out[c] += batch[c].to_pylist() if c in names else [None] * batch.num_rows
    return out


def share(rows: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi): worker ``rank``'s contiguous share of ``rows`` rows; the shares of the
    ``world`` workers cover every row once and differ by at most one row."""
    return rank * rows // world, (rank + 1) * rows // world


def rows_from_shards(shards: list[tuple[str, int]], rank: int, world: int,
                     columns: list[str]) -> dict[str, list[Any]]:
    """Worker ``rank``'s share of a split, read straight from the Parquet shards it overlaps
    (``(location, rows)`` in the manifest's order; a local path or a bucket URI): each worker
    reads about 1/world of the bytes, no Ray Data execution, and every row is some worker's
    exactly once, which validation needs (its confusion matrices are summed over workers)."""
    import pyarrow.parquet as pq

    from pipelines import storage

    lo, hi = share(sum(n for _, n in shards), rank, world)
    out: dict[str, list[Any]] = {c: [] for c in columns}
    start = 0
    for location, n in shards:
        end, start_of = start + n, start
        start = end
        if end <= lo or start_of >= hi:
            continue
        fs, path = storage.resolve(location)
        have = set(pq.read_schema(path, filesystem=fs).names)
        table = pq.read_table(path, columns=[c for c in columns if c in have], filesystem=fs)
        first = max(lo, start_of) - start_of
        piece = table.slice(first, min(hi, end) - start_of - first)
        for c in columns:
            out[c] += piece[c].to_pylist() if c in have else [None] * piece.num_rows
    return out
