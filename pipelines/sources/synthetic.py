"""Seeded synthetic datasets written in the four raw layouts, in the real file formats.

Scenes are learnable on purpose: each class has its own colour and stripe texture (colour
predicts class), drawn as filled rectangles / ellipses and 1-3 px thin bars (which only a
fine output stride can resolve, so FCN-8s should beat FCN-32s). `example()` returns the exact
arrays a writer stores, so tests can compare what a reader decodes with what was written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image

from fcn_core.palettes import SIFTFLOW_CLASSES, SIFTFLOW_GEO_CLASSES, voc_colormap
from pipelines.sources.datasets import DOWNLOADED

Size = tuple[int, int]  # (H, W)
SPLITS: dict[str, tuple[str, str]] = {  # (train split, val split) as each dataset names them
    "voc": ("train", "val"),
    "sbd": ("train", "val"),
    "nyud": ("train", "val"),
    "siftflow": ("trainval", "test"),  # FCN's siftflow lists
}
SIFTFLOW_CATEGORIES = (
    "coast", "forest", "highway", "insidecity", "mountain", "opencountry", "street", "tallbuilding",
)
SIFTFLOW_DIR = "spatial_envelope_256x256_static_8outdoorcategories"
NYUD_FIRST_FRAME = 5001  # the FCN test frames start at img_5001

# Internal class k (0 = background) -> the id stored in each dataset's files.
VOC_IDS = np.array([0, 1, 7, 12, 15], np.uint8)  # background, aeroplane, car, dog, person
NYUD_IDS = np.array([1, 2, 5, 7, 9], np.uint8)  # .mat values: wall, floor, chair, table, window
SIFTFLOW_IDS = np.array([28, 6, 32, 22, 8], np.int16)  # sky, building, tree, road, car
SIFTFLOW_GEO_IDS = np.array([1, 3, 3, 2, 3], np.int16)  # sky, vertical, vertical, horizontal, vert.
NUM_INTERNAL = len(VOC_IDS)

# Well separated base colours and per-class stripe textures (period_y, period_x, amplitude).
COLOURS = np.array(
    [(90, 120, 160), (220, 60, 50), (60, 190, 80), (240, 220, 60), (150, 70, 200)], np.float64
)
TEXTURES = ((0, 0, 4), (6, 0, 22), (0, 5, 22), (4, 4, 22), (3, -7, 22))
NYUD_ANGLE = np.array([40, 200, 90, 130, 170], np.uint8)  # HHA angle channel per class


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8 (H, W, 3)
    cls: np.ndarray  # int64 (H, W), internal classes 0..NUM_INTERNAL-1
    ring: np.ndarray  # bool (H, W): background pixels touching a filled shape (VOC-style border)


def _rect(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, h: int, w: int) -> np.ndarray:
    rh = rng.integers(max(2, h // 8), max(3, h // 2))
    rw = rng.integers(max(2, w // 8), max(3, w // 2))
    y0, x0 = rng.integers(0, h - rh + 1), rng.integers(0, w - rw + 1)
    return (yy >= y0) & (yy < y0 + rh) & (xx >= x0) & (xx < x0 + rw)


def _ellipse(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, h: int, w: int
) -> np.ndarray:
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(h / 10, h / 4), rng.uniform(w / 10, w / 4)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _bar(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, h: int, w: int) -> np.ndarray:
    t = int(rng.integers(1, 4))  # 1-3 px: thinner than a stride-32 output cell
    n = min(h, w)
    length = int(rng.integers(max(2, n // 3), n + 1))
    y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
    kind = int(rng.integers(3))
    if kind == 0:  # horizontal
        return (yy >= y0) & (yy < y0 + t) & (xx >= x0) & (xx < x0 + length)
    if kind == 1:  # vertical
        return (xx >= x0) & (xx < x0 + t) & (yy >= y0) & (yy < y0 + length)
    s = 1 if rng.integers(2) else -1  # diagonal
    d = (yy - y0) - s * (xx - x0)
    return (d >= 0) & (d < t) & (xx >= x0) & (xx < x0 + length)


def _texture(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(NUM_INTERNAL, H, W) stripe offsets, one pattern per class with a random phase."""
    out = []
    for py, px, amp in TEXTURES:
        f = (yy / py if py else 0 * yy) + (xx / px if px else 0 * xx)
        out.append(amp * np.sin(2 * np.pi * f + rng.uniform(0, 2 * np.pi)))
    return np.stack(out)


def scene(seed: int, index: int, size: Size = (64, 64)) -> Scene:
    """The index-th scene of a seed; independent of the other indices (own generator)."""
    h, w = size
    rng = np.random.default_rng([seed, index])
    yy, xx = np.ogrid[:h, :w]
    cls = np.zeros((h, w), np.int64)
    filled = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 3))):
        mask = (_rect if rng.integers(2) else _ellipse)(rng, yy, xx, h, w)
        cls[mask], filled[mask] = rng.integers(1, NUM_INTERNAL), True
    for _ in range(int(rng.integers(1, 3))):  # bars last, on top, so they stay thin
        mask = _bar(rng, yy, xx, h, w)
        cls[mask], filled[mask] = rng.integers(1, NUM_INTERNAL), False
    grown = filled.copy()  # 4-neighbour dilation by one pixel
    grown[1:] |= filled[:-1]
    grown[:-1] |= filled[1:]
    grown[:, 1:] |= filled[:, :-1]
    grown[:, :-1] |= filled[:, 1:]
    ring = grown & (cls == 0)
    tex = np.take_along_axis(_texture(yy, xx, rng), cls[None], 0)[0]
    rgb = (COLOURS[cls] + tex[..., None]) * rng.uniform(0.9, 1.1) + rng.normal(0, 3, (h, w, 3))
    return Scene(np.clip(rgb, 0, 255).round().astype(np.uint8), cls, ring)


def _nyud_depth(cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """16-bit depth in mm (H, W) and a matching HHA-like uint8 (H, W, 3), both class-dependent."""
    h, w = cls.shape
    yy = np.arange(h)[:, None]
    depth = (1200 + 350 * cls + 4 * yy).astype(np.uint16)
    disparity = np.clip(255 * 800 / depth, 0, 255).astype(np.uint8)
    height = np.broadcast_to((255 - yy * 200 // max(h, 1)).astype(np.uint8), (h, w))
    return depth, np.stack([disparity, height, NYUD_ANGLE[cls]], axis=-1)


def example(
    dataset: str, index: int, size: Size = (64, 64), seed: int = 0
) -> dict[str, np.ndarray]:
    """The arrays a writer stores for one index, in file values (before any reader shift):
    "image" (before JPEG), "label", and "label_geo" (siftflow) / "depth", "hha" (nyud)."""
    s = scene(seed, index, size)
    if dataset in ("voc", "sbd"):
        label = VOC_IDS[s.cls]
        if dataset == "voc":  # SBD has no void label; VOC marks object borders 255
            label[s.ring] = 255
        return {"image": s.image, "label": label}
    if dataset == "nyud":
        label = NYUD_IDS[s.cls]
        label[s.ring] = 0  # void
        depth, hha = _nyud_depth(s.cls)
        return {"image": s.image, "label": label, "depth": depth, "hha": hha}
    if dataset == "siftflow":
        sem, geo = SIFTFLOW_IDS[s.cls], SIFTFLOW_GEO_IDS[s.cls]
        sem[s.ring], geo[s.ring] = 0, -1  # the release's void values
        return {"image": s.image, "label": sem, "label_geo": geo}
    raise ValueError(f"dataset must be one of {DOWNLOADED}, got dataset={dataset!r}")


def example_id(dataset: str, index: int) -> str:
    if dataset == "nyud":
        return str(NYUD_FIRST_FRAME + index)
    if dataset == "siftflow":
        return f"{SIFTFLOW_CATEGORIES[index % len(SIFTFLOW_CATEGORIES)]}_synth{index:04d}"
    return f"synth_{index:06d}"


def plan(dataset: str, n_train: int, n_val: int) -> list[tuple[str, str, int]]:
    """(split, id, index) of every example a writer produces: train indices first."""
    train, val = SPLITS[dataset]
    n = n_train + n_val
    return [(train if i < n_train else val, example_id(dataset, i), i) for i in range(n)]


def _write_splits(folder: Path, rows: list[tuple[str, str, int]], dataset: str) -> None:
    for split in SPLITS[dataset]:
        ids = [i for s, i, _ in rows if s == split]
        (folder / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


def _mkdirs(base: Path, *dirs: str) -> None:
    for d in dirs:
        (base / d).mkdir(parents=True, exist_ok=True)


def _save_jpeg(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path, "JPEG", quality=95)


def write_voc(
    root: str | Path, n_train: int = 16, n_val: int = 8, size: Size = (64, 64), seed: int = 0
) -> Path:
    """root/VOCdevkit/VOC2012 with JPEGImages, 'P' SegmentationClass PNGs and ImageSets."""
    base = Path(root) / "VOCdevkit" / "VOC2012"
    _mkdirs(base, "JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
    palette = voc_colormap().ravel().tolist()
    rows = plan("voc", n_train, n_val)
    for _, id_, i in rows:
        ex = example("voc", i, size, seed)
        _save_jpeg(base / "JPEGImages" / f"{id_}.jpg", ex["image"])
        im = Image.fromarray(ex["label"])  # 'L'; putpalette turns it into 'P', keeping indices
        im.putpalette(palette)
        im.save(base / "SegmentationClass" / f"{id_}.png")
    _write_splits(base / "ImageSets" / "Segmentation", rows, "voc")
    return base


def _sbd_struct(label: np.ndarray) -> dict[str, np.ndarray]:
    """GTcls as the release stores it: Boundaries (20x1 cell of sparse maps), Segmentation,
    CategoriesPresent (column of class ids)."""
    edge = np.zeros(label.shape, bool)
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    edge[:-1] |= label[:-1] != label[1:]
    boundaries = np.empty((20, 1), dtype=object)
    for c in range(1, 21):
        boundaries[c - 1, 0] = scipy.sparse.csc_matrix((edge & (label == c)).astype(np.uint8))
    present = np.unique(label[label > 0]).astype(np.uint8).reshape(-1, 1)
    return {"Boundaries": boundaries, "Segmentation": label, "CategoriesPresent": present}


def write_sbd(
    root: str | Path, n_train: int = 16, n_val: int = 8, size: Size = (64, 64), seed: int = 0
) -> Path:
    """root/benchmark_RELEASE/dataset with img/*.jpg, cls/*.mat (GTcls struct), train/val.txt."""
    base = Path(root) / "benchmark_RELEASE" / "dataset"
    _mkdirs(base, "img", "cls")
    rows = plan("sbd", n_train, n_val)
    for _, id_, i in rows:
        ex = example("sbd", i, size, seed)
        _save_jpeg(base / "img" / f"{id_}.jpg", ex["image"])
        # A dict is saved as a MATLAB struct: loadmat(p)["GTcls"][0, 0]["Segmentation"].
        scipy.io.savemat(base / "cls" / f"{id_}.mat", {"GTcls": _sbd_struct(ex["label"])})
    _write_splits(base, rows, "sbd")
    return base


def write_nyud(
    root: str | Path, n_train: int = 16, n_val: int = 8, size: Size = (64, 64), seed: int = 0,
    n_test: int = 0,
) -> Path:
    """root in FCN's nyud layout: data/{images,depth,hha}/img_N.png, segmentation/img_N.mat,
    train.txt / val.txt (and test.txt with ``n_test`` more frames)."""
    base = Path(root)
    _mkdirs(base, "data/images", "data/depth", "data/hha", "segmentation")
    rows = plan("nyud", n_train, n_val)
    rows += [("test", example_id("nyud", i), i) for i in range(n_train + n_val,
                                                              n_train + n_val + n_test)]
    for _, id_, i in rows:
        ex = example("nyud", i, size, seed)
        Image.fromarray(ex["image"]).save(base / "data" / "images" / f"img_{id_}.png")
        Image.fromarray(ex["depth"]).save(base / "data" / "depth" / f"img_{id_}.png")  # I;16
        Image.fromarray(ex["hha"]).save(base / "data" / "hha" / f"img_{id_}.png")
        scipy.io.savemat(base / "segmentation" / f"img_{id_}.mat", {"segmentation": ex["label"]})
    _write_splits(base, rows, "nyud")
    if n_test:
        (base / "test.txt").write_text("".join(f"{i}\n" for s, i, _ in rows if s == "test"))
    return base


def write_siftflow(
    root: str | Path, n_train: int = 16, n_val: int = 8, size: Size = (64, 64), seed: int = 0
) -> Path:
    """root with Images/, SemanticLabels/, GeoLabels/ (key 'S' + 'names') and trainval/test.txt
    (n_train -> trainval, n_val -> test)."""
    base = Path(root)
    dirs = [f"{d}/{SIFTFLOW_DIR}" for d in ("Images", "SemanticLabels", "GeoLabels")]
    _mkdirs(base, *dirs)
    names = np.array(SIFTFLOW_CLASSES, dtype=object).reshape(1, -1)
    geo_names = np.array(SIFTFLOW_GEO_CLASSES, dtype=object).reshape(1, -1)
    rows = plan("siftflow", n_train, n_val)
    for _, id_, i in rows:
        ex = example("siftflow", i, size, seed)
        _save_jpeg(base / dirs[0] / f"{id_}.jpg", ex["image"])
        # MATLAB's default double, as a MATLAB-written 'S' would be.
        sem = {"S": ex["label"].astype(np.float64), "names": names}
        scipy.io.savemat(base / dirs[1] / f"{id_}.mat", sem)
        geo = {"S": ex["label_geo"].astype(np.float64), "names": geo_names}
        scipy.io.savemat(base / dirs[2] / f"{id_}.mat", geo)
    _write_splits(base, rows, "siftflow")
    return base


# PASCAL-Context: the labels.txt names each internal class is stored as, and the class id
# (0..59) the reader must give back. Background is a class outside the 59 (-> 0), and two of
# the three names the reference renames are here.
CONTEXT_FULL_NAMES = ("air conditioner", "aeroplane", "table", "bedclothes", "sky")
CONTEXT_IDS = np.array([0, 1, 11, 52, 50], np.uint8)  # background, aeroplane, diningtable,
#                                                        bedcloth, sky in the 59-class task
CONTEXT_RING_NAME = "accordion"  # object borders: another class outside the 59 -> 0


def write_context(
    root: str | Path, n_train: int = 16, n_val: int = 8, size: Size = (64, 64), seed: int = 0
) -> tuple[Path, Path]:
    """root/VOCdevkit/VOC2010 (JPEGImages, ImageSets/Main/train|val.txt) and
    root/pascal-context (trainval/<id>.mat with LabelMap, labels.txt with more than the 59
    names, 59_labels.txt); returns (VOC2010 folder, Context folder)."""
    from pipelines.sources import reference

    voc = Path(root) / "VOCdevkit" / "VOC2010"
    ctx = Path(root) / "pascal-context"
    _mkdirs(voc, "JPEGImages", "ImageSets/Main")
    _mkdirs(ctx, "trainval")
    task = reference.numbered_classes("pascal-context", "classes-59")[1:]
    renamed = {"diningtable": "table", "bedcloth": "bedclothes", "clothes": "cloth"}
    full = sorted({*(renamed.get(n, n) for n in task), *CONTEXT_FULL_NAMES, CONTEXT_RING_NAME,
                   "clothes tree", "pool table", "tableware"}, key=lambda n: n[::-1])
    (ctx / "labels.txt").write_text("".join(f"{i}: {n}\n" for i, n in enumerate(full, 1)))
    (ctx / "59_labels.txt").write_text("".join(f"{i}: {n}\n" for i, n in enumerate(task, 1)))
    index = {n.replace(" ", ""): i for i, n in enumerate(full, 1)}
    stored = np.array([index[n.replace(" ", "")] for n in CONTEXT_FULL_NAMES], np.uint16)
    rows = [("train" if i < n_train else "val", f"2010_{i:06d}", i)
            for i in range(n_train + n_val)]
    for _, id_, i in rows:
        s = scene(seed, i, size)
        _save_jpeg(voc / "JPEGImages" / f"{id_}.jpg", s.image)
        label_map = stored[s.cls]
        label_map[s.ring] = index[CONTEXT_RING_NAME]
        scipy.io.savemat(ctx / "trainval" / f"{id_}.mat", {"LabelMap": label_map})
    for split in ("train", "val"):
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text(
            "".join(f"{i}\n" for s, i, _ in rows if s == split))
    # ImageSets/Main also holds per-class lists, which are not splits of the task
    (voc / "ImageSets" / "Main" / "aeroplane_train.txt").write_text(f"{rows[0][1]}  1\n")
    return voc, ctx


def write_all(
    root: str | Path, n_train: int = 16, n_val: int = 8, size: Size = (64, 64), seed: int = 0
) -> dict[str, Path]:
    """All four layouts under root/{voc,sbd,nyud,siftflow}; returns each dataset folder."""
    r = Path(root)
    writers = {"voc": write_voc, "sbd": write_sbd, "nyud": write_nyud, "siftflow": write_siftflow}
    return {name: fn(r / name, n_train, n_val, size, seed) for name, fn in writers.items()}


@dataclass(frozen=True)
class PascalTrees:
    """What ``write_pascal`` wrote, and the protocol facts a test checks against."""

    voc: Path  # VOCdevkit/VOC<year>
    sbd: Path  # benchmark_RELEASE/dataset
    seg11valid: tuple[str, ...]  # ids of the shipped seg11valid list present in the VOC tree
    leak: str  # a VOC val id that is also in SBD train (not in seg11valid)
    voc_train: tuple[str, ...]
    voc_val: tuple[str, ...]
    sbd_train: tuple[str, ...]
    sbd_val: tuple[str, ...]


def write_pascal(root: str | Path, n_train: int = 8, n_val: int = 4, size: Size = (64, 64),
                 seed: int = 0, year: str = "2011") -> PascalTrees:
    """A VOC devkit and an SBD release whose ids overlap as the real ones do: VOC val holds
    the first ``n_val`` ids of the shipped seg11valid list plus one id that SBD train also
    lists (``leak``); VOC train shares ids with SBD train and SBD val; SBD val shares one id
    with VOC val. VOC labels carry 255 borders, SBD labels none."""
    from pipelines.sources import reference

    seg11 = tuple(reference.ids("pascal", "seg11valid")[:n_val])
    ids = [f"2099_{i:06d}" for i in range(2 * n_train + 4)]  # years no real id uses
    leak = ids[0]
    sbd_train = tuple(ids[: n_train])
    sbd_val = (*ids[n_train : n_train + 2], seg11[0])
    voc_train = (ids[1], ids[2], *ids[n_train + 2 : n_train + 4])
    voc_val = (*seg11, leak)
    voc = Path(root) / "VOCdevkit" / f"VOC{year}"
    sbd = Path(root) / "benchmark_RELEASE" / "dataset"
    _mkdirs(voc, "JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
    _mkdirs(sbd, "img", "cls")
    palette = voc_colormap().ravel().tolist()
    index = {id_: i for i, id_ in enumerate(dict.fromkeys([*voc_train, *voc_val, *sbd_train,
                                                           *sbd_val]))}
    for id_ in dict.fromkeys([*voc_train, *voc_val]):
        ex = example("voc", index[id_], size, seed)
        _save_jpeg(voc / "JPEGImages" / f"{id_}.jpg", ex["image"])
        im = Image.fromarray(ex["label"])
        im.putpalette(palette)
        im.save(voc / "SegmentationClass" / f"{id_}.png")
    for id_ in dict.fromkeys([*sbd_train, *sbd_val]):
        ex = example("sbd", index[id_], size, seed)
        _save_jpeg(sbd / "img" / f"{id_}.jpg", ex["image"])
        scipy.io.savemat(sbd / "cls" / f"{id_}.mat", {"GTcls": _sbd_struct(ex["label"])})
    for folder, name, split in ((voc / "ImageSets/Segmentation", "train", voc_train),
                                (voc / "ImageSets/Segmentation", "val", voc_val),
                                (sbd, "train", sbd_train), (sbd, "val", sbd_val)):
        (folder / f"{name}.txt").write_text("".join(f"{i}\n" for i in split))
    return PascalTrees(voc, sbd, seg11, leak, voc_train, voc_val, sbd_train, sbd_val)
