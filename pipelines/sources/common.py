"""What every raw-layout reader shares: the record types, strict decoders and the split logic.

A reader only lists files (`list_records`); pixels are decoded later by the ingest with
`load_example`, so one bad file becomes one quarantine row instead of a failed run.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import scipy.io
from PIL import Image, UnidentifiedImageError

from fcn_core.palettes import IGNORE_INDEX, SIFTFLOW_GEO_CLASSES
from pipelines import images, storage
from pipelines.errors import UserError
from pipelines.storage import StoragePath

IGNORE = IGNORE_INDEX  # 255 in every decoded label


@dataclass(frozen=True)
class RawRecord:
    dataset: str  # "voc" | "sbd" | "nyud" | "siftflow"
    split: str  # e.g. "train", "val", "seg11valid"
    id: str  # e.g. "2008_000051", "5001" (nyud), "coast_arnat59" (siftflow)
    image: str  # location of the image file (absolute local path or URI)
    label: str  # location of the label file (png or mat)
    label_format: str  # "png" | "sbd-mat" | "nyud-mat" | "siftflow-mat" | "context-mat"
    extras: tuple[tuple[str, str], ...] = ()  # ("depth", path), ("hha", path), ("label_geo", path)


@dataclass(frozen=True)
class Problem:
    """A quarantine row: the reader never raises for one bad example."""

    dataset: str
    split: str
    id: str
    path: str
    reason: str


class LayoutError(UserError, ValueError):
    """The root is not the expected layout; the message is one line for a CLI user."""


@dataclass(frozen=True)
class Entry:
    """One id of a split file, with the files it needs, relative to the dataset root."""

    id: str
    files: tuple[tuple[str, str], ...]  # ("image", "JPEGImages/x.jpg"), ("label", ...), extras


# ---------------------------------------------------------------------------- decoders


def _read_file(path: str) -> bytes:
    """The bytes of one input file, from a local path or a URI. A missing or empty file is
    the example's fault (a quarantine row); a store that cannot be read (denied, endpoint
    down) is not: its StorageError fails the task instead of quarantining good data."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise ValueError(f"missing file {path}") from None
    if not data:
        raise ValueError("empty file")
    return data


_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _pil_error(name: str, e: Exception) -> ValueError:
    """PIL's many error types -> one readable ValueError."""
    if isinstance(e, UnidentifiedImageError):
        return ValueError(f"undecodable image: {name} is not a known image format")
    if "truncated" in str(e):
        return ValueError(f"truncated image {name}: {e}")
    return ValueError(f"undecodable image: {name}: {e}")


def _open_pil(path: str) -> Image.Image:
    """Open and fully decode; the caller closes the image."""
    data = _read_file(path)
    name = storage.name(path)
    try:
        im = Image.open(io.BytesIO(data))
    except _PIL_ERRORS as e:
        raise _pil_error(name, e) from e
    try:
        im.load()  # decode now: a truncated file only fails here, not at open()
    except _PIL_ERRORS as e:
        im.close()
        raise _pil_error(name, e) from e
    return im


def decode_image(path: str | Path) -> np.ndarray:
    """uint8 RGB (H, W, 3) by the rules of ``pipelines.images`` (16-bit scaled, alpha on
    black, palette, CMYK, grayscale; the pixel limit), so ingest and ``fcn predict`` accept
    and refuse the same photos with the same reasons (an ``ImageError``, a ValueError).
    EXIF orientation is deliberately not applied: labels are aligned to the stored pixels."""
    return images.decode_rgb(_read_file(str(path)), storage.name(str(path)), exif=False)


def decode_depth(path: str | Path) -> np.ndarray:
    """16-bit depth PNG in millimetres -> uint16 (H, W). 8-bit files are refused: they would
    silently lose the metric scale."""
    p = storage.path(path)
    with _open_pil(str(path)) as im:
        mode = im.mode
        a = np.array(im)
    if mode in ("I;16", "I;16L", "I;16B"):
        return a.astype(np.uint16)
    if mode == "I":  # some writers store 16-bit PNGs that PIL opens as 32-bit
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"depth {p.name}: values outside 0..65535")
        return a.astype(np.uint16)
    raise ValueError(f"depth {p.name} has mode {mode}; expected a 16-bit PNG (mode I;16)")


def _decode_png_label(path: StoragePath) -> np.ndarray:
    with _open_pil(str(path)) as im:
        # 'P': the palette indices are the class ids (never convert to RGB); 'L': values are ids.
        if im.mode not in ("P", "L"):
            raise ValueError(
                f"label {path.name} has mode {im.mode}; expected P or L (pixel values = class ids)"
            )
        return np.array(im, dtype=np.uint8)


def _load_mat(path: StoragePath) -> dict:
    data = _read_file(str(path))
    try:
        return scipy.io.loadmat(io.BytesIO(data))
    except NotImplementedError as e:  # scipy's answer to MATLAB v7.3 (HDF5) files
        raise ValueError(f"label {path.name}: MATLAB v7.3 (HDF5) .mat is not supported") from e
    except (scipy.io.matlab.MatReadError, ValueError, OSError, TypeError) as e:
        raise ValueError(f"undecodable label {path.name}: {e}") from e
    except IndexError as e:  # scipy's answer to a file shorter than the 128-byte header
        raise ValueError(f"undecodable label {path.name}: truncated .mat header") from e


def _mat_array(mat: dict, key: str, path: StoragePath) -> np.ndarray:
    if key not in mat:
        keys = ", ".join(k for k in mat if not k.startswith("__"))
        raise ValueError(f"label {path.name} has no key '{key}' (keys: {keys})")
    return mat[key]


def _integer_map(a: np.ndarray, path: StoragePath) -> np.ndarray:
    """A 2-D numeric class map -> int64, refusing non-integral values (MATLAB saves doubles)."""
    a = np.asarray(a)
    if a.ndim != 2 or a.dtype.kind not in "biuf":
        raise ValueError(f"label {path.name}: expected a 2-D numeric map, got {a.dtype} {a.shape}")
    if a.size == 0:
        raise ValueError(f"label {path.name}: empty label map")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a) & (a == np.round(a))):
        raise ValueError(f"label {path.name}: non-integral values")
    return a.astype(np.int64)


def _shift_void(a: np.ndarray, void: Sequence[int], path: StoragePath) -> np.ndarray:
    """Datasets that count classes from 1: void values -> 255, class k -> k - 1."""
    out = a - 1
    out[np.isin(a, void)] = IGNORE
    bad = np.unique(out[(out < 0) | (out > IGNORE)] + 1)
    if bad.size:
        raise ValueError(f"label {path.name}: values {bad[:8].tolist()} are not classes or void")
    return out.astype(np.uint8)


def _label_path(record: RawRecord, kind: str) -> StoragePath:
    if kind == "label":
        return storage.path(record.label)
    extras = dict(record.extras)
    if kind not in extras:
        raise ValueError(f"record {record.id} has no '{kind}' (has: {', '.join(extras) or '-'})")
    return storage.path(extras[kind])


def decode_label(record: RawRecord, kind: str = "label") -> np.ndarray:
    """uint8 (H, W) class ids from 0, 255 = ignore, in the dataset's documented convention."""
    path = _label_path(record, kind)
    fmt = record.label_format
    if fmt == "png":
        return _decode_png_label(path)
    if fmt == "sbd-mat":
        gt = _mat_array(_load_mat(path), "GTcls", path)
        try:
            seg = gt[0, 0]["Segmentation"]
        except (IndexError, ValueError, KeyError) as e:
            raise ValueError(f"label {path.name}: GTcls has no Segmentation field") from e
        a = _integer_map(seg, path)
        if a.min() < 0 or a.max() > IGNORE:  # SBD ids are already 0-based (0 = background)
            raise ValueError(f"label {path.name}: values outside 0..255")
        return a.astype(np.uint8)
    if fmt == "nyud-mat":
        a = _integer_map(_mat_array(_load_mat(path), "segmentation", path), path)
        return _shift_void(a, (0,), path)
    if fmt == "siftflow-mat":
        a = _integer_map(_mat_array(_load_mat(path), "S", path), path)
        # Reference siftflow_layers: geo -1 is set to 0, then every map is shifted by -1 in
        # uint8, so 0 (and geo -1) become 255.
        return _shift_void(a, (0, -1) if kind == "label_geo" else (0,), path)
    if fmt == "context-mat":
        from pipelines.sources import context

        a = _integer_map(_mat_array(_load_mat(path), "LabelMap", path), path)
        return context.decode(a, str(path))
    raise ValueError(f"unknown label_format {fmt!r}")


def _size_reason(name: str, shape: tuple[int, ...], image_shape: tuple[int, ...]) -> str | None:
    if shape[:2] == image_shape[:2]:
        return None
    h, w = shape[:2]
    return f"{name} size {h}x{w} does not match image size {image_shape[0]}x{image_shape[1]} (HxW)"


def _range_reason(name: str, label: np.ndarray, num_classes: int) -> str | None:
    bad = np.unique(label[(label >= num_classes) & (label != IGNORE)])
    if bad.size == 0:
        return None
    return f"{name} values out of range 0..{num_classes - 1} (or {IGNORE}): {bad[:8].tolist()}"


def load_example(
    record: RawRecord, num_classes: int, *, geo_classes: int = len(SIFTFLOW_GEO_CLASSES)
) -> tuple[dict[str, np.ndarray], None] | tuple[None, str]:
    """Decode and validate one record: ({"image", "label", extras...}, None) or (None, reason).
    image uint8 (H, W, 3), label / label_geo uint8 (H, W), depth uint16 (H, W),
    hha uint8 (H, W, 3)."""
    try:
        image = decode_image(record.image)
        arrays: dict[str, np.ndarray] = {"image": image, "label": decode_label(record)}
        for kind, path in record.extras:
            if kind == "label_geo":
                arrays[kind] = decode_label(record, kind)
            elif kind in ("depth", "rawdepth"):
                arrays[kind] = decode_depth(path)
            elif kind == "hha":
                arrays[kind] = decode_image(path)
            else:
                return None, f"unknown extra '{kind}'"
    except ValueError as e:
        return None, str(e)
    for name, a in arrays.items():
        reason = _size_reason(name, a.shape, image.shape)
        if reason:
            return None, reason
    limits = {"label": num_classes, "label_geo": geo_classes}
    for name, n in limits.items():
        if name not in arrays:
            continue
        reason = _range_reason(name, arrays[name], n)
        if reason:
            return None, reason
    return arrays, None


# ------------------------------------------------------------------------ layout + splits


def find_layout(root: StoragePath, is_layout: Callable[[StoragePath], bool], what: str,
                expected: str) -> StoragePath:
    """The one folder at root, one or two levels below it that is_layout accepts."""
    if not root.is_dir():
        raise LayoutError(f"no {what} layout under {root}: the folder does not exist")
    level = [root]
    for depth in range(3):  # root, its children, its grandchildren (e.g. VOCdevkit/VOC2012)
        if depth:
            level = sorted(c for p in level for c in _subdirs(p))
        hits = [p for p in level if is_layout(p)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            names = ", ".join(str(p) for p in hits)
            raise LayoutError(f"several {what} layouts under {root}: {names}; pass one as the root")
    raise LayoutError(f"no {what} layout under {root}: expected {expected}")


def _subdirs(p: StoragePath) -> list[StoragePath]:
    try:
        return [c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".")]
    except OSError:  # unreadable folder: it simply is not a candidate
        return []


def resolve_split_file(split_file: str | Path, root: StoragePath) -> StoragePath:
    """A user-named split file: as given (a URI, absolute or from the cwd), else relative to
    the root."""
    cands = [storage.path(split_file)]
    if storage.scheme(split_file) is None and not Path(split_file).is_absolute():
        cands.append(root / str(split_file))
    for cand in cands:
        if cand.is_file():
            return cand
    raise LayoutError(f"split file not found: {split_file} (also looked under {root})")


def choose_splits(
    split_dir: StoragePath,
    root: StoragePath,
    splits: Sequence[str] | None,
    split_file: str | Path | None,
) -> list[tuple[str, StoragePath]]:
    """(split name, split file) pairs. A split_file is named by its stem unless `splits` gives
    exactly one name for it; otherwise every <split>.txt in split_dir (or the ones asked for)."""
    if split_file is not None:
        path = resolve_split_file(split_file, root)
        if splits is not None and len(splits) != 1:
            raise ValueError(f"with split_file, splits must name one split, got splits={splits}")
        return [(splits[0] if splits else path.stem, path)]
    available = {p.stem: p for p in sorted(split_dir.glob("*.txt"))}
    if not available:
        raise LayoutError(f"no split files (*.txt) in {split_dir}: the layout lists each "
                          "split's ids there (e.g. train.txt, val.txt); add them, or name a "
                          "list with fcn ingest --split-file")
    if splits is None:
        return list(available.items())
    missing = [s for s in splits if s not in available]
    if missing:
        have = ", ".join(available) or "none"
        raise LayoutError(f"no split file {missing[0]}.txt in {split_dir} (available: {have})")
    return [(s, available[s]) for s in splits]


def read_lines(path: StoragePath) -> list[str]:
    """Non-blank stripped lines of a split file (an empty file is a valid empty split)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def escapes_root(rel: str) -> bool:
    """True when a path taken from a split file could leave the dataset root."""
    p = PurePosixPath(rel.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or "\x00" in rel


def _file_reason(root: StoragePath, role: str, rel: str) -> str | None:
    try:
        size = (root / rel).stat().st_size  # from a cached folder listing
    except (FileNotFoundError, NotADirectoryError):
        return f"missing {role} file {rel}"
    return f"empty file {rel}" if size == 0 else None


def collect_records(
    dataset: str,
    split: str,
    root: StoragePath,
    entries: Iterable[Entry],
    label_format: str,
    source: StoragePath,
) -> tuple[list[RawRecord], list[Problem]]:
    """Entries of one split -> records, with a Problem for escapes, duplicates, missing and
    empty files. One Problem per id, so the quarantine count equals the number of bad ids."""
    records: list[RawRecord] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    base = storage.path(root)
    for e in entries:
        if escapes_root(e.id) or any(escapes_root(rel) for _, rel in e.files):
            reason = "id escapes the dataset root"
            problems.append(Problem(dataset, split, e.id, str(source), reason))
            continue
        if e.id in seen:
            problems.append(
                Problem(dataset, split, e.id, str(source), f"duplicate id in split {split}")
            )
            continue
        seen.add(e.id)
        bad = [(rel, r) for role, rel in e.files if (r := _file_reason(base, role, rel))]
        if bad:
            problems.append(
                Problem(dataset, split, e.id, str(base / bad[0][0]), "; ".join(r for _, r in bad))
            )
            continue
        paths = {role: str(base / rel) for role, rel in e.files}
        extras = tuple((role, p) for role, p in paths.items() if role not in ("image", "label"))
        records.append(
            RawRecord(dataset, split, e.id, paths["image"], paths["label"], label_format, extras)
        )
    return records, problems
