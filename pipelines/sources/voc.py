"""PASCAL VOC segmentation: VOCdevkit/VOC20xx with JPEGImages/, SegmentationClass/ ('P' PNGs,
palette index = class id) or SegmentationClassAug/ ('L' PNGs), ImageSets/Segmentation/*.txt.
255 marks object borders (ignored)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from fcn_core.palettes import VOC_CLASSES
from pipelines.sources.common import (
    Entry,
    LayoutError,
    Problem,
    RawRecord,
    choose_splits,
    collect_records,
    escapes_root,
    find_layout,
    read_lines,
)
from pipelines.storage import StoragePath
from pipelines.storage import path as storage_path

NAME = "voc"
CLASSES: tuple[str, ...] = VOC_CLASSES
NUM_CLASSES = len(CLASSES)
LABEL_DIRS = ("SegmentationClass", "SegmentationClassAug")  # preferred first
SPLIT_DIR = "ImageSets/Segmentation"
EXPECTED = (
    "JPEGImages/, SegmentationClass/ (or SegmentationClassAug/) and ImageSets/Segmentation/ "
    "(VOCdevkit/VOC2012 or its parent)"
)


def is_layout(p: StoragePath) -> bool:
    return (p / "JPEGImages").is_dir() and any((p / d).is_dir() for d in LABEL_DIRS)


def find_root(root: str | Path | StoragePath) -> StoragePath:
    return find_layout(storage_path(root), is_layout, "VOC", EXPECTED)


def _id_entry(root: StoragePath, id_: str) -> Entry:
    # Per id, SegmentationClass wins and SegmentationClassAug (a superset, same ids) fills in,
    # so a devkit holding both serves VOC val and the SBD-augmented train ids alike.
    # An escaping id is never probed on disk; collect_records reports it.
    dirs = [d for d in LABEL_DIRS if (root / d).is_dir()]
    found = [d for d in dirs if not escapes_root(id_) and (root / d / f"{id_}.png").is_file()]
    label = f"{(found or dirs)[0]}/{id_}.png"
    return Entry(id_, (("image", f"JPEGImages/{id_}.jpg"), ("label", label)))


def _pair_entry(image: str, label: str) -> Entry:
    # List files ("/JPEGImages/x.jpg /SegmentationClassAug/x.png") are relative to the root
    # despite the leading slash.
    image, label = image.lstrip("/"), label.lstrip("/")
    return Entry(PurePosixPath(image).stem, (("image", image), ("label", label)))


def _entries(
    root: StoragePath, lines: list[str], split: str, source: Path
) -> tuple[list[Entry], list[Problem]]:
    entries: list[Entry] = []
    problems: list[Problem] = []
    for line in lines:
        cols = line.split()
        if len(cols) == 1:
            entries.append(_id_entry(root, cols[0]))
        elif len(cols) == 2:
            entries.append(_pair_entry(cols[0], cols[1]))
        else:
            reason = f"malformed line {line!r} in {source.name}: expected 'id' or 'image label'"
            problems.append(Problem(NAME, split, cols[0], str(source), reason))
    return entries, problems


def list_records(
    root: str | Path | StoragePath,
    splits: Sequence[str] | None = None,
    split_file: str | Path | None = None,
) -> tuple[list[RawRecord], list[Problem]]:
    """Records of the VOC splits (every ImageSets/Segmentation/*.txt by default), or of one
    user-named split file: ids one per line, or 'image-path label-path' pairs."""
    base = find_root(root)
    if split_file is None and not (base / SPLIT_DIR).is_dir():
        raise LayoutError(
            f"VOC layout at {base} has no {SPLIT_DIR}/ (its split lists): name a list of ids "
            "with fcn ingest --split-file"
        )
    records: list[RawRecord] = []
    problems: list[Problem] = []
    for split, path in choose_splits(base / SPLIT_DIR, base, splits, split_file):
        entries, bad_lines = _entries(base, read_lines(path), split, path)
        recs, probs = collect_records(NAME, split, base, entries, "png", path)
        records += recs
        problems += bad_lines + probs
    return records, problems
