"""PASCAL-Context, the 59-class task of the PAMI FCN (Mottaghi et al., CVPR 2014).

Two trees: VOC2010 (``JPEGImages/<id>.jpg``, ``ImageSets/Main/train.txt`` 4,998 and
``val.txt`` 5,105) and the Context annotations (``trainval/<id>.mat`` with ``LabelMap``, 1-based
indices into ``labels.txt``; ``59_labels.txt``, the task's classes). As the reference
``pascalcontext_layers.py`` does: names lose their spaces, the 59 list's ``diningtable``,
``bedcloth`` and ``clothes`` are read as labels.txt's ``table``, ``bedclothes`` and ``cloth``,
the k-th of the 59 becomes class k (1..59) and every other pixel 0 (background), not 255:
PASCAL-Context has no void. Like the reference, a name's place in its file is its index (the
``idx:`` numbers are not read) and the first of repeated names wins; unlike it, a LabelMap value
beyond labels.txt (or below 0) is refused, a quarantine reason, instead of silently becoming 0.
The output order is our shipped ``classes-59.txt`` (FCN's), which must equal 59_labels.txt.
At decode time the tables are found from the label itself: ``<root>/trainval/<id>.mat`` ->
``<root>/labels.txt`` and ``<root>/59_labels.txt``, read once per process and root.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

from pipelines import storage
from pipelines.sources import reference
from pipelines.sources.common import (
    LayoutError,
    Problem,
    RawRecord,
    _file_reason,
    choose_splits,
    escapes_root,
    find_layout,
    read_lines,
)
from pipelines.storage import StoragePath
from pipelines.storage import path as storage_path

NAME = "context"
CLASSES: tuple[str, ...] = reference.numbered_classes("pascal-context", "classes-59")
NUM_CLASSES = len(CLASSES)  # 60: background + 59
LABEL_FORMAT = "context-mat"
SPLIT_DIR = "ImageSets/Main"
# The 59 list's names -> the names labels.txt uses for them (reference pascalcontext_layers).
RENAMED = {"diningtable": "table", "bedcloth": "bedclothes", "clothes": "cloth"}
VOC_EXPECTED = ("JPEGImages/ and ImageSets/Main/ of VOC2010 (VOCdevkit/VOC2010 or a folder up to "
                "two levels above it; PASCAL-Context labels VOC2010 only)")
CONTEXT_EXPECTED = "trainval/ (<id>.mat with LabelMap), labels.txt and 59_labels.txt"


def is_voc_layout(p: StoragePath) -> bool:
    """A VOC tree, but not another year's (a VOCdevkit often holds VOC2010 and VOC2012)."""
    other_year = re.fullmatch(r"VOC\d{4}", p.name) is not None and p.name != "VOC2010"
    return not other_year and (p / "JPEGImages").is_dir() and (p / SPLIT_DIR).is_dir()


def is_context_layout(p: StoragePath) -> bool:
    return (p / "trainval").is_dir() and (p / "labels.txt").is_file()


def find_roots(voc_root: str | Path | StoragePath, context_root: str | Path | StoragePath
               ) -> tuple[StoragePath, StoragePath]:
    vbase = find_layout(storage_path(voc_root), is_voc_layout, "VOC2010", VOC_EXPECTED)
    cbase = find_layout(storage_path(context_root), is_context_layout, "PASCAL-Context",
                        CONTEXT_EXPECTED)
    return vbase, cbase


def _names(text: str, where: str) -> list[str]:
    """``idx: name`` lines in file order, spaces removed (np.genfromtxt(delimiter=':'))."""
    out = []
    for ln in text.splitlines():
        if not ln.strip():
            continue
        if ":" not in ln:
            raise ValueError(f"{where}: line {ln.strip()!r} is not 'index: name'")
        out.append(ln.split(":", 1)[1].strip().replace(" ", ""))
    return out


@cache
def lookup(context_root: str) -> np.ndarray:
    """uint8 table: LabelMap value (1-based index into labels.txt) -> class 0..59."""
    root = storage_path(context_root)
    labels = _names((root / "labels.txt").read_text(), "labels.txt")
    task = _names((root / "59_labels.txt").read_text(), "59_labels.txt")
    if task != list(CLASSES[1:]):
        raise LayoutError(f"59_labels.txt at {root} does not list the 59 classes of the FCN "
                          f"task in their order (got {len(task)} names, first "
                          f"{', '.join(task[:3])})")
    table = np.zeros(len(labels) + 1, np.uint8)
    for k, name in enumerate(task, start=1):
        full = RENAMED.get(name, name)
        if full not in labels:
            raise LayoutError(f"labels.txt at {root} has no class {full!r} (59-class task "
                              f"name {name!r})")
        table[labels.index(full) + 1] = k
    table.flags.writeable = False  # shared by every caller in the process
    return table


def decode(label_map: np.ndarray, mat_location: str) -> np.ndarray:
    """A LabelMap -> uint8 class ids 0..59 (0 = background and every class outside the 59)."""
    root = storage.parent(storage.parent(mat_location))  # <root>/trainval/<id>.mat
    table = lookup(root)
    if label_map.min() < 0 or label_map.max() >= len(table):
        raise ValueError(f"label {storage.name(mat_location)}: LabelMap values outside 0.."
                         f"{len(table) - 1} (the classes of labels.txt)")
    return table[label_map]


def _splits(vbase: StoragePath, splits: Sequence[str] | None,
            split_file: str | Path | None) -> list[tuple[str, StoragePath]]:
    return choose_splits(vbase / SPLIT_DIR, vbase, splits or (
        None if split_file else ["train", "val"]), split_file)


def list_records(voc_root: str | Path | StoragePath, context_root: str | Path | StoragePath,
                 splits: Sequence[str] | None = None, split_file: str | Path | None = None
                 ) -> tuple[list[RawRecord], list[Problem]]:
    """Records of VOC2010 ``ImageSets/Main`` train and val (or ``splits``), labels from the
    Context tree; one Problem per bad id (missing image or annotation, duplicate, escape)."""
    vbase, cbase = find_roots(voc_root, context_root)
    for name in ("labels.txt", "59_labels.txt"):
        if not (cbase / name).is_file():
            raise LayoutError(f"PASCAL-Context at {cbase} has no {name}")
    lookup(str(cbase))  # a wrong class list fails now, in one line, not once per image
    records: list[RawRecord] = []
    problems: list[Problem] = []
    for split, source in _splits(vbase, splits, split_file):
        seen: set[str] = set()
        for id_ in read_lines(source):
            if escapes_root(id_):
                problems.append(Problem(NAME, split, id_, str(source),
                                        "id escapes the dataset root"))
                continue
            if id_ in seen:
                problems.append(Problem(NAME, split, id_, str(source),
                                        f"duplicate id in split {split}"))
                continue
            seen.add(id_)
            files = ((vbase, "image", f"JPEGImages/{id_}.jpg"),
                     (cbase, "label", f"trainval/{id_}.mat"))
            bad = [(b / rel, r) for b, role, rel in files if (r := _file_reason(b, role, rel))]
            if bad:
                problems.append(Problem(NAME, split, id_, str(bad[0][0]),
                                        "; ".join(r for _, r in bad)))
                continue
            records.append(RawRecord(NAME, split, id_, str(vbase / files[0][2]),
                                     str(cbase / files[1][2]), LABEL_FORMAT))
    return records, problems
