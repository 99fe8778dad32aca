"""Prefect result storage in the pipeline's own storage (a bucket on a cluster).

Prefect persists cached task results (ingest, each training stage) to its default local folder,
which a scheduled run on another machine cannot see. ``BucketResults`` is a Prefect
``WritableFileSystem`` backed by ``pipelines.storage``, so results live wherever the run's
data does (``s3://…``, ``gs://…``, a local folder), with the S3 settings from the standard
``AWS_*`` variables and no credential in the block's fields (nothing secret is saved or logged).

Prefect refuses an unsaved block as a flow's result storage, so ``result_storage`` saves one
block document per base location (its only field is the location) and passes it to
``flow.with_options(result_storage=…)``; tasks inherit it, and a cache lookup reads the key from
the same place. Another process resolves the saved block by id: importing this module (the flows
do) registers its type.
"""

from __future__ import annotations

import hashlib
from typing import Any

from prefect.filesystems import WritableFileSystem

from pipelines import storage


class BucketResults(WritableFileSystem):
    """Prefect results under ``basepath`` (a local path or any URI ``pipelines.storage``
    resolves)."""

    _block_type_name = "FCN Bucket Results"
    _block_type_slug = "fcn-bucket-results"

    basepath: str

    def _location(self, path: str) -> str:
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"result key {path!r} must be a relative path")
        return storage.join(self.basepath, path)

    def read_path(self, path: str, **_: Any) -> bytes:
        # Prefect calls read_path(key, _sync=True); a missing key raises, which Prefect reads
        # as "not cached".
        return storage.read_bytes(self._location(path))

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    def write_path(self, path: str, content: bytes, **_: Any) -> str:
        loc = self._location(path)
        storage.write_bytes(loc, content)
        return loc

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content)


def results_location(*locations: str | None) -> str | None:
    """Where a pipeline's Prefect results go: ``_prefect/results`` beside the first remote
    location given (the run storage, then the shards); None keeps Prefect's local default."""
    for loc in locations:
        if loc and storage.is_remote(loc):
            return storage.join(loc, "_prefect", "results")
    return None


def result_storage(*locations: str | None) -> BucketResults | None:
    """A saved ``BucketResults`` for ``results_location(*locations)`` (None: Prefect's
    default). Needs Prefect's API (a flow run has it)."""
    loc = results_location(*locations)
    if loc is None:
        return None
    block = BucketResults(basepath=loc)
    block.save(f"fcn-results-{hashlib.sha256(loc.encode()).hexdigest()[:16]}", overwrite=True)
    return block
