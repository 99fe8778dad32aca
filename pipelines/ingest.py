"""Raw dataset layout -> validated Parquet shards + manifest + quarantine, with Ray Data.

    records (driver: list the files once, stat them from the listings) -> fingerprint;
                                                                 unchanged -> no-op
      -> Ray Data map_batches: decode + validate  -> rows, each good or with its reason
      -> Ray Data map_batches: write one shard    -> a metadata row per shard
                                                     + the rejected rows (quarantine)
      -> versions/<version>/..., then versions/<version>/manifest.json,
         then <dataset>/manifest.json (one PUT: the switch readers follow)

Works the same on a local disk and in a bucket (object stores have no rename): a version is
written under its own prefix and the manifest last, so an ingest that dies at any point
leaves the previous version readable and no reader ever sees half a version. Rejected rows
come out of the Ray Data pipeline like the shard metadata (no files written on the side by
a task), and shard names are the hash of their rows' ids, so a retried Ray task can neither
duplicate nor lose a quarantine row or a shard.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fcn_core.palettes import IGNORE_INDEX
from pipelines import storage
from pipelines.errors import UsageError
from pipelines.shards import (
    MANIFEST,
    QUARANTINE,
    QUARANTINE_SCHEMA,
    ROW_SCHEMA,
    SCHEMA_VERSION,
    ManifestError,
    encode_png,
    read_manifest,
)
from pipelines.sources import (
    LayoutError,
    Problem,
    RawRecord,
    datasets,
    load_example,
    source,
)
from pipelines.sources import synthetic as synth
from pipelines.storage import StoragePath

# What a decode task produces per example: the row, or the reason it was rejected.
STAGING_SCHEMA = ROW_SCHEMA.append(pa.field("reason", pa.string())) \
    .append(pa.field("source_path", pa.string())) \
    .append(pa.field("label_hist", pa.list_(pa.int64())))
# Shards carry each row's class pixel counts too (classes..., ignored): the manifest's
# histogram is their sum, and class-balanced sampling can use them without decoding labels.
SHARD_SCHEMA = ROW_SCHEMA.append(pa.field("label_hist", pa.list_(pa.int64())))
# What a write task returns: one row per shard written and one per rejected example.
RESULT_SCHEMA = pa.schema([
    ("kind", pa.string()),  # "shard" | "reject"
    ("split", pa.string()),
    ("id", pa.string()),  # reject: the example id; shard: its first id
    ("path", pa.string()),  # shard: relative to <out>/<dataset>; reject: the source file
    ("reason", pa.string()),  # reject only
    ("rows", pa.int64()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    ("label_hist", pa.list_(pa.int64())),  # shard: the sum over its rows
])

Log = Callable[[str], None]


ENGINES = ("auto", "ray", "local")
# engine auto: up to this many listed examples are decoded in the calling process. Measured
# (bench/bench_ingest.py): below a few hundred small images Ray Data's planning, task and
# worker start cost more than the decoding; the rows, shards and manifest are the same.
LOCAL_MAX_RECORDS = 256


@dataclass(frozen=True)
class IngestConfig:
    dataset: str  # one of pipelines.sources.datasets.NAMES (synthetic: a generated VOC layout)
    root: str  # the dataset as downloaded: a local path or a URI (pascal / context: the VOC
    #            devkit; synthetic: where to generate it)
    out: str  # shards go to <out>/<dataset>/ (<out>/<dataset>-<protocol>/ for a protocol
    #           other than the default): a local path or a URI
    splits: tuple[str, ...] | None = None  # None: every split the layout defines
    split_file: str | None = None  # a user-named split / list file (e.g. seg11valid.txt)
    shard_rows: int = 500  # rows per Parquet shard at most
    batch_size: int = 16  # records per decode task batch
    synthetic_size: tuple[int, int] = (128, 128)  # synthetic only: image H, W (the demo's)
    synthetic_counts: tuple[int, int] = (96, 32)  # synthetic only: train, val images
    sbd_root: str | None = None  # pascal: SBD's benchmark_RELEASE/dataset
    context_root: str | None = None  # context: the PASCAL-Context annotations
    protocol: str | None = None  # pascal: seg11valid (default) | trainaug
    allow_missing: bool = False  # pascal: go on when validation ids are missing / leak
    compute_hha: bool = False  # nyud: HHA computed from depth in the decode step
    engine: str = "auto"  # ray (Ray Data) | local (this process) | auto: local for at most
    #                       LOCAL_MAX_RECORDS examples (where Ray Data's start costs more)
    #                       unless RAY_ADDRESS names a cluster

    def __post_init__(self) -> None:  # Paths and URIs alike become location strings
        for key in ("root", "out", "sbd_root", "context_root"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, storage.as_location(getattr(self, key)))
        if self.engine not in ENGINES:
            raise UsageError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")

    @property
    def dataset_dir(self) -> str:
        return storage.join(self.out, datasets.dir_name(self.dataset, self.protocol))


@dataclass
class IngestResult:
    dataset_dir: str  # <out>/<dataset>: a local path or a URI
    version: str
    skipped: bool  # sources unchanged since the current version: nothing was written
    rows: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)  # reason kind -> count
    bytes_written: int = 0
    seconds: float = 0.0

    composite: tuple[str, ...] = ()  # splits made of others (their rows are counted there)

    @property
    def total_rows(self) -> int:
        return sum(n for s, n in self.rows.items() if s not in self.composite)

    def summary(self) -> str:
        if self.skipped:
            return (f"{self.dataset_dir}: sources unchanged, current version {self.version} "
                    "kept (nothing written)")
        rows = ", ".join(f"{s} {n}" for s, n in self.rows.items()) or "none"
        total = self.total_rows
        rej = ", ".join(f"{k} {n}" for k, n in sorted(self.rejected.items())) or "none"
        rate = total / self.seconds if self.seconds else 0.0
        return (f"{self.dataset_dir} version {self.version}\n"
                f"  rows: {rows} (total {total})\n"
                f"  rejected: {sum(self.rejected.values())} ({rej}); see "
                f"versions/{self.version}/{QUARANTINE}\n"
                f"  written: {self.bytes_written / 1e6:.1f} MB in {self.seconds:.1f} s "
                f"({rate:.1f} rows/s)")


_REASON_KINDS = (
    ("escapes", "path escape"), ("duplicate", "duplicate id"), ("empty file", "empty file"),
    ("missing", "missing file"), ("truncated", "truncated image"),
    ("does not match image size", "size mismatch"), ("out of range", "label out of range"),
    ("undecodable", "undecodable"), ("too large", "image too large"),
)


def reason_kind(reason: str) -> str:
    """A short category of a quarantine reason, for summaries."""
    for needle, kind in _REASON_KINDS:
        if needle in reason:
            return kind
    return "other"


# ------------------------------------------------------------------- decode (Ray tasks)

def _example_row(rec: RawRecord, dataset: str, num_classes: int, compute_hha: bool = False
                 ) -> dict[str, Any]:
    """One record -> one staging row: the encoded example, or its rejection reason."""
    row: dict[str, Any] = {k: None for k in STAGING_SCHEMA.names}
    row.update(id=rec.id, dataset=dataset, split=rec.split, source_path=rec.image)
    arrays, reason = load_example(rec, num_classes)
    if reason is not None:
        row["reason"] = reason
        return row
    assert arrays is not None
    extras = dict(rec.extras)
    image = storage.read_bytes(rec.image)  # the original bytes: no lossy re-encode
    label = encode_png(arrays["label"])
    row.update(image=image, label=label, height=arrays["image"].shape[0],
               width=arrays["image"].shape[1],
               sha256=hashlib.sha256(image + label).hexdigest())
    if "label_geo" in arrays:
        row["label_geo"] = encode_png(arrays["label_geo"])
    if "depth" in arrays:
        row["depth"] = storage.read_bytes(extras["depth"])  # validated 16-bit PNG, as is
    if compute_hha:
        from pipelines.sources.hha import depth_to_hha

        try:
            hha = depth_to_hha(arrays["depth"], raw_mm=arrays.get("rawdepth"))
        except ValueError as e:
            return {**{k: None for k in STAGING_SCHEMA.names}, "id": rec.id,
                    "dataset": dataset, "split": rec.split, "source_path": extras["depth"],
                    "reason": f"no HHA from depth {storage.name(extras['depth'])}: {e}"}
        row["hha"] = encode_png(hha)
    elif "hha" in arrays:
        row["hha"] = storage.read_bytes(extras["hha"])
    hist = np.bincount(arrays["label"].ravel(), minlength=256)
    row["label_hist"] = hist[:num_classes].tolist() + [int(hist[IGNORE_INDEX])]
    return row


def decode_batch(batch: pa.Table, dataset: str, num_classes: int, compute_hha: bool = False
                 ) -> pa.Table:
    """Ray Data UDF: records -> staging rows (good rows, and rejected ones with a reason)."""
    rows = []
    for r in batch.to_pylist():
        rec = RawRecord(r["dataset"], r["split"], r["id"], r["image"], r["label"],
                        r["label_format"], tuple(tuple(e) for e in r["extras"]))
        rows.append(_example_row(rec, dataset, num_classes, compute_hha))
    return pa.Table.from_pylist(rows, schema=STAGING_SCHEMA)


def write_shard(batch: pa.Table, folder: str, rel: str, num_classes: int) -> pa.Table:
    """Ray Data UDF: staging rows -> one Parquet shard of the good rows in ``folder``, and
    the result rows (the shard's metadata, every rejected row). The shard's name is the hash
    of its ids: a retried task writes the same object again, never a second one."""
    rejected = batch.filter(pc.is_valid(batch["reason"]))
    good = batch.filter(pc.is_null(batch["reason"]))
    out: list[dict[str, Any]] = [
        {"kind": "reject", "split": r["split"], "id": r["id"], "path": r["source_path"],
         "reason": r["reason"]} for r in rejected.select(["split", "id", "source_path",
                                                          "reason"]).to_pylist()]
    if good.num_rows:
        table = good.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
        ids = table["id"].to_pylist()
        digest = hashlib.sha256("\0".join(ids).encode()).hexdigest()[:20]
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        storage.write_bytes(storage.join(folder, f"part-{digest}.parquet"), data)
        hist = np.asarray(table["label_hist"].to_pylist(), np.int64).sum(axis=0)
        out.append({"kind": "shard", "split": table["split"][0].as_py(), "id": min(ids),
                    "path": f"{rel}/part-{digest}.parquet", "rows": table.num_rows,
                    "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "label_hist": hist.tolist()})
    return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)


# ------------------------------------------------------------------------- the driver

@dataclass
class Listing:
    layout: str  # the reader: voc | sbd | nyud | siftflow
    num_classes: int
    records: list[RawRecord]
    problems: list[Problem]
    root: StoragePath  # holds the folder listings the reader made (stats come from them)
    notes: dict[str, Any] = field(default_factory=dict)  # protocol facts for the manifest


SYNTHETIC_PARAMS = "synthetic.json"  # in a generated root: what it was generated with


def _synthetic_params(cfg: IngestConfig) -> dict[str, list[int]]:
    return {"size": list(cfg.synthetic_size), "counts": list(cfg.synthetic_counts)}


def _generate_synthetic(cfg: IngestConfig, log: Log) -> None:
    n_train, n_val = cfg.synthetic_counts
    log(f"generating a synthetic VOC layout in {cfg.root} ({n_train} train + {n_val} val, "
        f"{cfg.synthetic_size[0]}x{cfg.synthetic_size[1]})")
    with tempfile.TemporaryDirectory() as d:  # generated here, then copied (or uploaded)
        synth.write_voc(Path(d), n_train=n_train, n_val=n_val, size=cfg.synthetic_size)
        storage.write_json(os.path.join(d, SYNTHETIC_PARAMS), _synthetic_params(cfg))
        storage.copy_tree(d, cfg.root)


def _check_synthetic(cfg: IngestConfig) -> None:
    """A root generated before with other parameters is refused: the shards (and the cache
    key, which holds the parameters) would describe images the root does not have."""
    marker = storage.join(cfg.root, SYNTHETIC_PARAMS)
    if not storage.exists(marker):  # not generated by us (or before the marker): as it is
        return
    had, want = storage.read_json(marker), _synthetic_params(cfg)
    if had != want:
        def say(p: dict[str, list[int]]) -> str:
            return (f"{p['size'][0]}x{p['size'][1]} images, {p['counts'][0]} train + "
                    f"{p['counts'][1]} val")

        raise UsageError(f"{cfg.root} holds a synthetic set generated with {say(had)}; this "
                         f"asks for {say(want)}: give another --root, or delete it to have it "
                         "generated again")


def list_sources(cfg: IngestConfig, log: Log = print) -> Listing:
    """The records of the dataset at ``cfg.root``; generates the synthetic layout if asked."""
    layout = cfg.dataset
    if cfg.dataset == "pascal":
        return _list_pascal(cfg)
    if cfg.dataset == "context":
        return _list_context(cfg)
    if cfg.dataset == "synthetic":
        layout = "voc"
        if not storage.listdir(cfg.root):
            _generate_synthetic(cfg, log)
        _check_synthetic(cfg)
    reader = source(layout)
    root = storage.path(cfg.root)
    records, problems = reader.list_records(root, _read_splits(cfg), cfg.split_file)
    return Listing(layout, reader.NUM_CLASSES, records, problems, root)


def _read_splits(cfg: IngestConfig) -> tuple[str, ...] | None:
    """The splits to read: a composite split asked for by name (nyud trainval) is read as
    its parts, unless the layout has a list of its own (splits.mat's trainval)."""
    if cfg.splits is None or cfg.split_file is not None:
        return cfg.splits
    parts = dict(datasets.DATASETS[cfg.dataset].composite)
    out: list[str] = []
    for s in cfg.splits:
        out += parts[s] if s in parts and not _has_list(cfg, s) else (s,)
    return tuple(dict.fromkeys(out))


def _has_list(cfg: IngestConfig, split: str) -> bool:
    root = storage.path(cfg.root)
    try:
        base = source(cfg.dataset).find_root(root)
    except Exception:  # the reader reports a bad layout itself, in its own words
        return True
    return (base / f"{split}.txt").is_file() or (base / "splits.mat").is_file()


def _check_roots(cfg: IngestConfig) -> None:
    """The --*-root options a dataset needs, and --protocol, as one-line usage errors."""
    d = datasets.DATASETS[cfg.dataset]
    for name in d.roots[1:]:
        if getattr(cfg, f"{name}_root") is None:
            raise UsageError(f"{cfg.dataset} needs --{name}-root as well as --{d.roots[0]}-root")
    for name in ("sbd", "context"):
        if getattr(cfg, f"{name}_root") is not None and name not in d.roots:
            raise UsageError(f"--{name}-root is not used by {cfg.dataset}")
    if cfg.compute_hha and not d.depth:
        raise UsageError(f"--compute-hha makes HHA from depth, which {cfg.dataset} has not")
    if d.protocols and cfg.splits:
        raise UsageError(f"{cfg.dataset} makes its splits from --protocol "
                         f"({', '.join(d.protocols)}), not --splits")
    if cfg.protocol is not None and cfg.protocol not in d.protocols:
        have = f"one of {', '.join(d.protocols)}" if d.protocols else "not used"
        raise UsageError(f"--protocol for {cfg.dataset} is {have}, got {cfg.protocol!r}")


def check_sources(cfg: IngestConfig, layouts: bool = True) -> None:
    """What can be checked before anything starts, in one line each: the --*-root options
    the dataset needs, and (``layouts``) that each root holds its layout: a few folder
    lookups, no file listing. A synthetic root is generated when empty, so only its options
    are checked. ``fcn run`` and ``fcn experiment`` call it before Prefect and Ray start."""
    datasets.check(cfg.dataset)
    _check_roots(cfg)
    if not layouts:
        return
    root = storage.path(cfg.root)
    if cfg.dataset == "pascal":
        from pipelines.sources import sbd, voc

        assert cfg.sbd_root is not None
        voc.find_root(root)
        sbd.find_root(root.view(cfg.sbd_root))
    elif cfg.dataset == "context":
        from pipelines.sources import context

        assert cfg.context_root is not None
        context.find_roots(root, root.view(cfg.context_root))
    elif cfg.dataset != "synthetic":
        source(cfg.dataset).find_root(root)


def _list_pascal(cfg: IngestConfig) -> Listing:
    from pipelines.sources import pascal

    assert cfg.sbd_root is not None
    root = storage.path(cfg.root)
    got = pascal.list_records(root, root.view(cfg.sbd_root), cfg.protocol or
                              pascal.DEFAULT_PROTOCOL, allow_missing=cfg.allow_missing,
                              split_file=cfg.split_file)
    return Listing("pascal", pascal.NUM_CLASSES, got.records, got.problems, root, got.notes)


def _list_context(cfg: IngestConfig) -> Listing:
    from pipelines.sources import context

    assert cfg.context_root is not None
    root = storage.path(cfg.root)
    records, problems = context.list_records(root, root.view(cfg.context_root), cfg.splits,
                                             cfg.split_file)
    return Listing("context", context.NUM_CLASSES, records, problems, root,
                   {"context_root": cfg.context_root})


def source_fingerprint(cfg: IngestConfig, listing: Listing) -> str:
    """Changes when any listed file's size or mtime, the listing, or the settings change.
    Sizes and mtimes come from the folder listings the reader already made."""
    h = hashlib.sha256()
    h.update(f"schema={SCHEMA_VERSION} dataset={cfg.dataset} shard_rows={cfg.shard_rows} "
             f"protocol={cfg.protocol} allow_missing={cfg.allow_missing} "
             f"compute_hha={cfg.compute_hha}\n".encode())
    for r in sorted(listing.records, key=lambda r: (r.split, r.id)):
        for p in (r.image, r.label, *(p for _, p in r.extras)):
            st = listing.root.view(p).stat()
            h.update(f"{r.split}\0{r.id}\0{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for p in sorted(listing.problems, key=lambda p: (p.split, p.id, p.reason)):
        h.update(f"problem\0{p.split}\0{p.id}\0{p.reason}\n".encode())
    return h.hexdigest()


def _current(dataset_dir: str) -> dict[str, Any] | None:
    try:
        return read_manifest(dataset_dir).data
    except ManifestError:
        return None


def ingest(cfg: IngestConfig, log: Log = print) -> IngestResult:
    """Ingest one dataset. Re-running on unchanged sources returns at once (skipped=True)."""
    t0 = time.perf_counter()
    datasets.check(cfg.dataset)
    if cfg.shard_rows < 1:
        raise UsageError(f"shard_rows must be >= 1, got shard_rows={cfg.shard_rows}")
    _check_roots(cfg)
    storage.check_writable(cfg.out)  # a missing bucket fails now, not after the decoding
    listing = list_sources(cfg, log)
    if cfg.compute_hha and any("depth" not in dict(r.extras) for r in listing.records):
        raise LayoutError(f"--compute-hha needs the depth maps (data/depth/img_N.png, 16-bit "
                          f"millimetres) under {cfg.root}")
    dataset_dir = cfg.dataset_dir
    fingerprint = source_fingerprint(cfg, listing)
    current = _current(dataset_dir)
    if current and current["source"]["fingerprint"] == fingerprint:
        return IngestResult(dataset_dir, current["version"], skipped=True,
                            rows={s: v["rows"] for s, v in current["splits"].items()},
                            seconds=time.perf_counter() - t0,
                            composite=_composite_names(current))
    # Splits asked for by name are kept even when empty, so a user sees "train: 0 rows".
    split_names = list(dict.fromkeys([*(_read_splits(cfg) or ()),
                                      *(r.split for r in listing.records),
                                      *(p.split for p in listing.problems)]))
    log(f"ingest {cfg.dataset}: {len(listing.records)} examples listed in splits "
        f"{', '.join(split_names) or '-'} under {cfg.root}; {len(listing.problems)} rejected "
        "while listing")

    version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + fingerprint[:8]
    version_dir = storage.join(dataset_dir, "versions", version)
    try:
        manifest, quarantine = _run(cfg, listing, split_names, fingerprint, version,
                                    version_dir, log)
        _publish(version_dir, manifest)
    except BaseException:
        try:  # unreferenced either way; a killed ingest leaves an unreferenced folder
            storage.delete_dir(version_dir)
        except OSError as e:
            log(f"could not remove the unfinished version {version_dir}: {e}")
        raise
    storage.write_json(storage.join(dataset_dir, MANIFEST), manifest)  # the switch
    composite = _composite_names(manifest)
    written = sum(s["bytes"] for n, v in manifest["splits"].items() for s in v["shards"]
                  if n not in composite)
    return IngestResult(dataset_dir, version, skipped=False,
                        rows={s: v["rows"] for s, v in manifest["splits"].items()},
                        rejected=dict(Counter(reason_kind(q["reason"]) for q in quarantine)),
                        bytes_written=written, seconds=time.perf_counter() - t0,
                        composite=composite)


def _composite_names(manifest: dict[str, Any]) -> tuple[str, ...]:
    return tuple(n for n, v in manifest["splits"].items() if "parts" in v)


def _add_composites(dataset: str, splits: dict[str, dict[str, Any]]) -> None:
    """Add the dataset's composite splits (trainval = train + val) whose parts all exist, as
    lists of the parts' shards: the same files, not a second copy."""
    for name, parts in datasets.DATASETS[dataset].composite:
        if name in splits or not all(splits.get(p, {}).get("rows") for p in parts):
            continue
        ps = [splits[p] for p in parts]
        splits[name] = {
            "rows": sum(p["rows"] for p in ps), "rejected": sum(p["rejected"] for p in ps),
            "shards": [sh for p in ps for sh in p["shards"]],
            "class_pixels": np.sum([p["class_pixels"] for p in ps], axis=0).tolist(),
            "ignore_pixels": sum(p["ignore_pixels"] for p in ps), "parts": list(parts)}


def _publish(version_dir: str, manifest: dict[str, Any]) -> None:
    """The version's own copy of its manifest: written once every shard is in place."""
    storage.write_json(storage.join(version_dir, MANIFEST), manifest)


def _batches(ds: Any) -> Any:
    """The dataset's batches; a storage error inside a Ray task (a node without credentials,
    an endpoint down) surfaces as its own one-line StorageError, not Ray's wrapper."""
    try:
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None:
            if isinstance(cause, storage.StorageError):
                last = str(cause).strip().splitlines()[-1]
                raise storage.StorageError(last.split("StorageError: ", 1)[-1]) from e
            cause = cause.__cause__ or getattr(cause, "cause", None)
        raise


def engine_for(cfg: IngestConfig, records: int) -> str:
    """``ray`` or ``local``: what ``cfg.engine`` means for this many listed examples."""
    if cfg.engine != "auto":
        return cfg.engine
    if os.environ.get("RAY_ADDRESS"):  # a cluster named: use it (and say so if it is down)
        return "ray"
    return "local" if records <= LOCAL_MAX_RECORDS else "ray"


def _local_results(items: list[dict[str, Any]], cfg: IngestConfig, num_classes: int,
                   folder: str, rel: str) -> Any:
    """The same two steps as the Ray Data pipeline (decode_batch on batches of
    ``batch_size`` records, write_shard on ``shard_rows`` staging rows), in this process."""
    staged = pa.concat_tables(
        [decode_batch(pa.Table.from_pylist(items[i:i + cfg.batch_size]), cfg.dataset,
                      num_classes, cfg.compute_hha)
         for i in range(0, len(items), cfg.batch_size)])
    for i in range(0, staged.num_rows, cfg.shard_rows):
        yield write_shard(staged.slice(i, cfg.shard_rows), folder, rel, num_classes)


def decode_and_write(batch: pa.Table, dataset: str, num_classes: int, compute_hha: bool,
                     folder: str, rel: str) -> pa.Table:
    """Ray Data UDF: one task's records -> their shard and result rows (decode_batch, then
    write_shard, in the same worker: the decoded bytes never cross the object store)."""
    return write_shard(decode_batch(batch, dataset, num_classes, compute_hha), folder, rel,
                       num_classes)


def ray_tasks(records: int, cpus: int, shard_rows: int) -> int:
    """How many decode-and-write tasks (= shards) a split of ``records`` gets: a multiple of
    the cluster's CPUs, each task at most ``shard_rows`` records, all about the same size, so
    every CPU works until the end (measured: equal tasks, one per CPU per round, beat many
    small decode tasks feeding separate write tasks through the object store)."""
    cpus = max(1, cpus)
    return cpus * max(1, -(-records // (cpus * shard_rows)))


def _ray_pipeline(items: list[dict[str, Any]], cfg: IngestConfig, num_classes: int,
                  folder: str, rel: str) -> Any:
    """The Ray Data pipeline of one split: equal blocks of records, each decoded, validated
    and written as one shard by one task."""
    import ray
    import ray.data

    cpus = int(ray.cluster_resources().get("CPU", 1))
    blocks = min(len(items), ray_tasks(len(items), cpus, cfg.shard_rows))
    return (
        ray.data.from_items(items, override_num_blocks=blocks)
        .map_batches(decode_and_write, batch_size=None, batch_format="pyarrow", num_cpus=1,
                     fn_kwargs={"dataset": cfg.dataset, "compute_hha": cfg.compute_hha,
                                "num_classes": num_classes, "folder": folder, "rel": rel}))


def _run(cfg: IngestConfig, listing: Listing, split_names: list[str], fingerprint: str,
         version: str, version_dir: str, log: Log
         ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Decode, validate and write every split under ``version_dir``; (manifest,
    quarantine)."""
    engine = engine_for(cfg, len(listing.records))
    if engine == "ray":
        from pipelines.ray_env import init_ray

        log(init_ray())
    else:
        log(f"  decoding {len(listing.records)} examples in this process (engine local; "
            f"Ray Data above {LOCAL_MAX_RECORDS} or with --engine ray)")
    num_classes = listing.num_classes
    hists: dict[str, np.ndarray] = {}
    splits: dict[str, list[dict[str, Any]]] = {}
    quarantine = [asdict(p) for p in listing.problems]
    for split in split_names:
        items = [{**asdict(r), "extras": [list(e) for e in r.extras]}
                 for r in listing.records if r.split == split]
        hists[split] = np.zeros(num_classes + 1, np.int64)
        splits[split] = []
        if not items:
            continue
        t0 = time.perf_counter()
        folder, rel = storage.join(version_dir, split), f"versions/{version}/{split}"
        if engine == "local":
            results = _local_results(items, cfg, num_classes, folder, rel)
        else:
            results = _batches(_ray_pipeline(items, cfg, num_classes, folder, rel))
        for batch in results:
            for row in batch.to_pylist():
                if row["kind"] == "reject":
                    quarantine.append({"dataset": cfg.dataset, "split": row["split"],
                                       "id": row["id"], "path": row["path"],
                                       "reason": row["reason"]})
                else:
                    hists[split] += np.asarray(row["label_hist"], np.int64)
                    splits[split].append(row)
        splits[split].sort(key=lambda r: r["id"])
        n = sum(sh["rows"] for sh in splits[split])
        log(f"  {split}: {n} of {len(items)} examples written in {len(splits[split])} "
            f"shard(s), {time.perf_counter() - t0:.1f} s")
    quarantine.sort(key=lambda q: (q["split"], q["id"]))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), sink)
    storage.write_bytes(storage.join(version_dir, QUARANTINE), sink.getvalue().to_pybytes())
    from pipelines.sources import SOURCES

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dataset": cfg.dataset,
        "layout": listing.layout,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": list(SOURCES[listing.layout].CLASSES),
        "num_classes": num_classes,
        "ignore_index": IGNORE_INDEX,
        "columns": SHARD_SCHEMA.names,
        "source": {"root": cfg.root, "fingerprint": fingerprint,
                   "split_file": cfg.split_file, **listing.notes},
        "splits": {s: {"rows": sum(sh["rows"] for sh in splits[s]),
                       "rejected": sum(1 for q in quarantine if q["split"] == s),
                       "shards": [{k: sh[k] for k in ("path", "rows", "bytes", "sha256")}
                                  for sh in splits[s]],
                       "class_pixels": hists[s][:num_classes].tolist(),
                       "ignore_pixels": int(hists[s][num_classes])} for s in split_names},
        "rejected": len(quarantine),
        "quarantine": f"versions/{version}/{QUARANTINE}",
    }
    _add_composites(listing.layout, manifest["splits"])
    return manifest, quarantine
