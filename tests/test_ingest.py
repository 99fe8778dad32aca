"""Ingest on real Ray Data: round trips, quarantine, atomic versions, no-op re-runs."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import pipelines.ingest as ingest_mod
from fcn_core.transforms import MEAN_BGR, image_to_tensor
from pipelines import storage
from pipelines.errors import UserError
from pipelines.ingest import IngestConfig, ingest
from pipelines.shards import decode_arrays, decode_row, read_manifest, read_split_table
from pipelines.sources import decode_image, decode_label, source
from pipelines.sources import synthetic as synth

pytestmark = pytest.mark.usefixtures("ray_local")


def _records_by_id(layout, root, **kw):
    records, _ = source(layout).list_records(root, **kw)
    return {(r.split, r.id): r for r in records}


ENGINES = pytest.mark.parametrize("engine", ["ray", "local"])  # Ray Data, and in-process


@ENGINES
@pytest.mark.parametrize("layout, writer", [
    ("voc", synth.write_voc), ("sbd", synth.write_sbd), ("nyud", synth.write_nyud),
    ("siftflow", synth.write_siftflow)])
def test_round_trip_gives_exactly_the_source_pixels_and_labels(tmp_path, layout, writer,
                                                               engine):
    root = writer(tmp_path / "raw", n_train=5, n_val=3, size=(40, 52), seed=3)
    result = ingest(IngestConfig(dataset=layout, root=root, out=tmp_path / "out", shard_rows=2,
                                 engine=engine), log=lambda m: None)
    m = read_manifest(result.dataset_dir)
    recs = _records_by_id(layout, root)
    assert result.total_rows == len(recs) == 8
    for split in m.splits:
        if split in result.composite:  # nyud trainval: the shards of train and val
            continue
        assert m.data["splits"][split]["rows"] == result.rows[split]
        shards = m.data["splits"][split]["shards"]
        assert all(1 <= sh["rows"] <= 2 for sh in shards)  # at most shard_rows each
        if engine == "local":  # Ray Data balances them over the CPUs (ingest.ray_tasks)
            assert len(shards) == -(-result.rows[split] // 2)
        for row in read_split_table(result.dataset_dir, split).to_pylist():
            rec = recs[(split, row["id"])]
            got = decode_arrays(row)
            assert row["image"] == Path(rec.image).read_bytes()  # original bytes kept
            tensors = decode_row(row, MEAN_BGR["voc"])  # what training / evaluation see
            assert torch.equal(tensors["image"], image_to_tensor(got["image"], MEAN_BGR["voc"]))
            assert tensors["label"].dtype == torch.int64
            assert np.array_equal(tensors["label"].numpy(), decode_label(rec))
            assert np.array_equal(got["image"], decode_image(rec.image))
            assert np.array_equal(got["label"], decode_label(rec))
            assert (row["height"], row["width"]) == (40, 52)
            extras = dict(rec.extras)
            if "label_geo" in extras:
                assert np.array_equal(got["label_geo"], decode_label(rec, "label_geo"))
            if "depth" in extras:
                assert got["depth"].dtype == np.uint16
                assert np.array_equal(got["depth"], np.array(Image.open(extras["depth"])))
            if "hha" in extras:
                assert np.array_equal(got["hha"], decode_image(extras["hha"]))
    # The class histogram counts every labelled pixel of the split.
    for split in m.splits:
        labels = [decode_arrays(r)["label"] for r in read_split_table(m.root, split).to_pylist()]
        expected = np.bincount(np.concatenate([lab.ravel() for lab in labels]), minlength=256)
        assert m.data["splits"][split]["class_pixels"] == expected[: m.num_classes].tolist()
        assert m.data["splits"][split]["ignore_pixels"] == int(expected[255])


def test_real_sbd_and_voc_samples_ingest_with_exact_labels(tmp_path, realdata):
    REALDATA = realdata  # noqa: N806
    r = ingest(IngestConfig(dataset="sbd", root=REALDATA / "sbd", out=tmp_path,
                            splits=("train", "val")),
               log=lambda m: None)
    rows = {row["id"]: row for row in read_split_table(r.dataset_dir, "val").to_pylist()}
    assert set(np.unique(decode_arrays(rows["2008_000051"])["label"])) == {0, 5, 9, 15}
    assert r.rows == {"train": 0, "val": 2}
    r = ingest(IngestConfig(dataset="voc", root=REALDATA / "voc" / "drsleep_VOC2012_sample",
                            out=tmp_path, splits=("val",)), log=lambda m: None)
    assert r.rows == {"val": 1} and r.rejected == {"missing file": 1448}
    row = read_split_table(r.dataset_dir, "val").to_pylist()[0]
    assert set(np.unique(decode_arrays(row)["label"])) == {0, 2, 15, 255}


def _save_cmyk_and_gray(base: Path, ids: list[str]) -> None:
    rgb = np.array(Image.open(base / "JPEGImages" / f"{ids[0]}.jpg"))
    Image.fromarray(rgb).convert("CMYK").save(base / "JPEGImages" / f"{ids[0]}.jpg")
    Image.fromarray(rgb).convert("L").save(base / "JPEGImages" / f"{ids[1]}.jpg")


@ENGINES
def test_every_bad_input_is_quarantined_with_its_reason_and_good_rows_all_land(tmp_path,
                                                                              engine):
    base = synth.write_voc(tmp_path / "raw", n_train=12, n_val=2, size=(48, 48), seed=1)
    ids = (base / "ImageSets/Segmentation/train.txt").read_text().split()
    jpg = lambda i: base / "JPEGImages" / f"{ids[i]}.jpg"  # noqa: E731
    png = lambda i: base / "SegmentationClass" / f"{ids[i]}.png"  # noqa: E731
    data = jpg(0).read_bytes()
    jpg(0).write_bytes(data[: len(data) // 2])  # truncated
    jpg(1).write_bytes(b"this is not an image")  # undecodable
    Image.fromarray(np.zeros((30, 48), np.uint8)).save(png(2))  # label size != image size
    bad = np.array(Image.open(png(3)))
    bad[0, 0] = 40  # not a VOC class, not 255
    Image.fromarray(bad).save(png(3))
    jpg(4).unlink()  # listed but missing
    png(5).write_bytes(b"")  # empty file
    _save_cmyk_and_gray(base, ids[6:8])  # converted, not rejected
    split = base / "ImageSets/Segmentation/train.txt"
    split.write_text("\n".join(ids + ["../../../etc/passwd", ids[9]]) + "\n")  # escape, dup

    result = ingest(IngestConfig(dataset="voc", root=base, out=tmp_path / "out", engine=engine),
                    log=lambda m: None)
    q = pq.read_table(Path(result.dataset_dir) / read_manifest(result.dataset_dir)
                      .data["quarantine"]).to_pylist()
    reasons = {row["id"]: row["reason"] for row in q}
    assert "truncated" in reasons[ids[0]]
    assert "undecodable" in reasons[ids[1]]
    assert "does not match image size" in reasons[ids[2]]
    assert "out of range" in reasons[ids[3]] and "40" in reasons[ids[3]]
    assert "missing image file" in reasons[ids[4]]
    assert "empty file" in reasons[ids[5]]
    assert reasons["../../../etc/passwd"] == "id escapes the dataset root"
    assert any(r["id"] == ids[9] and "duplicate" in r["reason"] for r in q)
    assert len(q) == 8
    good = {r["id"] for r in read_split_table(result.dataset_dir, "train", ["id"]).to_pylist()}
    assert good == set(ids[6:12])  # CMYK and grey images included, nothing good lost
    assert result.rows == {"train": 6, "val": 2}
    rows = {r["id"]: r for r in read_split_table(result.dataset_dir, "train").to_pylist()}
    assert decode_arrays(rows[ids[6]])["image"].shape == (48, 48, 3)
    assert result.rejected["truncated image"] == 1 and result.rejected["duplicate id"] == 1


def test_ray_tasks_are_equal_rounds_over_the_cpus_and_at_most_shard_rows():
    from pipelines.ingest import ray_tasks

    assert ray_tasks(500, 2, 100) == 6  # 3 rounds of 2 tasks of <= 84 rows, not 5 of 100
    assert ray_tasks(5, 2, 2) == 4 and ray_tasks(10, 4, 500) == 4
    assert ray_tasks(11_000, 64, 500) == 64  # 172 rows each
    for n, cpus, rows in ((500, 2, 100), (7, 3, 2), (1, 8, 500), (10_582, 6, 500)):
        tasks = ray_tasks(n, cpus, rows)
        assert tasks % cpus == 0 and -(-n // tasks) <= rows


def test_both_engines_write_the_same_rows_histograms_and_quarantine(tmp_path):
    """Ray Data and the in-process engine: the same rows (bytes), class pixel counts,
    rejected examples and fingerprint; auto picks local up to LOCAL_MAX_RECORDS examples."""
    base = synth.write_voc(tmp_path / "raw", n_train=9, n_val=4, size=(36, 44), seed=5)
    (base / "JPEGImages" / "x.jpg").write_bytes(b"")
    split = base / "ImageSets/Segmentation/train.txt"
    split.write_text(split.read_text() + "x\n")
    logs: dict[str, list[str]] = {}
    got = {}
    for engine in ("ray", "local", "auto"):
        logs[engine] = []
        r = ingest(IngestConfig(dataset="voc", root=base, out=tmp_path / engine, shard_rows=4,
                                engine=engine), log=logs[engine].append)
        m = read_manifest(r.dataset_dir)
        got[engine] = (
            {s: sorted(read_split_table(r.dataset_dir, s).to_pylist(), key=lambda x: x["id"])
             for s in m.splits},
            {s: (v["rows"], v["class_pixels"], v["ignore_pixels"], v["rejected"])
             for s, v in m.data["splits"].items()},
            pq.read_table(Path(r.dataset_dir) / m.data["quarantine"]).to_pylist(),
            m.fingerprint)
    assert got["ray"] == got["local"] == got["auto"]
    assert got["ray"][1]["train"][0] == 9 and got["ray"][1]["train"][3] == 1
    assert any(line.startswith("Ray: ") for line in logs["ray"])
    assert not any(line.startswith("Ray: ") for line in logs["auto"])  # 14 <= 256: local
    with pytest.raises(UserError, match="engine must be one of auto, ray, local, got 'spark'"):
        IngestConfig(dataset="voc", root=base, out=tmp_path / "o", engine="spark")


def test_rerun_on_unchanged_sources_is_a_no_op_and_a_change_makes_a_new_version(tmp_path):
    base = synth.write_voc(tmp_path / "raw", n_train=4, n_val=2, size=(32, 32))
    cfg = IngestConfig(dataset="voc", root=base, out=tmp_path / "out")
    first = ingest(cfg, log=lambda m: None)
    manifest_before = (Path(first.dataset_dir) / "manifest.json").read_bytes()
    again = ingest(cfg, log=lambda m: None)
    assert again.skipped and again.version == first.version
    assert (Path(first.dataset_dir) / "manifest.json").read_bytes() == manifest_before
    # A changed label file makes a new version; the old one stays whole on disk.
    label = next((base / "SegmentationClass").glob("*.png"))
    arr = np.array(Image.open(label))
    arr[:4, :4] = 15
    Image.fromarray(arr).save(label)
    second = ingest(cfg, log=lambda m: None)
    assert not second.skipped and second.version != first.version
    assert read_manifest(first.dataset_dir).data["version"] == second.version
    old = Path(first.dataset_dir) / "versions" / first.version
    assert (old / "manifest.json").is_file() and any(old.rglob("*.parquet"))


def test_a_failed_ingest_leaves_the_previous_version_readable_and_no_partial_shard(
        tmp_path, monkeypatch):
    base = synth.write_voc(tmp_path / "raw", n_train=6, n_val=4, size=(32, 32))
    cfg = IngestConfig(dataset="voc", root=base, out=tmp_path / "out", shard_rows=2)
    first = ingest(cfg, log=lambda m: None)
    before = read_split_table(first.dataset_dir, "train").to_pylist()
    val = base / "ImageSets/Segmentation/val.txt"
    val.write_text("\n".join(val.read_text().split()[:-1]) + "\n")  # a change: new version

    calls = []

    def dies_before_publishing(version_dir, manifest):
        # Every shard of the new version is written (it is listed with its checksum):
        # the process dies before the version's manifest and the switch.
        calls.append(manifest["version"])
        assert all(Path(storage.join(first.dataset_dir, sh["path"])).is_file()
                   for s in manifest["splits"].values() for sh in s["shards"])
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(ingest_mod, "_publish", dies_before_publishing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest(cfg, log=lambda m: None)
    assert len(calls) == 1 and calls[0] != first.version
    m = read_manifest(first.dataset_dir)
    assert m.data["version"] == first.version
    assert read_split_table(first.dataset_dir, "train").to_pylist() == before
    root = Path(first.dataset_dir)
    visible = {p.relative_to(root).parts[:2] for p in root.rglob("*.parquet")}
    assert visible == {("versions", first.version)}  # the failed version was removed
    monkeypatch.undo()
    third = ingest(cfg, log=lambda m: None)
    assert third.rows == {"train": 6, "val": 3}
    assert read_manifest(first.dataset_dir).data["version"] == third.version


def test_wrong_root_is_one_clear_line_from_the_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", "sbd", "--root",
                           str(tmp_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no SBD layout" in lines[0] and "cls" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# A separate Ray head (ingest from a GCS-address driver) is tested in test_cluster.py, with
# the shards in a real S3 server.


def test_training_batches_pad_mirror_and_match_the_reference_input(tmp_path):
    from fcn_core.transforms import MEAN_BGR, image_to_tensor
    from pipelines.shards import model_input, training_batch

    base = synth.write_voc(tmp_path / "raw", n_train=2, n_val=1, size=(40, 52))
    small = synth.write_voc(tmp_path / "raw2", n_train=1, n_val=1, size=(33, 20), seed=5)
    rows = []
    for b in (base, small):
        r = ingest(IngestConfig(dataset="voc", root=b, out=tmp_path / b.name / "out"),
                   log=lambda m: None)
        rows += read_split_table(r.dataset_dir, "train").to_pylist()
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    batch = training_batch(cols, multiple=8)
    assert batch["image"].shape == (3, 40, 56, 3) and batch["image"].dtype == np.uint8
    x, y = model_input(batch, MEAN_BGR["voc"])
    last = decode_arrays(rows[2])
    torch_x = image_to_tensor(last["image"], MEAN_BGR["voc"])
    assert np.allclose(x[2, :, :33, :20].numpy(), torch_x.numpy())
    assert (x[2, :, 33:, :] == 0).all() and (x[2, :, :, 20:] == 0).all()
    assert (y["label"][2, 33:, :] == 255).all()
    assert np.array_equal(y["label"][2, :33, :20].numpy(), last["label"])
    # Mirroring flips image and label together.
    # Mirroring flips image and label together, before padding (the pad stays right).
    flipped = [training_batch(cols, mirror=True, seed=s, multiple=8) for s in range(6)]
    for fb in flipped:
        for i in range(2):
            plain = np.array_equal(fb["image"][i], batch["image"][i])
            assert plain == np.array_equal(fb["label"][i], batch["label"][i])
            if not plain:
                assert np.array_equal(fb["image"][i, :, :52], batch["image"][i, :, 51::-1])
                assert np.array_equal(fb["label"][i, :, :52], batch["label"][i, :, 51::-1])
    assert any(not np.array_equal(fb["image"][0], batch["image"][0]) for fb in flipped)
