"""Raw dataset layout -> validated Parquet shards + manifest + quarantine, with Ray Data.

    records (driver: list files, stat them)      -> fingerprint; unchanged -> no-op
      -> Ray Data map_batches: decode + validate  -> rows (good) / reasons (bad)
      -> write_parquet per split into a hidden staging folder
      -> rename staging to versions/<version>/, then replace manifest.json atomically

An ingest that dies at any point leaves the previous version readable and no partial shard
visible: the only thing readers follow is manifest.json, and it changes last.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fcn_core.palettes import IGNORE_INDEX
from pipelines.shards import (
    MANIFEST,
    QUARANTINE,
    QUARANTINE_SCHEMA,
    ROW_SCHEMA,
    SCHEMA_VERSION,
    ManifestError,
    encode_png,
    read_manifest,
    write_json_atomic,
)
from pipelines.sources import Problem, RawRecord, load_example, source
from pipelines.sources import synthetic as synth

DATASETS = ("voc", "sbd", "nyud", "siftflow", "synthetic")
STAGING_PREFIX = ".staging-"
# What a decode task produces per example: the row, or the reason it was rejected.
STAGING_SCHEMA = ROW_SCHEMA.append(pa.field("reason", pa.string())) \
    .append(pa.field("source_path", pa.string())) \
    .append(pa.field("label_hist", pa.list_(pa.int64())))
# Shards carry each row's class pixel counts too (classes..., ignored): the manifest's
# histogram is their sum, and class-balanced sampling can use them without decoding labels.
SHARD_SCHEMA = ROW_SCHEMA.append(pa.field("label_hist", pa.list_(pa.int64())))

Log = Callable[[str], None]


@dataclass(frozen=True)
class IngestConfig:
    dataset: str  # voc | sbd | nyud | siftflow | synthetic (a generated VOC layout)
    root: Path  # the dataset as downloaded (for synthetic: where to generate it)
    out: Path  # shards go to <out>/<dataset>/
    splits: tuple[str, ...] | None = None  # None: every split the layout defines
    split_file: str | None = None  # a user-named split / list file (e.g. seg11valid.txt)
    shard_rows: int = 500  # rows per Parquet shard at most
    batch_size: int = 16  # records per decode task batch
    synthetic_size: tuple[int, int] = (64, 64)  # synthetic only: image H, W
    synthetic_counts: tuple[int, int] = (96, 32)  # synthetic only: train, val images


@dataclass
class IngestResult:
    dataset_dir: Path
    version: str
    skipped: bool  # sources unchanged since the current version: nothing was written
    rows: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)  # reason kind -> count
    bytes_written: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        if self.skipped:
            return (f"{self.dataset_dir}: sources unchanged, current version {self.version} "
                    "kept (nothing written)")
        rows = ", ".join(f"{s} {n}" for s, n in self.rows.items()) or "none"
        total = sum(self.rows.values())
        rej = ", ".join(f"{k} {n}" for k, n in sorted(self.rejected.items())) or "none"
        rate = total / self.seconds if self.seconds else 0.0
        return (f"{self.dataset_dir} version {self.version}\n"
                f"  rows: {rows} (total {total})\n"
                f"  rejected: {sum(self.rejected.values())} ({rej}); see {QUARANTINE}\n"
                f"  written: {self.bytes_written / 1e6:.1f} MB in {self.seconds:.1f} s "
                f"({rate:.1f} rows/s)")


_REASON_KINDS = (
    ("escapes", "path escape"), ("duplicate", "duplicate id"), ("empty file", "empty file"),
    ("missing", "missing file"), ("truncated", "truncated image"),
    ("does not match image size", "size mismatch"), ("out of range", "label out of range"),
    ("undecodable", "undecodable"),
)


def reason_kind(reason: str) -> str:
    """A short category of a quarantine reason, for summaries."""
    for needle, kind in _REASON_KINDS:
        if needle in reason:
            return kind
    return "other"


# ------------------------------------------------------------------- decode (Ray tasks)

def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _example_row(rec: RawRecord, dataset: str, num_classes: int) -> dict[str, Any]:
    """One record -> one staging row: the encoded example, or its rejection reason."""
    row: dict[str, Any] = {k: None for k in STAGING_SCHEMA.names}
    row.update(id=rec.id, dataset=dataset, split=rec.split, source_path=rec.image)
    arrays, reason = load_example(rec, num_classes)
    if reason is not None:
        row["reason"] = reason
        return row
    assert arrays is not None
    extras = dict(rec.extras)
    image = _read_bytes(rec.image)  # the original bytes: no lossy re-encode
    label = encode_png(arrays["label"])
    row.update(image=image, label=label, height=arrays["image"].shape[0],
               width=arrays["image"].shape[1],
               sha256=hashlib.sha256(image + label).hexdigest())
    if "label_geo" in arrays:
        row["label_geo"] = encode_png(arrays["label_geo"])
    if "depth" in arrays:
        row["depth"] = _read_bytes(extras["depth"])  # validated 16-bit PNG, kept as is
    if "hha" in arrays:
        row["hha"] = _read_bytes(extras["hha"])
    hist = np.bincount(arrays["label"].ravel(), minlength=256)
    row["label_hist"] = hist[:num_classes].tolist() + [int(hist[IGNORE_INDEX])]
    return row


def decode_batch(batch: pa.Table, dataset: str, num_classes: int, rejects_dir: str
                 ) -> pa.Table:
    """Ray Data UDF: records -> good rows in the shard schema (+ ``label_hist``). Rejected
    records go to a small Parquet file of their own in ``rejects_dir``, so one pass over
    the data yields both the shards and the quarantine."""
    good, bad = [], []
    for r in batch.to_pylist():
        rec = RawRecord(r["dataset"], r["split"], r["id"], r["image"], r["label"],
                        r["label_format"], tuple(tuple(e) for e in r["extras"]))
        row = _example_row(rec, dataset, num_classes)
        if row["reason"] is None:
            good.append(row)
        else:
            bad.append({"dataset": dataset, "split": rec.split, "id": rec.id,
                        "path": row["source_path"], "reason": row["reason"]})
    if bad:
        pq.write_table(pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA),
                       Path(rejects_dir) / f"{uuid.uuid4().hex}.parquet")
    return pa.Table.from_pylist(good, schema=SHARD_SCHEMA)


# ------------------------------------------------------------------------- the driver

def list_sources(cfg: IngestConfig, log: Log = print) -> tuple[str, int, list[RawRecord],
                                                                 list[Problem]]:
    """(layout, num_classes, records, problems); generates the synthetic layout if asked."""
    layout, root = cfg.dataset, cfg.root
    if cfg.dataset == "synthetic":
        layout = "voc"
        if not root.exists() or not any(root.iterdir()):
            n_train, n_val = cfg.synthetic_counts
            log(f"generating a synthetic VOC layout in {root} ({n_train} train + {n_val} val, "
                f"{cfg.synthetic_size[0]}x{cfg.synthetic_size[1]})")
            synth.write_voc(root, n_train=n_train, n_val=n_val, size=cfg.synthetic_size)
    reader = source(layout)
    records, problems = reader.list_records(root, cfg.splits, cfg.split_file)
    return layout, reader.NUM_CLASSES, records, problems


def source_fingerprint(cfg: IngestConfig, records: Sequence[RawRecord],
                       problems: Sequence[Problem]) -> str:
    """Changes when any listed file's size or mtime, the listing, or the settings change."""
    h = hashlib.sha256()
    h.update(f"schema={SCHEMA_VERSION} dataset={cfg.dataset} shard_rows={cfg.shard_rows}\n"
             .encode())
    for r in sorted(records, key=lambda r: (r.split, r.id)):
        for path in (r.image, r.label, *(p for _, p in r.extras)):
            st = os.stat(path)
            h.update(f"{r.split}\0{r.id}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for p in sorted(problems, key=lambda p: (p.split, p.id, p.reason)):
        h.update(f"problem\0{p.split}\0{p.id}\0{p.reason}\n".encode())
    return h.hexdigest()


def _current(dataset_dir: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(dataset_dir).data
    except ManifestError:
        return None


def _finalize_split(staging: Path, split: str, version: str, num_classes: int
                    ) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Give the shards Ray wrote stable names; return their manifest entries and the sum
    of their rows' label histograms (classes..., ignored)."""
    folder = staging / split
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    shards, hist = [], np.zeros(num_classes + 1, np.int64)
    for i, f in enumerate(files):
        final = folder / f"part-{i:05d}.parquet"
        f.rename(final)
        data = final.read_bytes()
        col = pq.read_table(final, columns=["label_hist"])["label_hist"]
        if len(col):
            hist += np.asarray(col.to_pylist(), np.int64).sum(axis=0)
        shards.append({
            "path": f"versions/{version}/{split}/{final.name}",
            "rows": len(col),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        })
    return shards, hist


def ingest(cfg: IngestConfig, log: Log = print) -> IngestResult:
    """Ingest one dataset. Re-running on unchanged sources returns at once (skipped=True)."""
    t0 = time.perf_counter()
    if cfg.dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}")
    if cfg.shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got shard_rows={cfg.shard_rows}")
    layout, num_classes, records, problems = list_sources(cfg, log)
    dataset_dir = cfg.out / cfg.dataset
    fingerprint = source_fingerprint(cfg, records, problems)
    current = _current(dataset_dir)
    if current and current["source"]["fingerprint"] == fingerprint:
        return IngestResult(dataset_dir, current["version"], skipped=True,
                            rows={s: v["rows"] for s, v in current["splits"].items()},
                            seconds=time.perf_counter() - t0)
    # Splits asked for by name are kept even when empty, so a user sees "train: 0 rows".
    split_names = list(dict.fromkeys([*(cfg.splits or ()), *(r.split for r in records),
                                      *(p.split for p in problems)]))
    log(f"ingest {cfg.dataset}: {len(records)} examples listed in splits "
        f"{', '.join(split_names) or '-'} under {cfg.root}; {len(problems)} rejected while "
        "listing")

    version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + fingerprint[:8]
    dataset_dir.mkdir(parents=True, exist_ok=True)
    for stale in dataset_dir.glob(STAGING_PREFIX + "*"):  # left by a killed ingest
        shutil.rmtree(stale, ignore_errors=True)
    staging = dataset_dir / f"{STAGING_PREFIX}{version}"
    staging.mkdir()
    try:
        manifest, quarantine = _run(cfg, layout, num_classes, records, problems, split_names,
                                    fingerprint, version, staging, log)
        write_json_atomic(staging / MANIFEST, manifest)
        versions = dataset_dir / "versions"
        versions.mkdir(exist_ok=True)
        os.rename(staging, versions / version)  # atomic on one file system
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_json_atomic(dataset_dir / MANIFEST, manifest)  # the switch readers follow
    written = sum(s["bytes"] for v in manifest["splits"].values() for s in v["shards"])
    return IngestResult(dataset_dir, version, skipped=False,
                        rows={s: v["rows"] for s, v in manifest["splits"].items()},
                        rejected=dict(Counter(reason_kind(q["reason"]) for q in quarantine)),
                        bytes_written=written, seconds=time.perf_counter() - t0)


def _run(cfg: IngestConfig, layout: str, num_classes: int, records: list[RawRecord],
         problems: list[Problem], split_names: list[str], fingerprint: str, version: str,
         staging: Path, log: Log) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Decode, validate and write every split into ``staging``; (manifest, quarantine)."""
    import ray
    import ray.data

    from pipelines.ray_env import init_ray

    log(init_ray())
    rejects = staging / "_rejected"
    rejects.mkdir()
    hists: dict[str, np.ndarray] = {}
    splits: dict[str, dict[str, Any]] = {}
    for split in split_names:
        items = [{**asdict(r), "extras": [list(e) for e in r.extras]}
                 for r in records if r.split == split]
        hists[split] = np.zeros(num_classes + 1, np.int64)
        splits[split] = {"shards": []}
        if not items:
            continue
        t0 = time.perf_counter()
        blocks = max(1, min(-(-len(items) // cfg.batch_size), 1000))
        (ray.data.from_items(items, override_num_blocks=blocks)
            .map_batches(decode_batch, batch_size=cfg.batch_size, batch_format="pyarrow",
                         num_cpus=1, fn_kwargs={"dataset": cfg.dataset,
                                                "num_classes": num_classes,
                                                "rejects_dir": str(rejects)})
            .write_parquet(str(staging / split), min_rows_per_file=cfg.shard_rows,
                           max_rows_per_file=cfg.shard_rows))
        shards, hists[split] = _finalize_split(staging, split, version, num_classes)
        splits[split]["shards"] = shards
        n = sum(sh["rows"] for sh in shards)
        log(f"  {split}: {n} of {len(items)} examples written in {len(shards)} shard(s), "
            f"{time.perf_counter() - t0:.1f} s")
    quarantine = [asdict(p) for p in problems]
    for f in sorted(rejects.glob("*.parquet")):
        quarantine += pq.read_table(f).to_pylist()
    shutil.rmtree(rejects)
    quarantine.sort(key=lambda q: (q["split"], q["id"]))
    pq.write_table(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA),
                   staging / QUARANTINE)
    from pipelines.sources import SOURCES

    classes = list(SOURCES[layout].CLASSES)
    for split in split_names:
        entry = splits.setdefault(split, {"shards": []})
        entry["rows"] = sum(s["rows"] for s in entry["shards"])
        entry["rejected"] = sum(1 for q in quarantine if q["split"] == split)
        entry["class_pixels"] = hists[split][:num_classes].tolist()
        entry["ignore_pixels"] = int(hists[split][num_classes])
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dataset": cfg.dataset,
        "layout": layout,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": classes,
        "num_classes": num_classes,
        "ignore_index": IGNORE_INDEX,
        "columns": SHARD_SCHEMA.names,
        "source": {"root": str(cfg.root.resolve()), "fingerprint": fingerprint,
                   "split_file": cfg.split_file},
        "splits": {s: {k: splits[s][k] for k in ("rows", "rejected", "shards", "class_pixels",
                                                 "ignore_pixels")} for s in split_names},
        "rejected": len(quarantine),
        "quarantine": f"versions/{version}/{QUARANTINE}",
    }
    return manifest, quarantine
