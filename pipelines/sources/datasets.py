"""The one table of datasets: what the CLI offers, ingest reads, the generator writes and the
flows accept. Add a dataset here (and its reader in ``pipelines.sources``) and every command
knows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import UsageError


@dataclass(frozen=True)
class Dataset:
    name: str
    layout: str  # the on-disk layout as downloaded, for --help
    generated: bool = False  # written by pipelines.sources.synthetic, not downloaded
    depth: bool = False  # rows carry depth and HHA images (RGB-D, HHA and late-fusion nets)
    geo: bool = False  # rows carry a second label, label_geo (a second head)


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("voc", "VOCdevkit/VOC20xx: JPEGImages/, SegmentationClass/ or "
                   "SegmentationClassAug/, ImageSets/Segmentation/*.txt"),
    Dataset("sbd", "benchmark_RELEASE/dataset: img/, cls/*.mat, train.txt, val.txt"),
    Dataset("nyud", "data/images|depth|hha/img_NNNN.png, segmentation/img_NNNN.mat, "
                    "train|val|test.txt or splits.mat", depth=True),
    Dataset("siftflow", "Images/, SemanticLabels/, GeoLabels/ "
                        "(spatial_envelope_256x256_static_8outdoorcategories), trainval.txt, "
                        "test.txt", geo=True),
    Dataset("synthetic", "generates a small VOC layout at --root when it is empty, then "
                         "ingests it", generated=True),
)}
NAMES: tuple[str, ...] = tuple(DATASETS)
#: The layouts of real downloads (what the synthetic generator can imitate).
DOWNLOADED: tuple[str, ...] = tuple(n for n, d in DATASETS.items() if not d.generated)
DEPTH: tuple[str, ...] = tuple(n for n, d in DATASETS.items() if d.depth)
GEO: tuple[str, ...] = tuple(n for n, d in DATASETS.items() if d.geo)


def check(name: str) -> str:
    """``name`` if it is a known dataset, else a one-line usage error listing them."""
    if name not in DATASETS:
        raise UsageError(f"dataset must be one of {', '.join(NAMES)}, got {name!r}")
    return name


def layouts_help() -> str:
    """The ``layouts:`` epilog of ``fcn ingest --help``."""
    return "layouts:\n" + "\n".join(f"  {d.name:<10} {d.layout}" for d in DATASETS.values())
