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
    roots: tuple[str, ...] = ("root",)  # the --*-root options ingest needs
    protocols: tuple[str, ...] = ()  # --protocol choices, the default first
    # The reference evaluation leaves these out: classes absent from the test set (they leave
    # the class means) and images without annotation (they are not scored).
    eval_exclude_classes: tuple[str, ...] = ()
    eval_exclude_ids: tuple[str, ...] = ()
    # Splits made of others, listed in the manifest over the same shards (no second copy):
    # NYUD's trainval = train + val, what the reference trains on.
    composite: tuple[tuple[str, tuple[str, ...]], ...] = ()


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("voc", "VOCdevkit/VOC20xx: JPEGImages/, SegmentationClass/ or "
                   "SegmentationClassAug/, ImageSets/Segmentation/*.txt"),
    Dataset("sbd", "benchmark_RELEASE/dataset: img/, cls/*.mat, train.txt, val.txt"),
    Dataset("nyud", "data/images|depth|hha/img_NNNN.png, segmentation/img_NNNN.mat, "
                    "train|val|test.txt or splits.mat (else the shipped reference lists); "
                    "trainval = train + val", depth=True,
            composite=(("trainval", ("train", "val")),)),
    Dataset("siftflow", "Images/, SemanticLabels/, GeoLabels/ "
                        "(spatial_envelope_256x256_static_8outdoorcategories), trainval.txt, "
                        "test.txt", geo=True,
            eval_exclude_classes=("cow", "desert", "moon"),
            eval_exclude_ids=("highway_bost181", "street_urb506")),
    Dataset("pascal", "--voc-root VOCdevkit/VOC2011 (VOC2012 for --protocol trainaug) and "
                      "--sbd-root benchmark_RELEASE/dataset: protocol seg11valid = SBD train "
                      "-> seg11valid (FCN's), trainaug = train_aug -> VOC2012 val",
            roots=("voc", "sbd"), protocols=("seg11valid", "trainaug")),
    Dataset("context", "--voc-root VOCdevkit/VOC2010 (JPEGImages/, ImageSets/Main/train|val.txt) "
                       "and --context-root (trainval/<id>.mat, labels.txt, 59_labels.txt): "
                       "PASCAL-Context, 59 classes + background",
            roots=("voc", "context")),
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


def dir_name(name: str, protocol: str | None) -> str:
    """The folder under --out a dataset goes to: its name, plus the protocol unless default."""
    d = DATASETS[name]
    if not protocol or not d.protocols or protocol == d.protocols[0]:
        return name
    return f"{name}-{protocol}"


def layouts_help() -> str:
    """The ``layouts:`` epilog of ``fcn ingest --help``."""
    return "layouts:\n" + "\n".join(f"  {d.name:<10} {d.layout}" for d in DATASETS.values())
