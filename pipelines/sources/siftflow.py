"""SIFT Flow (Liu et al.): 2,688 outdoor 256x256 images, 33 semantic and 3 geometric classes.
Images/<CAT>/<id>.jpg, SemanticLabels/<CAT>/<id>.mat and GeoLabels/<CAT>/<id>.mat (key 'S';
semantic 0 = void, geometric -1 = void), split lists <split>.txt at the root
(FCN uses trainval.txt and test.txt)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fcn_core.palettes import SIFTFLOW_CLASSES, SIFTFLOW_GEO_CLASSES
from pipelines.sources.common import (
    Entry,
    Problem,
    RawRecord,
    choose_splits,
    collect_records,
    find_layout,
    read_lines,
)
from pipelines.storage import StoragePath
from pipelines.storage import path as storage_path

NAME = "siftflow"
CLASSES: tuple[str, ...] = SIFTFLOW_CLASSES
NUM_CLASSES = len(CLASSES)
GEO_CLASSES: tuple[str, ...] = SIFTFLOW_GEO_CLASSES
NUM_GEO_CLASSES = len(GEO_CLASSES)
CATEGORY_DIR = "spatial_envelope_256x256_static_8outdoorcategories"
EXPECTED = (
    f"Images/{CATEGORY_DIR}/, SemanticLabels/{CATEGORY_DIR}/ (and GeoLabels/{CATEGORY_DIR}/) "
    "with <split>.txt lists at the root"
)


def is_layout(p: StoragePath) -> bool:
    return (p / "Images" / CATEGORY_DIR).is_dir() and (p / "SemanticLabels" / CATEGORY_DIR).is_dir()


def find_root(root: str | Path | StoragePath) -> StoragePath:
    return find_layout(storage_path(root), is_layout, "SIFT Flow", EXPECTED)


def _entry(base: StoragePath, id_: str) -> Entry:
    files = [
        ("image", f"Images/{CATEGORY_DIR}/{id_}.jpg"),
        ("label", f"SemanticLabels/{CATEGORY_DIR}/{id_}.mat"),
    ]
    # The geometric head needs GeoLabels; a copy without that folder yields semantic-only records.
    if (base / "GeoLabels" / CATEGORY_DIR).is_dir():
        files.append(("label_geo", f"GeoLabels/{CATEGORY_DIR}/{id_}.mat"))
    return Entry(id_, tuple(files))


def list_records(
    root: str | Path | StoragePath,
    splits: Sequence[str] | None = None,
    split_file: str | Path | None = None,
) -> tuple[list[RawRecord], list[Problem]]:
    """Records of the SIFT Flow splits (every *.txt at the root by default), each with the
    geometric label as the extra "label_geo" (decode_label(record, "label_geo"))."""
    base = find_root(root)
    records: list[RawRecord] = []
    problems: list[Problem] = []
    for split, path in choose_splits(base, base, splits, split_file):
        entries = [_entry(base, i) for i in read_lines(path)]
        recs, probs = collect_records(NAME, split, base, entries, "siftflow-mat", path)
        records += recs
        problems += probs
    return records, problems
