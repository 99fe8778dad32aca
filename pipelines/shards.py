"""The Parquet shard format: schema, manifest, and reading shards back as tensors.

Layout of one ingested dataset (``<out>/<dataset>/``, a local folder or a bucket prefix)::

    manifest.json                      the current version (one PUT / an atomic replace)
    versions/<version>/<split>/part-<hash of its ids>.parquet
    versions/<version>/quarantine.parquet
    versions/<version>/manifest.json   the same manifest, kept with its version

Shard paths in a manifest are relative to ``<out>/<dataset>``.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines import storage
from pipelines.errors import UsageError, UserError

if TYPE_CHECKING:  # torch is imported where tensors are made: ingest workers never need it
    import torch

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.parquet"

# One example per row. Images keep their original encoded bytes (no lossy re-encode); labels
# are uint8 PNGs of class ids with 255 = ignore; depth is a 16-bit PNG in millimetres.
ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("image", pa.binary()),
    ("label", pa.binary()),
    ("label_geo", pa.binary()),  # SIFT Flow geometric classes, else null
    ("depth", pa.binary()),  # NYUD, else null
    ("hha", pa.binary()),  # NYUD, else null
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("sha256", pa.string()),  # of image bytes + label bytes: identifies the example's content
])
QUARANTINE_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("split", pa.string()), ("id", pa.string()),
    ("path", pa.string()), ("reason", pa.string()),
])


class ManifestError(UserError, ValueError):
    """No (readable) ingested dataset where one was expected."""


@dataclass(frozen=True)
class Manifest:
    root: str  # <out>/<dataset>: a local path or a URI
    data: dict[str, Any]

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    @property
    def num_classes(self) -> int:
        return int(self.data["num_classes"])

    @property
    def fingerprint(self) -> str:
        return str(self.data["source"]["fingerprint"])

    @property
    def location(self) -> str:
        """Where the manifest object is (what lineage records)."""
        return storage.join(self.root, MANIFEST)

    def shard_paths(self, split: str) -> list[str]:
        """Locations (paths or URIs) of the split's shards."""
        if split not in self.data["splits"]:
            raise ManifestError(f"split {split!r} is not in {self.location} "
                                f"(splits: {', '.join(self.splits) or 'none'})")
        return [storage.join(self.root, s["path"])
                for s in self.data["splits"][split]["shards"]]

    def shards(self, split: str) -> list[tuple[str, int]]:
        """(location, rows) of each of the split's shards, in the manifest's order."""
        rows = [int(s["rows"]) for s in self.data["splits"].get(split, {}).get("shards", [])]
        return list(zip(self.shard_paths(split), rows, strict=True))


def read_manifest(dataset_dir: str | os.PathLike[str]) -> Manifest:
    """The current manifest of ``<out>/<dataset>`` (or of a manifest.json location)."""
    loc = storage.normalize(dataset_dir)
    path = loc if storage.name(loc) == MANIFEST else storage.join(loc, MANIFEST)
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise ManifestError(f"no ingested dataset at {storage.parent(path)}: {MANIFEST} not "
                            "found (run `fcn ingest` first)") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from e
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{path} has schema version {data.get('schema_version')}; this "
                            f"code reads version {SCHEMA_VERSION}: re-run `fcn ingest`")
    return Manifest(storage.parent(path), data)


def read_split_table(dataset_dir: str | os.PathLike[str], split: str,
                     columns: list[str] | None = None) -> pa.Table:
    """A whole split as one Arrow table, without Ray (small data, tests, notebooks)."""
    m = read_manifest(dataset_dir)
    tables = []
    for loc in m.shard_paths(split):
        fs, path = storage.resolve(loc)
        tables.append(pq.read_table(path, columns=columns, filesystem=fs))
    if not tables:
        return ROW_SCHEMA.empty_table() if columns is None else \
            pa.schema([ROW_SCHEMA.field(c) for c in columns]).empty_table()
    return pa.concat_tables(tables)


def open_split(dataset_dir: str | os.PathLike[str], split: str, **read_kwargs: Any):
    """A split as a Ray Dataset streamed from its shards (local Ray or RAY_ADDRESS), read
    through pipelines.storage's filesystem (the same settings as every other access)."""
    import ray.data

    locations = read_manifest(dataset_dir).shard_paths(split)
    if not locations:
        raise ManifestError(f"split {split!r} of {dataset_dir} has no rows")
    fs = storage.filesystem(locations[0])
    paths = [storage.resolve(loc)[1] for loc in locations]
    return ray.data.read_parquet(paths, filesystem=fs, **read_kwargs)


# ----------------------------------------------------------------------- row <-> arrays

def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 (H, W) / (H, W, 3) or uint16 (H, W) array."""
    if array.dtype == np.uint16:
        im = Image.fromarray(array.astype("<u2"), mode="I;16")
    else:
        im = Image.fromarray(array)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)  # labels are tiny; favour speed
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        a = np.array(im)
    return a.astype(np.uint16) if a.dtype in (np.int32, np.uint16) else a


def decode_rgb(data: bytes) -> np.ndarray:
    """Original image bytes -> uint8 RGB (H, W, 3), by the same rules ingest validated them
    with (``pipelines.images``: 16-bit scaled, alpha composited on black; the stored pixels,
    no EXIF rotation, since the labels were drawn on those)."""
    from pipelines.images import decode_rgb as decode

    return decode(data, "image", exif=False)


def decode_arrays(row: dict[str, Any]) -> dict[str, np.ndarray]:
    """A shard row -> uint8 / uint16 arrays exactly as validated at ingest."""
    out = {"image": decode_rgb(row["image"]), "label": decode_png(row["label"])}
    for key in ("label_geo", "depth"):
        if row.get(key) is not None:
            out[key] = decode_png(row[key])
    if row.get("hha") is not None:
        out["hha"] = decode_rgb(row["hha"])
    return out


def decode_row(row: dict[str, Any], mean_bgr: tuple[float, float, float]
               ) -> dict[str, torch.Tensor]:
    """A shard row -> tensors for training / evaluation: ``image`` float (3, H, W) BGR minus
    ``mean_bgr``, ``label`` int64 (H, W), and where present ``label_geo`` int64 (H, W),
    ``depth`` float (1, H, W) log-depth, ``hha`` float (3, H, W)."""
    from fcn_core.transforms import (
        depth_to_tensor,
        hha_to_tensor,
        image_to_tensor,
        label_to_tensor,
    )

    a = decode_arrays(row)
    out = {"image": image_to_tensor(a["image"], mean_bgr), "label": label_to_tensor(a["label"])}
    if "label_geo" in a:
        out["label_geo"] = label_to_tensor(a["label_geo"])
    if "depth" in a:
        out["depth"] = depth_to_tensor(a["depth"])
    if "hha" in a:
        out["hha"] = hha_to_tensor(a["hha"])
    return out


def _shifted(a: np.ndarray, dy: int, dx: int, fill: Any) -> np.ndarray:
    """``a`` moved ``dy`` rows down and ``dx`` columns right (negative: up, left), the same
    size, the uncovered part ``fill``."""
    out = np.full_like(a, fill)
    h, w = a.shape[:2]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = a[ys, xs]
    return out


def _resized(a: np.ndarray, h: int, w: int, nearest: bool) -> np.ndarray:
    """(H, W) or (H, W, C) resized to (h, w): bilinear for images (uint8, 3 channels at a
    time through PIL), nearest for label and depth maps (exact values, numpy indexing)."""
    if nearest:
        rows = np.minimum((np.arange(h) + 0.5) * a.shape[0] / h, a.shape[0] - 1).astype(int)
        cols = np.minimum((np.arange(w) + 0.5) * a.shape[1] / w, a.shape[1] - 1).astype(int)
        return a[rows[:, None], cols]
    from PIL import Image

    parts = [np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c : c + 3])).resize(
        (w, h), Image.Resampling.BILINEAR)) for c in range(0, a.shape[2], 3)]
    return np.concatenate(parts, axis=2)


def _cropped(a: np.ndarray, y0: int, x0: int, size: int, fill: Any) -> np.ndarray:
    """The size x size window of ``a`` at (y0, x0), ``fill`` where it runs past ``a``."""
    out = np.full((size, size, *a.shape[2:]), fill, a.dtype)
    part = a[y0 : y0 + size, x0 : x0 + size]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def training_batch(batch: dict[str, Any], mirror: bool = False, seed: int | None = None,
                   multiple: int = 1, jitter: int = 0, scale: tuple[float, float] | None = None,
                   crop: int = 0) -> dict[str, np.ndarray]:
    """Ray Data UDF (batch_format="numpy"): shard rows -> one padded uint8 batch.

    ``image`` uint8 RGB (N, H, W, 3), or RGB + HHA (N, H, W, 6) for NYUD rows that carry
    HHA, ``depth`` uint16 (N, H, W) where present, and ``pad`` bool (N, H, W) marking
    padded pixels, which ``model_input`` sets to 0 after the mean subtraction (the
    reference's padding);
    ``label`` (and ``label_geo``) uint8 (N, H, W) padded with 255. Images of different sizes
    are padded at the bottom and right up to the largest, rounded up to ``multiple``.
    ``jitter`` > 0: each image (and its labels) moves by a random translation of up to that
    many pixels in each axis (the paper's jittering); what it uncovers is padding (the mean
    after ``model_input``, 255 in the labels, 0 in depth).
    ``scale`` (low, high): each image is resized by a factor drawn uniformly in it (labels
    and depth nearest); ``crop`` > 0: then a random crop x crop window of each, padded where
    the image is smaller (DeepLab's and PSPNet's training recipe).
    Staying in uint8 until the trainer moves 4x fewer bytes through Ray's object store;
    ``model_input`` does the float conversion (on the GPU when there is one).
    """
    rng = np.random.default_rng(seed)
    keys = [k for k in ("label", "label_geo", "depth") if k in batch and batch[k][0] is not None]
    images = [decode_rgb(b) for b in batch["image"]]
    labels = {k: [decode_png(b) for b in batch[k]] for k in keys}  # (H, W) maps: pad with 255
    if "hha" in batch and batch["hha"][0] is not None:
        hha = [decode_rgb(b) for b in batch["hha"]]
        images = [np.concatenate([im, h], axis=2) for im, h in zip(images, hha, strict=True)]
    if scale is not None:
        factors = rng.uniform(scale[0], scale[1], size=len(images))
        sizes = [(max(1, round(im.shape[0] * f)), max(1, round(im.shape[1] * f)))
                 for im, f in zip(images, factors, strict=True)]
        images = [_resized(im, h, w, False) for im, (h, w) in zip(images, sizes, strict=True)]
        labels = {k: [_resized(la, h, w, True) for la, (h, w) in zip(v, sizes, strict=True)]
                  for k, v in labels.items()}
    moved = [np.zeros(im.shape[:2], bool) for im in images]  # padding: jitter, crop
    if crop:
        corners = [(int(rng.integers(0, max(0, im.shape[0] - crop) + 1)),
                    int(rng.integers(0, max(0, im.shape[1] - crop) + 1))) for im in images]
        images = [_cropped(im, y, x, crop, 0) for im, (y, x) in zip(images, corners, strict=True)]
        moved = [_cropped(m, y, x, crop, True) for m, (y, x) in zip(moved, corners, strict=True)]
        labels = {k: [_cropped(la, y, x, crop, 255 if k != "depth" else 0)
                      for la, (y, x) in zip(v, corners, strict=True)]
                  for k, v in labels.items()}
    if mirror:
        flips = rng.random(len(images)) < 0.5
        images = [im[:, ::-1] if f else im for im, f in zip(images, flips, strict=True)]
        labels = {k: [la[:, ::-1] if f else la for la, f in zip(v, flips, strict=True)]
                  for k, v in labels.items()}
        moved = [m[:, ::-1] if f else m for m, f in zip(moved, flips, strict=True)]
    if jitter:
        shifts = rng.integers(-jitter, jitter + 1, size=(len(images), 2))
        images = [_shifted(im, int(dy), int(dx), 0)
                  for im, (dy, dx) in zip(images, shifts, strict=True)]
        moved = [_shifted(m, int(dy), int(dx), True)
                 for m, (dy, dx) in zip(moved, shifts, strict=True)]
        labels = {k: [_shifted(la, int(dy), int(dx), 255 if k != "depth" else 0)
                      for la, (dy, dx) in zip(v, shifts, strict=True)]
                  for k, v in labels.items()}
    h = -(-max(im.shape[0] for im in images) // multiple) * multiple
    w = -(-max(im.shape[1] for im in images) // multiple) * multiple
    out = {"image": np.zeros((len(images), h, w, images[0].shape[2]), np.uint8),
           "pad": np.zeros((len(images), h, w), bool)}
    out["pad"][:] = True
    for i, im in enumerate(images):
        out["image"][i, : im.shape[0], : im.shape[1]] = im
        out["pad"][i, : im.shape[0], : im.shape[1]] = moved[i]
    for k, v in labels.items():
        out[k] = np.full((len(images), h, w), 255 if k != "depth" else 0, v[0].dtype)
        for i, la in enumerate(v):
            out[k][i, : la.shape[0], : la.shape[1]] = la
    return out


def model_input(batch: dict[str, Any], mean_bgr: tuple[float, float, float],
                device: Any = "cpu", input: str = "rgb"
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A ``training_batch`` (numpy or torch) -> (x, labels) on ``device``, in the reference's
    conventions: x float32 (N, C, H, W) with padding at 0, where C and content follow
    ``input``: rgb = BGR minus mean (3), hha = HHA minus mean (3), rgbd = BGR + log depth (4),
    rgb-hha = BGR then HHA (6, late fusion). labels: {"label": int64 (N, H, W), ...}."""
    import torch

    from fcn_core.transforms import INPUTS, net_input

    if input not in INPUTS:
        raise UsageError(f"input must be one of rgb, hha, rgbd, rgb-hha, got input={input!r}")
    img = torch.as_tensor(batch["image"]).to(device, non_blocking=True)
    pad = torch.as_tensor(batch["pad"]).to(device, non_blocking=True)[:, None]
    if input in ("hha", "rgb-hha") and img.shape[-1] < 6:
        raise UsageError(f"input={input!r} needs HHA images; these rows have none")
    if input == "rgbd" and "depth" not in batch:
        raise UsageError("input='rgbd' needs depth; these rows have none")
    depth = (torch.as_tensor(batch["depth"]).to(device, non_blocking=True)
             if input == "rgbd" else None)
    x = net_input(img[..., :3], input, mean_bgr, hha=img[..., 3:6] if input in (
        "hha", "rgb-hha") else None, depth=depth).masked_fill(pad, 0.0)
    labels = {k: torch.as_tensor(batch[k]).to(device, non_blocking=True).long()
              for k in ("label", "label_geo") if k in batch}
    return x.contiguous(), labels
