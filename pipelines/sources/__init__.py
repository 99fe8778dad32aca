"""Readers of the raw dataset layouts (VOC, SBD, NYUD, SIFT Flow) and a synthetic writer.

Each dataset module has NAME, CLASSES, NUM_CLASSES and
list_records(root, splits=None, split_file=None) -> (records, problems).
"""

from __future__ import annotations

from types import ModuleType

from pipelines.sources import context, nyud, pascal, sbd, siftflow, voc
from pipelines.sources.common import (
    IGNORE,
    LayoutError,
    Problem,
    RawRecord,
    decode_depth,
    decode_image,
    decode_label,
    load_example,
)

SOURCES: dict[str, ModuleType] = {m.NAME: m for m in (voc, sbd, nyud, siftflow, pascal, context)}


def source(name: str) -> ModuleType:
    """The reader module of a dataset name, with a one-line error for an unknown one."""
    if name not in SOURCES:
        raise ValueError(f"dataset must be one of {', '.join(SOURCES)}, got dataset={name!r}")
    return SOURCES[name]


__all__ = [
    "IGNORE", "LayoutError", "Problem", "RawRecord", "SOURCES", "source",
    "decode_depth", "decode_image", "decode_label", "load_example",
    "context", "nyud", "pascal", "sbd", "siftflow", "voc",
]
