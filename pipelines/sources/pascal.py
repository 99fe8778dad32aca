"""PASCAL VOC + SBD as the FCN experiments use them: one dataset from the two trees.

Protocols (``PROTOCOLS``; the split names are what a config's train_split / val_split take):

- ``seg11valid`` (the reference, every FCN number on "seg11valid"): train = SBD ``train.txt``
  (8,498 ids; labels SBD ``cls/<id>.mat`` GTcls.Segmentation, no void), seg11valid = the
  shipped reference list (736 VOC2011 val ids outside SBD train; labels VOC2011
  ``SegmentationClass/<id>.png``, 255 = ignore).
- ``trainaug`` (what the work after FCN uses): train_aug = (VOC2012 train | SBD train |
  SBD val) - VOC2012 val (10,582 ids; VOC labels where the VOC tree has them, otherwise SBD's),
  val = VOC2012 ``ImageSets/Segmentation/val.txt`` (1,449).

Validation ids missing from the VOC tree, or (seg11valid) listed in SBD train as well (test
leakage), are counted and refused unless ``allow_missing``: then the missing ones become
quarantine rows, the overlapping ones leave the validation split, and the manifest records both
counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fcn_core.palettes import VOC_CLASSES
from pipelines.sources import reference, sbd, voc
from pipelines.sources.common import (
    Entry,
    LayoutError,
    Problem,
    RawRecord,
    collect_records,
    read_lines,
    resolve_split_file,
)
from pipelines.storage import StoragePath
from pipelines.storage import path as storage_path

NAME = "pascal"
CLASSES: tuple[str, ...] = VOC_CLASSES
NUM_CLASSES = len(CLASSES)
PROTOCOLS: dict[str, tuple[str, str]] = {  # protocol -> (train split, validation split)
    "seg11valid": ("train", "seg11valid"),
    "trainaug": ("train_aug", "val"),
}
DEFAULT_PROTOCOL = "seg11valid"
SHOW = 5  # ids named in a refusal


@dataclass
class Listing:
    records: list[RawRecord]
    problems: list[Problem]
    missing: int = 0  # validation ids absent from the VOC tree (quarantined)
    overlap: int = 0  # seg11valid ids also in SBD train (left out of the validation split)
    notes: dict[str, int | str] = field(default_factory=dict)


def _voc_entry(id_: str) -> Entry:
    return Entry(id_, (("image", f"JPEGImages/{id_}.jpg"),
                       ("label", f"SegmentationClass/{id_}.png")))


def _sbd_entry(id_: str) -> Entry:
    return Entry(id_, (("image", f"img/{id_}.jpg"), ("label", f"cls/{id_}.mat")))


def _sbd_list(base: StoragePath, split: str) -> list[str]:
    p = base / f"{split}.txt"
    if not p.is_file():
        raise LayoutError(f"SBD at {base} has no {split}.txt (benchmark_RELEASE/dataset has "
                          "train.txt and val.txt)")
    return read_lines(p)


def _voc_list(base: StoragePath, split: str) -> list[str]:
    p = base / voc.SPLIT_DIR / f"{split}.txt"
    if not p.is_file():
        raise LayoutError(f"VOC at {base} has no {voc.SPLIT_DIR}/{split}.txt")
    return read_lines(p)


def _named(ids: list[str]) -> str:
    more = f" and {len(ids) - SHOW} more" if len(ids) > SHOW else ""
    return ", ".join(ids[:SHOW]) + more


def list_records(voc_root: str | Path | StoragePath, sbd_root: str | Path | StoragePath,
                 protocol: str = DEFAULT_PROTOCOL, *, allow_missing: bool = False,
                 split_file: str | Path | None = None) -> Listing:
    """The records of one protocol. ``split_file`` replaces the validation list (the shipped
    seg11valid.txt, or VOC's val.txt for trainaug)."""
    if protocol not in PROTOCOLS:
        raise LayoutError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    vbase = voc.find_root(voc_root)
    sbase = sbd.find_root(sbd_root)
    train_split, val_split = PROTOCOLS[protocol]
    sbd_train = _sbd_list(sbase, "train")
    if split_file is not None:
        val_ids, val_source = read_lines(resolve_split_file(split_file, vbase)), \
            resolve_split_file(split_file, vbase)
    elif protocol == "seg11valid":
        val_ids, val_source = list(reference.ids("pascal", "seg11valid")), \
            storage_path(reference.path("pascal", "seg11valid"))
    else:
        val_ids, val_source = _voc_list(vbase, "val"), vbase / voc.SPLIT_DIR / "val.txt"

    notes: dict[str, int | str] = {"protocol": protocol, "voc_root": str(vbase),
                                   "sbd_root": str(sbase)}
    overlap: list[str] = []
    if protocol == "seg11valid":
        in_train = set(sbd_train)
        overlap = [i for i in val_ids if i in in_train]
        val_ids = [i for i in val_ids if i not in in_train] if allow_missing else val_ids
        train_records, train_problems = collect_records(
            NAME, train_split, sbase, [_sbd_entry(i) for i in sbd_train], "sbd-mat",
            sbase / "train.txt")
    else:
        voc_val = set(val_ids)
        voc_train = _voc_list(vbase, "train")
        union = dict.fromkeys([*voc_train, *sbd_train, *_sbd_list(sbase, "val")])
        ids = sorted(i for i in union if i not in voc_val)
        has_voc = set(voc_train)  # VOC's own labels (with void borders) where it has them
        train_records, train_problems = [], []
        for base, fmt, chosen in ((vbase, "png", [i for i in ids if i in has_voc]),
                                  (sbase, "sbd-mat", [i for i in ids if i not in has_voc])):
            entry = _voc_entry if fmt == "png" else _sbd_entry
            recs, probs = collect_records(NAME, train_split, base, [entry(i) for i in chosen],
                                          fmt, base)
            train_records += recs
            train_problems += probs
        train_records.sort(key=lambda r: r.id)
        notes["train_aug_from_voc"] = sum(1 for r in train_records if r.label_format == "png")

    val_records, val_problems = collect_records(
        NAME, val_split, vbase, [_voc_entry(i) for i in val_ids], "png", val_source)
    missing = [p.id for p in val_problems if "missing" in p.reason]
    if (missing or overlap) and not allow_missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(val_ids)} {val_split} ids are missing from "
                         f"the VOC tree at {vbase} ({_named(missing)})")
        if overlap:
            parts.append(f"{len(overlap)} {val_split} ids are also in SBD train, which would "
                         f"leak test images into training ({_named(overlap)})")
        raise LayoutError("; ".join(parts) + "; pass --allow-missing to go on with what is "
                          "present (counts go into the manifest)")
    notes.update(missing=len(missing), overlap=len(overlap))
    return Listing(train_records + val_records, train_problems + val_problems,
                   missing=len(missing), overlap=len(overlap), notes=notes)
