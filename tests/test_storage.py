"""pipelines.storage: locations on a local disk and in a real S3 server (SeaweedFS), the
pathlib-like view readers use, and the one-line errors for bad locations."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.sources import source
from pipelines.sources import synthetic as synth

# ------------------------------------------------------------------ locations (no server)


def test_locations_join_and_split_for_paths_and_uris(tmp_path):
    assert storage.join("s3://b/x/", "y", "z.json") == "s3://b/x/y/z.json"
    assert storage.join(tmp_path, "a/b") == str(tmp_path / "a" / "b")
    assert storage.join(f"file://{tmp_path}", "a") == str(tmp_path / "a")
    assert storage.parent("s3://b/x/y") == "s3://b/x" and storage.name("s3://b/x/y") == "y"
    assert storage.is_remote("s3://b") and storage.is_remote("gs://b/x")
    assert not storage.is_remote(tmp_path) and not storage.is_remote(f"file://{tmp_path}")
    assert storage.normalize("data/x") == os.path.abspath("data/x")
    fs, path = storage.resolve("s3://bucket/a/b")
    assert fs.type_name == "s3" and path == "bucket/a/b"
    assert storage.location(fs, "bucket/a/b/c", like="s3://bucket") == "s3://bucket/a/b/c"


def test_an_unknown_scheme_is_one_clear_line():
    with pytest.raises(storage.StorageError, match=r"scheme 'ftp://' is not one of .*s3://"):
        storage.resolve("ftp://host/data")


def test_local_writes_are_atomic_and_listings_are_cached(tmp_path):
    target = tmp_path / "d" / "m.json"
    storage.write_json(target, {"a": 1})
    assert storage.read_json(target) == {"a": 1}
    assert sorted(os.listdir(tmp_path / "d")) == ["m.json"]  # no temporary left behind
    assert storage.create_exclusive(tmp_path / "marker") is True
    assert storage.create_exclusive(tmp_path / "marker") is False
    root = storage.path(tmp_path)
    assert (root / "d").is_dir() and (root / "d" / "m.json").is_file()
    (tmp_path / "d" / "late.txt").write_text("x")  # after the listing: the cache answers
    assert not (root / "d" / "late.txt").exists()
    assert storage.path(tmp_path / "d" / "late.txt").exists()  # a fresh view sees it
    assert [p.name for p in storage.path(tmp_path).rglob("*.txt")] == ["late.txt"]


def test_secrets_are_redacted(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    text = "failed for s3cr3t-value-xyz at postgresql://u:pw123@h/db"
    assert storage.redact(text) == "failed for *** at postgresql://u:***@h/db"


# ----------------------------------------------------------------------- a real S3 server


@pytest.fixture(scope="module")
def bucket(s3_server, monkeypatch_module):
    for k, v in s3_server.env().items():
        monkeypatch_module.setenv(k, v)
    return s3_server.create_bucket("storage-tests")


@pytest.mark.slow
def test_s3_objects_round_trip_through_the_standard_variables(bucket):
    loc = storage.join(bucket, "a", "b.json")
    storage.write_json(loc, {"x": [1, 2]})
    assert storage.read_json(loc) == {"x": [1, 2]}
    assert storage.is_dir(storage.join(bucket, "a")) and storage.is_file(loc)
    root = storage.path(bucket)
    assert [p.name for p in root.iterdir()] == ["a"]
    assert (root / "a" / "b.json").stat().st_size == len(storage.read_bytes(loc))
    with pytest.raises(FileNotFoundError, match="no such file or folder: s3://storage-tests"):
        storage.read_bytes(storage.join(bucket, "missing.json"))
    storage.delete_dir(storage.join(bucket, "a"))
    assert not storage.exists(loc)


@pytest.mark.slow
def test_s3_errors_name_the_location_and_cause_never_the_secret(bucket, s3_server,
                                                                monkeypatch):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_writable("s3://no-such-bucket/shards")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes(storage.join(bucket, "x"))
    assert "access denied" in str(e.value) and "wrong-secret" not in str(e.value)
    assert "s3://storage-tests/x" in str(e.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(storage.StorageError, match="S3 endpoint does not answer"):
        storage.read_bytes(storage.join(bucket, "x"))


@pytest.mark.slow
def test_readers_list_a_dataset_in_a_bucket_like_on_disk(bucket, tmp_path):
    for layout, writer in (("voc", synth.write_voc), ("nyud", synth.write_nyud),
                           ("siftflow", synth.write_siftflow)):
        raw = writer(tmp_path / layout, n_train=3, n_val=2, size=(24, 24), seed=1)
        remote = storage.join(bucket, "raw", layout)
        storage.copy_tree(raw, remote)
        local, _ = source(layout).list_records(raw)
        there, problems = source(layout).list_records(remote)
        assert not problems
        assert [(r.split, r.id) for r in there] == [(r.split, r.id) for r in local]
        assert all(r.image.startswith("s3://storage-tests/raw/") for r in there)
        from pipelines.sources import load_example

        a, _ = load_example(local[0], 40)
        b, _ = load_example(there[0], 40)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def _ingest_cli(args: list[str], env: dict[str, str]) -> dict:
    """`fcn ingest` in its own process (its local Ray gets the S3 variables, as any node
    must: the test session's Ray may have started without them)."""
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", *args,
                           "--result-json", "s3://storage-tests/result.json"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage.read_json("s3://storage-tests/result.json")


@pytest.mark.slow
def test_ingest_into_a_bucket_then_rerun_is_a_no_op(bucket, tmp_path, s3_server):
    from pipelines.shards import read_manifest, read_split_table

    raw = synth.write_voc(tmp_path / "raw", n_train=5, n_val=3, size=(32, 32))
    remote_raw = storage.join(bucket, "voc-raw")
    storage.copy_tree(raw, remote_raw)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    args = ["voc", "--root", remote_raw, "--out", storage.join(bucket, "shards"),
            "--shard-rows", "2", "--engine", "ray"]  # Ray Data tasks read and write S3
    first = _ingest_cli(args, env)
    assert first["dataset_dir"] == "s3://storage-tests/shards/voc"
    assert first["rows"] == {"train": 5, "val": 3} and not first["rejected"]
    m = read_manifest(first["dataset_dir"])
    assert m.data["source"]["root"] == remote_raw
    rows = read_split_table(first["dataset_dir"], "train").to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(
        r.id for r in source("voc").list_records(raw)[0] if r.split == "train")
    fs = s3_server.filesystem()  # independent of pipelines.storage
    for sh in m.data["splits"]["train"]["shards"]:
        assert pq.read_metadata(f"storage-tests/shards/voc/{sh['path']}",
                                filesystem=fs).num_rows == sh["rows"]
    again = _ingest_cli(args, env)
    assert again["skipped"] and again["version"] == first["version"]


@pytest.mark.slow
def test_cli_bad_locations_exit_2_with_one_line(bucket, tmp_path, s3_server):
    env = {**os.environ, **s3_server.env()}
    raw = synth.write_voc(tmp_path / "raw", n_train=2, n_val=1, size=(24, 24))
    cases = [
        (["ingest", "voc", "--root", str(raw), "--out", "ftp://x/y"], "scheme 'ftp://'"),
        (["ingest", "voc", "--root", str(raw), "--out", "s3://absent-bucket/x"],
         "bucket 'absent-bucket' does not exist"),
        (["ingest", "voc", "--root", "s3://storage-tests/nothing-here", "--out",
          str(tmp_path / "o")], "no VOC layout under s3://storage-tests/nothing-here"),
        (["train", "--config", "configs/demo.yaml", "--data", "s3://storage-tests/none"],
         "no ingested dataset at s3://storage-tests/none"),
    ]
    for args, expected in cases:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(lines) == 1 and expected in lines[0], (args, proc.stderr)
        assert s3_server.secret_key not in proc.stderr + proc.stdout
    bad = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret-987654321"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", "voc", "--root",
                           str(raw), "--out", "s3://storage-tests/x"], env=bad,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "access denied" in proc.stderr, proc.stderr
    assert "not-the-secret" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_predict_reads_a_checkpoint_and_images_from_a_bucket_and_writes_there(
        bucket, tmp_path, s3_server):
    import io

    import torch
    from PIL import Image

    from fcn_core.fcn import fcn8s

    model = fcn8s(width=1 / 16)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "arch": {"kind": "fcn", **model.config.to_dict()},
                "step": 0, "config": {"dataset": "voc", "input": "rgb"}}, buf)
    storage.write_bytes(storage.join(bucket, "ckpt", "checkpoint.pt"), buf.getvalue())
    rng = np.random.default_rng(2)
    for name, shape in (("a.jpg", (33, 21, 3)), ("sub/b.png", (18, 40, 3))):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
            out, format="PNG" if name.endswith("png") else "JPEG")
        storage.write_bytes(storage.join(bucket, "images", name), out.getvalue())
    storage.write_bytes(storage.join(bucket, "images", "broken.jpg"), b"not an image")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
           **s3_server.env()}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "predict", "--model",
                           storage.join(bucket, "ckpt"), storage.join(bucket, "images"),
                           "--out", storage.join(bucket, "pred")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 2 prediction(s)" in proc.stdout and "broken.jpg" in proc.stdout
    for name, shape in (("a", (33, 21)), ("b", (18, 40))):
        ids = np.array(Image.open(io.BytesIO(storage.read_bytes(
            storage.join(bucket, "pred", f"{name}.png")))))
        assert ids.shape == shape and ids.max() < 21
        assert storage.is_file(storage.join(bucket, "pred", f"{name}_color.png"))


@pytest.mark.slow
def test_nyud_predict_pairs_images_and_depth_maps_in_a_bucket(bucket, tmp_path):
    """fcn predict of an RGB + HHA net with --depth from a bucket: the images and depth maps
    are listed and matched by name in the bucket, HHA is computed from the depth read
    there, and the labels written to the bucket are those of the same files on disk."""
    import io

    import torch
    from PIL import Image

    from fcn_core.fcn import LateFusion, fcn8s
    from pipelines.companions import Sources
    from pipelines.predict import predict
    from pipelines.train.checkpoint import write_checkpoint

    torch.manual_seed(0)
    write_checkpoint(str(tmp_path / "ck" / "checkpoint.pt"),
                     LateFusion(fcn8s(num_classes=40, width=1 / 16),
                                fcn8s(num_classes=40, width=1 / 16)),
                     config={"dataset": "nyud", "input": "rgb-hha"})
    rng = np.random.default_rng(4)
    for name in ("img_1", "img_2"):
        for kind, a in (("images", rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)),
                        ("depth", rng.integers(500, 6000, (30, 44)).astype(np.uint16))):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            storage.write_bytes(storage.join(bucket, "nyud", kind, f"{name}.png"),
                                buf.getvalue())
            (tmp_path / kind).mkdir(exist_ok=True)
            (tmp_path / kind / f"{name}.png").write_bytes(buf.getvalue())
    remote = predict(str(tmp_path / "ck"), [storage.join(bucket, "nyud", "images")],
                     storage.join(bucket, "nyud", "pred"), log=lambda m: None,
                     sources=Sources(depth=(storage.join(bucket, "nyud", "depth"),)))
    local = predict(str(tmp_path / "ck"), [str(tmp_path / "images")], str(tmp_path / "pred"),
                    log=lambda m: None, sources=Sources(depth=(str(tmp_path / "depth"),)))
    assert len(remote.written) == len(local.written) == 2 and not remote.skipped
    for name in ("img_1", "img_2"):
        got = np.array(Image.open(io.BytesIO(storage.read_bytes(
            storage.join(bucket, "nyud", "pred", f"{name}.png")))))
        assert np.array_equal(got, np.array(Image.open(tmp_path / "pred" / f"{name}.png")))


@pytest.mark.slow
def test_backbone_weights_from_a_bucket_pass_preflight_and_load_without_pickle(bucket):
    """Nodes share no disk: --backbone-weights may be a bucket URI, checked on the driver and
    read by each worker (tensors only); a missing object is a usage error naming the URI."""
    import dataclasses
    import io

    import torch

    from pipelines import preflight
    from pipelines.config import StageConfig, TrainConfig
    from pipelines.errors import UserError
    from pipelines.train.step import read_backbone

    state = {"features.0.weight": torch.randn(4, 3, 3, 3), "features.0.bias": torch.zeros(4)}
    buf = io.BytesIO()
    torch.save(state, buf)
    loc = storage.join(bucket, "weights", "vgg16.pth")
    storage.write_bytes(loc, buf.getvalue())
    cfg = TrainConfig(name="w", dataset="synthetic", backbone_weights=loc,
                      stages=(StageConfig("32s", 1, 0.01),))
    preflight.check_backbone_weights(cfg)
    got = read_backbone(loc)
    assert set(got) == set(state)
    torch.testing.assert_close(got["features.0.weight"], state["features.0.weight"])
    gone = storage.join(bucket, "weights", "gone.pth")
    with pytest.raises(UserError, match=f"^backbone weights {gone}: no such file"):
        preflight.check_backbone_weights(dataclasses.replace(cfg, backbone_weights=gone))
