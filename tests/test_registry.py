"""Evaluation on Ray Data, MLflow registration and the champion gate, pyfunc, fcn predict."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from fcn_core import fcn8s
from fcn_core.inference import InferenceOptions
from fcn_core.metrics import ConfusionMatrix
from pipelines.evaluate import evaluate, predict_row
from pipelines.ingest import IngestConfig, ingest
from pipelines.registry import register, resolve_model
from pipelines.shards import read_manifest, read_split_table
from pipelines.sources import synthetic as synth
from pipelines.train import CHECKPOINT_FILE

pytestmark = pytest.mark.usefixtures("ray_local")


def save_checkpoint(folder: Path, seed: int, dataset: str = "voc") -> Path:
    """A checkpoint in the training format, of an untrained FCN-8s with random score layers
    (so its predictions are varied and depend on the seed)."""
    torch.manual_seed(seed)
    model = fcn8s(width=1 / 16)
    for name, m in model.named_modules():
        if name.split(".")[-1].startswith("score_"):
            torch.nn.init.normal_(m.weight, std=1.0)
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "arch": {"kind": "fcn", **model.config.to_dict()},
                "step": 0, "config": {"dataset": dataset, "input": "rgb"}},
               folder / CHECKPOINT_FILE)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    raw = synth.write_voc(root / "raw", n_train=2, n_val=7, size=(37, 45))
    return ingest(IngestConfig(dataset="voc", root=raw, out=root / "out"),
                  log=lambda m: None).dataset_dir


def test_distributed_evaluation_equals_one_process(data, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    ckpt = save_checkpoint(tmp_path / "ckpt", seed=0)
    result = evaluate(str(ckpt), data, "val", actors=2, batch_size=2, log=lambda m: None)
    loaded = resolve_model(str(ckpt))
    cm = ConfusionMatrix(21)
    for row in read_split_table(data, "val").to_pylist():
        cm.update(*predict_row(loaded, row, InferenceOptions(), "cpu"))
    assert result.images == 7
    assert np.array_equal(result.hist, cm.hist) and cm.hist.sum() > 0
    assert result.metrics == {k: v for k, v in cm.scores().items() if k != "per_class_iu"}
    assert result.per_class[0][0] == "background"
    arts = {a.path for a in MlflowClient(uri).list_artifacts(result.run_id)}
    assert {"metrics.json", "per_class_iu.md", "confusion_matrix.png", "samples.png"} <= arts


def test_test_time_options_keep_the_output_size(data, tmp_path):
    loaded = resolve_model(str(save_checkpoint(tmp_path / "c", seed=1)))
    row = read_split_table(data, "val").to_pylist()[0]
    for opts in (InferenceOptions(window=24, overlap=0.5), InferenceOptions(scales=(0.5, 1.0),
                                                                              flip=True)):
        label, pred = predict_row(loaded, row, opts, "cpu")
        assert pred.shape == label.shape == (37, 45) and pred.max() < 21


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["local-sqlite", "mlflow-server"])
def tracking(request, tmp_path, monkeypatch):
    """The default local SQLite store, or a real `mlflow server` on 127.0.0.1."""
    if request.param == "local-sqlite":
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.setenv("FCN_DATA_DIR", str(tmp_path / "data"))
        yield None
        return
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not answer in 90 s"
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_registration_aliases_champion_gate_and_pyfunc(data, tmp_path, tracking):
    import mlflow
    import mlflow.pyfunc

    manifest = read_manifest(data).data
    name = "fcn-test"
    ckpts = [save_checkpoint(tmp_path / f"c{i}", seed=i) for i in range(3)]

    def reg(i: int, miu: float):
        return register(str(ckpts[i]), name=name, metrics={"mean_iu": miu, "pixel_acc": 0.5},
                        split="val", manifest=manifest, config_digest="abc", log=lambda m: None)

    first = reg(0, 0.40)
    assert first.champion and "there was none" in first.decision
    better = reg(1, 0.45)
    assert better.champion and "0.4500 >= 0.4000" in better.decision
    worse = reg(2, 0.30)
    assert not worse.champion and "stays version 2" in worse.decision

    from pipelines.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    aliases = client.get_registered_model(name).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "2", "candidate": "3"}
    v2 = client.get_model_version_by_alias(name, "champion")
    assert float(v2.tags["mean_iu"]) == 0.45 and v2.tags["variant"] == "fcn8s"
    assert v2.tags["dataset_fingerprint"] == manifest["source"]["fingerprint"]
    assert client.get_model_version(name, "3").tags["champion_decision"] == worse.decision

    # Someone with only MLflow: uint8 RGB in, class ids out, any size, preprocessing inside.
    batch = np.random.default_rng(0).integers(0, 256, (2, 37, 45, 3), dtype=np.uint8)
    mlflow.set_tracking_uri(tracking_uri())  # a user's own process: one tracking URI
    labels = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(batch)
    assert labels.shape == (2, 37, 45) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < 21
    own = resolve_model(str(ckpts[1]))
    from fcn_core.inference import predict_labels

    expected = predict_labels(own.net, list(batch), own.mean_bgr)
    assert np.array_equal(labels, np.stack(expected).astype(np.int64))
    assert len(np.unique(labels)) > 1  # a real prediction, not a constant

    # "At least as good": an equal mean IU (recorded at full precision) takes the alias.
    tie = reg(0, 0.45)
    assert tie.champion and "0.4500 >= 0.4500" in tie.decision


def test_fcn_predict_writes_input_sized_ids_and_skips_bad_files(tmp_path):
    ckpt = save_checkpoint(tmp_path / "c", seed=3)
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (41, 29, 3), dtype=np.uint8)).save(inputs / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 50), dtype=np.uint8)).save(inputs / "sub/b.png")
    (inputs / "broken.jpg").write_bytes(b"not an image")
    extra = tmp_path / "c.png"
    shutil.copy(inputs / "sub/b.png", extra)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "predict", "--model", str(ckpt),
                           str(inputs), str(extra), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stdout and "broken.jpg" in proc.stdout
    for name, shape in (("a", (41, 29)), ("b", (20, 50)), ("c", (20, 50))):
        ids = np.array(Image.open(tmp_path / "out" / f"{name}.png"))
        assert ids.shape == shape and ids.dtype == np.uint8 and ids.max() < 21
        assert np.array(Image.open(tmp_path / "out" / f"{name}_color.png")).shape == (*shape, 3)
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "predict", "--model",
                          str(tmp_path / "nope"), str(extra), "--out", str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
