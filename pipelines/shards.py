"""The Parquet shard format: schema, manifest, and reading shards back as tensors.

Layout of one ingested dataset (``<out>/<dataset>/``)::

    manifest.json                      the current version (replaced atomically)
    versions/<version>/<split>/part-00000.parquet
    versions/<version>/quarantine.parquet
    versions/<version>/manifest.json   the same manifest, kept with its version

Shard paths in a manifest are relative to ``<out>/<dataset>``.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from fcn_core.transforms import depth_to_tensor, hha_to_tensor, image_to_tensor, label_to_tensor

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


class ManifestError(ValueError):
    """No (readable) ingested dataset where one was expected."""


@dataclass(frozen=True)
class Manifest:
    root: Path  # <out>/<dataset>
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

    def shard_paths(self, split: str) -> list[str]:
        if split not in self.data["splits"]:
            raise ManifestError(f"split {split!r} is not in {self.root / MANIFEST} "
                                f"(splits: {', '.join(self.splits) or 'none'})")
        return [str(self.root / s["path"]) for s in self.data["splits"][split]["shards"]]


def read_manifest(dataset_dir: str | Path) -> Manifest:
    """The current manifest of ``<out>/<dataset>`` (or of a manifest.json path)."""
    p = Path(dataset_dir)
    path = p if p.name == MANIFEST else p / MANIFEST
    if not path.is_file():
        raise ManifestError(f"no ingested dataset at {path.parent}: {MANIFEST} not found "
                            "(run `fcn ingest` first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from e
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{path} has schema version {data.get('schema_version')}; this "
                            f"code reads version {SCHEMA_VERSION}: re-run `fcn ingest`")
    return Manifest(path.parent, data)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_split_table(dataset_dir: str | Path, split: str, columns: list[str] | None = None
                     ) -> pa.Table:
    """A whole split as one Arrow table, without Ray (small data, tests, notebooks)."""
    m = read_manifest(dataset_dir)
    tables = [pq.read_table(p, columns=columns) for p in m.shard_paths(split)]
    if not tables:
        return ROW_SCHEMA.empty_table() if columns is None else \
            pa.schema([ROW_SCHEMA.field(c) for c in columns]).empty_table()
    return pa.concat_tables(tables)


def open_split(dataset_dir: str | Path, split: str, **read_kwargs: Any):
    """A split as a Ray Dataset streamed from its shards (local Ray or RAY_ADDRESS)."""
    import ray.data

    paths = read_manifest(dataset_dir).shard_paths(split)
    if not paths:
        raise ManifestError(f"split {split!r} of {dataset_dir} has no rows")
    return ray.data.read_parquet(paths, **read_kwargs)


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
    """Original image bytes -> uint8 RGB (H, W, 3) (grayscale / CMYK converted)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)


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
    a = decode_arrays(row)
    out = {"image": image_to_tensor(a["image"], mean_bgr), "label": label_to_tensor(a["label"])}
    if "label_geo" in a:
        out["label_geo"] = label_to_tensor(a["label_geo"])
    if "depth" in a:
        out["depth"] = depth_to_tensor(a["depth"])
    if "hha" in a:
        out["hha"] = hha_to_tensor(a["hha"])
    return out
