"""Class names and colour maps of the datasets."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255  # label value of void / object-border pixels: never scored, never learned

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)
# Gupta et al. ECCV 2014 40-class NYUDv2 task, in label order 1..40 (here 0..39).
NYUD_CLASSES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)
SIFTFLOW_CLASSES: tuple[str, ...] = (
    "awning", "balcony", "bird", "boat", "bridge", "building", "bus", "car", "cow", "crosswalk",
    "desert", "door", "fence", "field", "grass", "moon", "mountain", "person", "plant", "pole",
    "river", "road", "rock", "sand", "sea", "sidewalk", "sign", "sky", "staircase",
    "streetlight", "sun", "tree", "window",
)
SIFTFLOW_GEO_CLASSES: tuple[str, ...] = ("sky", "horizontal", "vertical")

CLASSES: dict[str, tuple[str, ...]] = {
    "voc": VOC_CLASSES,
    "sbd": VOC_CLASSES,
    "nyud": NYUD_CLASSES,
    "siftflow": SIFTFLOW_CLASSES,
    "siftflow_geo": SIFTFLOW_GEO_CLASSES,
}


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette (n, 3) uint8: class i's colour from the bits of i."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def colorize(label: np.ndarray, cmap: np.ndarray | None = None) -> np.ndarray:
    """Class ids (H, W) -> RGB (H, W, 3) in the VOC palette (255 = void colour)."""
    cmap = voc_colormap() if cmap is None else cmap
    return cmap[np.asarray(label, dtype=np.intp) % len(cmap)]
