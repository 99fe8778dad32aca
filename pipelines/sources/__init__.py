"""Readers of the raw dataset layouts (VOC, SBD, NYUD, SIFT Flow) and a synthetic writer.

Each dataset module has NAME, CLASSES, NUM_CLASSES and
list_records(root, splits=None, split_file=None) -> (records, problems).

Names are imported on first use (PEP 562): ``pipelines.sources.datasets``, which every CLI
command reads, does not pay for the readers' scipy/PIL imports.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

_READERS = ("voc", "sbd", "nyud", "siftflow", "pascal", "context")
_COMMON = ("IGNORE", "LayoutError", "Problem", "RawRecord", "decode_depth", "decode_image",
           "decode_label", "load_example")


def source(name: str) -> ModuleType:
    """The reader module of a dataset name, with a one-line error for an unknown one."""
    if name not in _READERS:
        raise ValueError(f"dataset must be one of {', '.join(_READERS)}, got dataset={name!r}")
    return importlib.import_module(f"pipelines.sources.{name}")


def __getattr__(name: str) -> Any:
    if name == "SOURCES":
        return {n: source(n) for n in _READERS}
    if name in _COMMON:
        return getattr(importlib.import_module("pipelines.sources.common"), name)
    if name in _READERS:
        return importlib.import_module(f"pipelines.sources.{name}")
    raise AttributeError(f"module 'pipelines.sources' has no attribute {name!r}")


if TYPE_CHECKING:
    from pipelines.sources import context, nyud, pascal, sbd, siftflow, voc  # noqa: F401
    from pipelines.sources.common import (  # noqa: F401
        IGNORE,
        LayoutError,
        Problem,
        RawRecord,
        decode_depth,
        decode_image,
        decode_label,
        load_example,
    )

__all__ = [  # noqa: F822 - provided lazily by __getattr__
    "IGNORE", "LayoutError", "Problem", "RawRecord", "SOURCES", "source",
    "decode_depth", "decode_image", "decode_label", "load_example",
    "context", "nyud", "pascal", "sbd", "siftflow", "voc",
]
