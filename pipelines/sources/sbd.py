"""Semantic Boundaries Dataset (Hariharan et al.): benchmark_RELEASE/dataset with img/<id>.jpg,
cls/<id>.mat (GTcls struct, Segmentation = uint8 class map 0..20, no void) and train.txt/val.txt."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fcn_core.palettes import VOC_CLASSES
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

NAME = "sbd"
CLASSES: tuple[str, ...] = VOC_CLASSES
NUM_CLASSES = len(CLASSES)
EXPECTED = "img/, cls/ and train.txt/val.txt (benchmark_RELEASE/dataset or its parent)"


def is_layout(p: StoragePath) -> bool:
    return (p / "img").is_dir() and (p / "cls").is_dir()


def find_root(root: str | Path | StoragePath) -> StoragePath:
    return find_layout(storage_path(root), is_layout, "SBD", EXPECTED)


def list_records(
    root: str | Path | StoragePath,
    splits: Sequence[str] | None = None,
    split_file: str | Path | None = None,
) -> tuple[list[RawRecord], list[Problem]]:
    """Records of the SBD splits: every *.txt in the dataset folder by default (an empty
    train.txt, as in some copies, is a valid empty split)."""
    base = find_root(root)
    records: list[RawRecord] = []
    problems: list[Problem] = []
    for split, path in choose_splits(base, base, splits, split_file):
        entries = [
            Entry(i, (("image", f"img/{i}.jpg"), ("label", f"cls/{i}.mat")))
            for i in read_lines(path)
        ]
        recs, probs = collect_records(NAME, split, base, entries, "sbd-mat", path)
        records += recs
        problems += probs
    return records, problems
