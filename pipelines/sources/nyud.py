"""NYU Depth v2, 40 classes (Gupta et al.), in the FCN reference layout:
data/images/img_NNNN.png (RGB), data/depth/img_NNNN.png (16-bit mm), data/hha/img_NNNN.png,
segmentation/img_NNNN.mat ('segmentation', uint8, 0 = void, 1..40), split files
train.txt/val.txt/test.txt listing frame numbers, or the toolkit's splits.mat."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io

from fcn_core.palettes import NYUD_CLASSES
from pipelines.sources import reference
from pipelines.sources.common import (
    Entry,
    LayoutError,
    Problem,
    RawRecord,
    choose_splits,
    collect_records,
    find_layout,
    read_lines,
    resolve_split_file,
)
from pipelines.storage import StoragePath
from pipelines.storage import path as storage_path

NAME = "nyud"
CLASSES: tuple[str, ...] = NYUD_CLASSES
NUM_CLASSES = len(CLASSES)
FRAME_OFFSET = 5000  # splits.mat index k (1-based) is frame img_{5000 + k}
# splits.mat's trainNdxs are the 795 frames the reference trains on (train + val): trainval.
SPLITS_MAT_KEYS = {"trainval": "trainNdxs", "test": "testNdxs"}
REFERENCE_SPLITS = ("train", "val", "test")  # shipped lists, for a copy that has none
# rawdepth (the sensor's depth, 0 = no reading) only marks missing pixels for --compute-hha.
OPTIONAL_DIRS = {"depth": "data/depth", "hha": "data/hha", "rawdepth": "data/rawdepth"}
EXPECTED = (
    "data/images/ and segmentation/ (FCN's nyud folder) with train.txt/val.txt/test.txt "
    "or splits.mat"
)


def is_layout(p: StoragePath) -> bool:
    return (p / "data" / "images").is_dir() and (p / "segmentation").is_dir()


def find_root(root: str | Path | StoragePath) -> StoragePath:
    return find_layout(storage_path(root), is_layout, "NYUD", EXPECTED)


def read_splits_mat(path: str | Path | StoragePath) -> dict[str, list[str]]:
    """{"trainval": [...], "test": [...]} frame ids from splits.mat (trainNdxs 795, testNdxs
    654)."""
    p = storage_path(path)
    try:
        mat = scipy.io.loadmat(io.BytesIO(p.read_bytes()))
    except (scipy.io.matlab.MatReadError, ValueError, OSError, NotImplementedError) as e:
        raise LayoutError(f"unreadable splits file {p}: {e}") from e
    missing = [k for k in SPLITS_MAT_KEYS.values() if k not in mat]
    if missing:
        raise LayoutError(f"splits file {p} has no {', '.join(missing)}")
    return {
        split: [str(FRAME_OFFSET + int(k)) for k in np.asarray(mat[key]).ravel()]
        for split, key in SPLITS_MAT_KEYS.items()
    }


def _frame(line: str) -> str:
    # Accept "img_5001" as well as the reference's bare "5001".
    return line.removeprefix("img_")


def _split_ids(
    base: StoragePath, splits: Sequence[str] | None, split_file: str | Path | None
) -> list[tuple[str, StoragePath, list[str]]]:
    """(split, source file, frame ids): txt split files win; splits.mat is the fallback, and
    the shipped reference lists (Gupta et al.'s train / val / test) the last resort."""
    if split_file is not None and Path(split_file).suffix.lower() == ".mat":
        mat_path: StoragePath | None = resolve_split_file(split_file, base)
    elif split_file is None and not any(base.glob("*.txt")) and (base / "splits.mat").is_file():
        mat_path = base / "splits.mat"
    else:
        mat_path = None
    if mat_path is None and split_file is None and not any(base.glob("*.txt")):
        wanted = list(REFERENCE_SPLITS) if splits is None else list(splits)
        unknown = [s for s in wanted if s not in REFERENCE_SPLITS]
        if unknown:
            raise LayoutError(f"no split {unknown[0]} in the shipped NYUD lists (available: "
                              f"{', '.join(REFERENCE_SPLITS)})")
        return [(s, storage_path(reference.path("nyud", s)), list(reference.ids("nyud", s)))
                for s in wanted]
    if mat_path is None:
        chosen = choose_splits(base, base, splits, split_file)
        return [(s, p, [_frame(x) for x in read_lines(p)]) for s, p in chosen]
    by_split = read_splits_mat(mat_path)
    wanted = list(by_split) if splits is None else list(splits)
    unknown = [s for s in wanted if s not in by_split]
    if unknown:
        raise LayoutError(f"no split {unknown[0]} in {mat_path} (available: "
                          f"{', '.join(SPLITS_MAT_KEYS)})")
    return [(s, mat_path, by_split[s]) for s in wanted]


def _entry(base: StoragePath, frame: str) -> Entry:
    files = [("image", f"data/images/img_{frame}.png"), ("label", f"segmentation/img_{frame}.mat")]
    # Depth and HHA are optional per dataset copy; once their folder exists every id needs one.
    files += [(k, f"{d}/img_{frame}.png") for k, d in OPTIONAL_DIRS.items() if (base / d).is_dir()]
    return Entry(frame, tuple(files))


def list_records(
    root: str | Path | StoragePath,
    splits: Sequence[str] | None = None,
    split_file: str | Path | None = None,
) -> tuple[list[RawRecord], list[Problem]]:
    """Records of the NYUD splits; depth / hha extras when data/depth, data/hha exist."""
    base = find_root(root)
    records: list[RawRecord] = []
    problems: list[Problem] = []
    for split, source, frames in _split_ids(base, splits, split_file):
        entries = [_entry(base, f) for f in frames]
        recs, probs = collect_records(NAME, split, base, entries, "nyud-mat", source)
        records += recs
        problems += probs
    return records, problems
