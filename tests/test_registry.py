"""Evaluation on Ray Data; MLflow registration: idempotent, lineage, the champion gate
(fail closed, ties to the newer, history), pyfunc; dataset lineage; fcn predict."""

import hashlib
import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from fcn_core import fcn8s
from fcn_core.inference import InferenceOptions
from fcn_core.metrics import ConfusionMatrix
from pipelines.errors import ServiceUnavailable
from pipelines.evaluate import evaluate, predict_row
from pipelines.ingest import IngestConfig, ingest
from pipelines.registry import (
    gate_champion,
    log_dataset_input,
    model_history,
    register,
    resolve_model,
)
from pipelines.shards import read_manifest, read_split_table
from pipelines.sources import synthetic as synth
from pipelines.train.checkpoint import CHECKPOINT_FILE, write_checkpoint

pytestmark = pytest.mark.usefixtures("ray_local")


def save_checkpoint(folder: Path, seed: int, dataset: str = "voc") -> Path:
    """A checkpoint in the training format, of an untrained FCN-8s with random score layers
    (so its predictions are varied and depend on the seed)."""
    torch.manual_seed(seed)
    model = fcn8s(width=1 / 16)
    for name, m in model.named_modules():
        if name.split(".")[-1].startswith("score_"):
            torch.nn.init.normal_(m.weight, std=1.0)
    write_checkpoint(folder / CHECKPOINT_FILE, model, config={"dataset": dataset, "input": "rgb"})
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    raw = synth.write_voc(root / "raw", n_train=2, n_val=7, size=(37, 45))
    return ingest(IngestConfig(dataset="voc", root=raw, out=root / "out"),
                  log=lambda m: None).dataset_dir


def test_distributed_evaluation_equals_one_process(data, tmp_path, monkeypatch):
    from pipelines.tracking import tracking_uri

    # The project's default store, artifacts beside it (not in ./mlruns).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FCN_DATA_DIR", str(tmp_path / "data"))
    uri = tracking_uri()
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
    # Without --actors, a split this small is scored in this process: the same counts.
    lines: list[str] = []
    here = evaluate(str(ckpt), data, "val", batch_size=3, log_to_mlflow=False,
                    log=lines.append)
    assert any("in this process (7 rows" in ln for ln in lines), lines
    assert not any(ln.startswith("Ray:") for ln in lines), lines  # no init_ray() line
    assert here.images == 7 and np.array_equal(here.hist, result.hist)


def test_test_time_options_keep_the_output_size(data, tmp_path):
    loaded = resolve_model(str(save_checkpoint(tmp_path / "c", seed=1)))
    row = read_split_table(data, "val").to_pylist()[0]
    for opts in (InferenceOptions(window=24, overlap=0.5), InferenceOptions(scales=(0.5, 1.0),
                                                                              flip=True)):
        label, pred = predict_row(loaded, row, opts, "cpu")
        assert pred.shape == label.shape == (37, 45) and pred.max() < 21


@pytest.fixture(params=["local-sqlite", "mlflow-server"])
def tracking(request, tmp_path, monkeypatch):
    """The default local SQLite store, or the session's real `mlflow server` (PostgreSQL,
    artifacts in S3) on 127.0.0.1."""
    if request.param == "local-sqlite":
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.setenv("FCN_DATA_DIR", str(tmp_path / "data"))
        return None
    server = request.getfixturevalue("mlflow_server")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.tracking_uri)
    return server.tracking_uri


def _sha256(folder: Path) -> str:
    return hashlib.sha256((folder / CHECKPOINT_FILE).read_bytes()).hexdigest()


def test_registration_aliases_champion_gate_history_and_pyfunc(data, tmp_path, tracking):
    import mlflow
    import mlflow.pyfunc

    manifest = read_manifest(data).data
    name = f"fcn-test-{uuid.uuid4().hex[:6]}"  # the server is shared by the session
    ckpts = [save_checkpoint(tmp_path / f"c{i}", seed=i) for i in range(4)]

    def reg(i: int, miu: float, **kw):
        return register(str(ckpts[i]), name=name, metrics={"mean_iu": miu, "pixel_acc": 0.5},
                        split="val", manifest=manifest, config_digest="abc", log=lambda m: None,
                        **kw)

    first = reg(0, 0.40)
    assert first.champion and "there was none" in first.decision and not first.reused
    better = reg(1, 0.45, training_run_id="train-run-1", flow_run="flow-run-1")
    assert better.champion and "0.4500 >= 0.4000" in better.decision
    worse = reg(2, 0.30)
    assert not worse.champion and "stays version 2" in worse.decision

    from pipelines.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    aliases = client.get_registered_model(name).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "2", "candidate": "3"}
    v2 = client.get_model_version_by_alias(name, "champion")
    assert float(v2.tags["mean_iu"]) == 0.45 and v2.tags["variant"] == "fcn8s"
    # Lineage: training run, evaluation run, Prefect flow run, dataset, checkpoint bytes.
    assert v2.tags["dataset_fingerprint"] == manifest["source"]["fingerprint"]
    assert v2.tags["training_run_id"] == "train-run-1"
    assert v2.tags["evaluation_run_id"] == better.run_id == v2.run_id
    assert v2.tags["prefect_flow_run_id"] == "flow-run-1"
    assert v2.tags["checkpoint_sha256"] == _sha256(ckpts[1])
    v1 = client.get_model_version(name, "1")
    assert v1.tags["training_run_id"] == "-" and v1.tags["prefect_flow_run_id"] == "-"
    assert client.get_model_version(name, "3").tags["champion_decision"] == worse.decision

    # Someone with only MLflow: uint8 RGB in, class ids out, any size, preprocessing inside.
    batch = np.random.default_rng(0).integers(0, 256, (2, 37, 45, 3), dtype=np.uint8)
    mlflow.set_tracking_uri(tracking_uri())  # a user's own process: one tracking URI
    labels = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(batch)
    assert labels.shape == (2, 37, 45) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < 21
    own = resolve_model(str(ckpts[1]))
    from fcn_core.inference import predict_labels

    expected = np.stack(predict_labels(own.net, list(batch), own.mean_bgr)).astype(np.int64)
    assert np.array_equal(labels, expected)
    assert len(np.unique(labels)) > 1  # a real prediction, not a constant
    # The project's own lookup reads the same weights (no model code run) by any URI.
    for uri in (f"models:/{name}@champion", f"models:/{name}/2", f"runs:/{better.run_id}/model"):
        loaded = resolve_model(uri)
        assert loaded.input == "rgb" and loaded.mean_bgr == own.mean_bgr and loaded.source == uri
        got = np.stack(predict_labels(loaded.net, list(batch), loaded.mean_bgr))
        assert np.array_equal(got, expected), uri

    # Registration cached each version's checkpoint under its logged-model id, and the
    # alias -> version -> logged model answer is read without MLflow (SQLite or REST).
    from pipelines import model_cache

    ids = {v: client.get_model_version(name, v).source.removeprefix("models:/")
           for v in ("1", "2", "3")}
    assert all(model_cache.cached(i) is not None for i in ids.values())
    uri = tracking_uri()
    assert model_cache.logged_model_id(f"models:/{name}@champion", uri) == ids["2"]
    assert model_cache.logged_model_id(f"models:/{name}@candidate", uri) == ids["3"]
    assert model_cache.logged_model_id(f"models:/{name}/1", uri) == ids["1"]
    for unknown in (f"models:/{name}@nope", f"models:/{name}/99", "models:/no-such@champion"):
        assert model_cache.logged_model_id(unknown, uri) is None, unknown
    # A cached model is loaded without importing MLflow (the one-image `fcn predict`).
    probe = subprocess.run([sys.executable, "-c", (
        "import sys; from pipelines.registry import resolve_model; "
        f"m = resolve_model('models:/{name}@champion'); "
        "print(m.source, sorted(k for k in sys.modules if k.split('.')[0] == 'mlflow'))")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert probe.stdout.split() == [f"models:/{name}@champion", "[]"], probe.stderr[-2000:]
    # A miss (an empty cache) takes MLflow's path and fills the cache again.
    for f in model_cache.cache_dir().glob("m-*.pt"):
        f.unlink()
    got = resolve_model(f"models:/{name}@champion")
    assert np.array_equal(np.stack(predict_labels(got.net, list(batch), got.mean_bgr)),
                          expected)
    assert model_cache.cached(ids["2"]) is not None and model_cache.cached(ids["1"]) is None

    # "At least as good": an equal mean IU (recorded at full precision) takes the alias.
    tie = reg(3, 0.45)
    assert tie.champion and "0.4500 >= 0.4500 of version 2" in tie.decision
    # The moved alias is followed at once: the champion now predicts as checkpoint 3 does.
    moved = resolve_model(f"models:/{name}@champion")
    new = resolve_model(str(ckpts[3]))
    assert np.array_equal(np.stack(predict_labels(moved.net, list(batch), moved.mean_bgr)),
                          np.stack(predict_labels(new.net, list(batch), new.mean_bgr)))
    client.delete_model_version(name, "3")  # a deleted version is not served from the cache
    assert model_cache.logged_model_id(f"models:/{name}/3", uri) is None

    # Who was champion when: 1, then 2, then 4 (3 never was).
    history = model_history(name)
    assert [h["version"] for h in history] == ["1", "2", "4"]
    assert [h["replaced_version"] for h in history] == ["-", "1", "2"]
    assert [h["replaced_by"] for h in history] == ["2", "4", None]
    assert [h["current"] for h in history] == [False, False, True]
    assert history[0]["until"] == history[1]["since"] and history[1]["until"] == \
        history[2]["since"] and history[2]["until"] is None
    assert history[0]["since"] < history[1]["since"] < history[2]["since"]
    assert history[2]["decision"] == tie.decision and history[1]["mean_iu"] == repr(0.45)


@pytest.mark.parametrize("variant", ["fcn32s_googlenet", "unet",
                                     "deeplabv3_mobilenet_v3_large"])
def test_other_trunks_evaluate_register_and_serve_like_vgg16(data, tmp_path, monkeypatch,
                                                              variant):
    """Table 1's nets and the successors go the same way as the VGG16 ones: evaluated,
    registered with their arch and backbone in the lineage, and served by stock
    mlflow.pyfunc from the shipped fcn_core (torchvision in the requirements where it builds
    the net)."""
    import mlflow
    import mlflow.pyfunc

    from fcn_core.inference import predict_labels
    from fcn_core.models import build_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FCN_DATA_DIR", str(tmp_path / "data"))
    from pipelines.tracking import tracking_uri

    torch.manual_seed(0)
    from fcn_core.models import SCALABLE, needs_torchvision

    successor = not variant.startswith("fcn32s_")
    net = build_model(variant, num_classes=21, width=1 / 8 if variant in SCALABLE else 1.0)
    if not successor:  # zero at start: random scores, so the predictions vary
        torch.nn.init.normal_(net.heads["out"].score_fr.weight, std=1.0)
    else:  # untrained batch norms (mean 0, var 1) on raw pixels give one class everywhere:
        calibrate_batch_norms(net)  # statistics of real inputs, as training would give
    ckpt = tmp_path / "c"
    write_checkpoint(ckpt / CHECKPOINT_FILE, net, config={"dataset": "voc", "input": "rgb"})
    result = evaluate(str(ckpt), data, "val", log=lambda m: None)
    assert result.images == 7 and 0 <= result.metrics["mean_iu"] <= 1
    name = f"fcn-{variant.replace('_', '-')}"
    reg = register(str(ckpt), name=name, metrics=result.metrics, split="val",
                   manifest=read_manifest(data).data, config_digest="abc", log=lambda m: None)
    v = MlflowClient(tracking_uri()).get_model_version(name, reg.version)
    backbone = {"unet": "none"}.get(variant, variant.split("_", 1)[-1])
    assert (v.tags["variant"], v.tags["arch"], v.tags["backbone"], v.tags["stage"]) == (
        variant, variant, backbone, "train" if successor else "32s")
    # Big enough for several stride-32 cells, and with dark and bright blocks, so the
    # classes vary.
    batch = np.random.default_rng(1).integers(0, 64, (2, 101, 133, 3), dtype=np.uint8)
    batch[:, :50, :60] += 190
    batch[1, 60:, 70:, 1] = 255
    mlflow.set_tracking_uri(tracking_uri())
    uri = f"models:/{name}/{reg.version}"
    labels = mlflow.pyfunc.load_model(uri).predict(batch)
    own = resolve_model(str(ckpt))
    expected = np.stack(predict_labels(own.net, list(batch), own.mean_bgr)).astype(np.int64)
    assert labels.shape == (2, 101, 133)
    # The batch in one forward vs one image at a time: the same up to float ties.
    assert (labels == expected).mean() > 0.999
    assert len(np.unique(labels)) > 1
    reqs = Path(mlflow.artifacts.download_artifacts(f"{uri}/requirements.txt",
                                                     dst_path=str(tmp_path / "r"))).read_text()
    assert ("torchvision==" in reqs) == needs_torchvision(variant), reqs


def calibrate_batch_norms(net: torch.nn.Module) -> None:
    """Set every batch norm's running statistics to those of one batch of varied images."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    x = torch.randn(2, 3, 64, 64) * 60
    x[:, :, :32] += 80
    net.train()
    with torch.no_grad():
        net(x)
    net.eval()


def test_a_retried_registration_reuses_its_version(data, tmp_path, monkeypatch):
    """A registration that failed after its version was created (here: re-scoring the
    champion failed) is retried: the same version, one logged model, one register run, and
    the gate runs then; a third call changes nothing."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FCN_DATA_DIR", str(tmp_path / "data"))
    from pipelines.tracking import tracking_uri

    manifest = read_manifest(data).data
    name = "fcn-retry"
    c0, c1 = save_checkpoint(tmp_path / "c0", seed=0), save_checkpoint(tmp_path / "c1", seed=1)
    calls: list[str] = []

    def crashing(uri: str) -> float:
        calls.append(uri)
        raise RuntimeError("the evaluation cluster went away")

    def rescore(uri: str) -> float:
        calls.append(uri)
        return 0.45

    def reg(ckpt: Path, split: str, evaluator=None):
        return register(str(ckpt), name=name, metrics={"mean_iu": 0.5}, split=split,
                        manifest=manifest, config_digest="abc", evaluate_champion=evaluator,
                        log=lambda m: None)

    assert reg(c0, "val").version == "1"
    client = MlflowClient(tracking_uri())
    # Scored on another split: the gate must re-score the champion, and that fails.
    with pytest.raises(RuntimeError, match="went away"):
        reg(c1, "test", crashing)
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    assert aliases == {"champion": "1", "candidate": "2"}  # the alias did not move
    assert "champion_decision" not in client.get_model_version(name, "2").tags

    again = reg(c1, "test", rescore)
    assert (again.version, again.reused, again.champion) == ("2", True, True)
    assert "0.5000 >= 0.4500 of version 1" in again.decision
    assert calls == [f"models:/{name}/1"] * 2
    third = reg(c1, "test", rescore)
    assert (third.version, third.reused) == ("2", True)
    # ... and says where the alias is now, not what the gate said then
    assert third.decision == "champion now: version 2 (mean IU 0.5000 on test)", third.decision
    assert len(calls) == 2  # the gate did not run again

    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(v.version for v in versions) == [1, 2]
    exp = client.get_run(again.run_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.register_model = '{name}'")
    assert len(runs) == 2  # one register run per checkpoint, found again on retries
    logged = client.search_logged_models([exp], filter_string="tags.checkpoint_sha256 = "
                                                              f"'{_sha256(c1)}'")
    assert len(logged) == 1  # logged once, not once per attempt

    # A lookup with no tracking URI given uses the project's store, not MLflow's default
    # (a new mlflow.db in the current folder): what `fcn predict --model models:/...` does.
    import mlflow

    mlflow.set_tracking_uri(None)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert resolve_model(f"models:/{name}@champion").source == f"models:/{name}@champion"
    assert list((tmp_path / "cwd").iterdir()) == []


class _Registry:
    """An HTTP proxy in front of a real MLflow server that answers some reads with an error
    (``fail`` maps a path prefix to (status, MLflow error code)); everything else passes."""

    def __init__(self, upstream: str, fail: dict[str, tuple[int, str]]):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        target = urlsplit(upstream)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                for prefix, (status, code) in fail.items():
                    if self.command == "GET" and self.path.startswith(prefix):
                        body = json.dumps({"error_code": code,
                                           "message": "registry unavailable"}).encode()
                        return self._reply(status, [("Content-Type", "application/json")],
                                           body)
                n = int(self.headers.get("Content-Length") or 0)
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=self.rfile.read(n) if n else None,
                             headers=headers)
                r = conn.getresponse()
                keep = [(k, v) for k, v in r.getheaders()
                        if k.lower() not in ("transfer-encoding", "connection",
                                             "content-length")]
                self._reply(r.status, keep, r.read())
                conn.close()

            def _reply(self, status: int, headers: list, body: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "_Registry":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_gate_fails_closed_when_the_champion_cannot_be_read(data, tmp_path, monkeypatch,
                                                                 mlflow_server):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail now, not in minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    manifest = read_manifest(data).data
    name = f"fcn-closed-{uuid.uuid4().hex[:6]}"
    c0, c1 = save_checkpoint(tmp_path / "c0", seed=0), save_checkpoint(tmp_path / "c1", seed=1)
    server = MlflowClient(mlflow_server.tracking_uri)

    def reg(ckpt: Path, miu: float):
        return register(str(ckpt), name=name, metrics={"mean_iu": miu}, split="val",
                        manifest=manifest, config_digest="abc", log=lambda m: None)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
    assert reg(c0, 0.40).champion

    def aliases() -> dict[str, str]:
        return {k: str(v) for k, v in server.get_registered_model(name).aliases.items()}

    # 1. The registry answers 503 to reads of the champion alias: a better model is
    #    registered (candidate), but champion does not move, and the error is one line.
    reads = {"/api/2.0/mlflow/registered-models/alias": (503, "TEMPORARILY_UNAVAILABLE")}
    with _Registry(mlflow_server.tracking_uri, reads) as proxy:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
        with pytest.raises(ServiceUnavailable) as err:
            reg(c1, 0.90)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "alias champion did not move" in message
    assert "HTTP 503" in message and "version 2" in message and err.value.transient
    assert aliases() == {"champion": "1", "candidate": "2"}

    # 2. Permission denied on the read, or nothing listening at all: same, straight at the
    #    gate (not transient when denied: a retry would not help).
    denied = {"/api/2.0/mlflow/registered-models/alias": (403, "PERMISSION_DENIED")}
    with _Registry(mlflow_server.tracking_uri, denied) as proxy:
        with pytest.raises(ServiceUnavailable, match="PERMISSION_DENIED.*did not move") as e:
            gate_champion(MlflowClient(proxy.url), name, "2", 0.9, "val",
                          manifest["source"]["fingerprint"])
        assert not e.value.transient
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening
        with pytest.raises(ServiceUnavailable, match="did not move"):
            gate_champion(MlflowClient(nobody), name, "2", 0.9, "val",
                          manifest["source"]["fingerprint"])
    assert aliases() == {"champion": "1", "candidate": "2"}

    # 3. The server answers again: the retry finishes the same version.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
    retry = reg(c1, 0.90)
    assert (retry.version, retry.reused, retry.champion) == ("2", True, True)
    assert aliases() == {"champion": "2", "candidate": "2"}
    assert len(server.search_model_versions(f"name = '{name}'")) == 2


def test_a_checkpoint_in_a_bucket_resolves_like_a_local_one(tmp_path, monkeypatch,
                                                             s3_server):
    from pipelines import storage

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.create_bucket("fcn-ckpt")
    local = save_checkpoint(tmp_path / "c", seed=5)
    remote = f"{bucket}/runs/c"
    storage.write_bytes(f"{remote}/{CHECKPOINT_FILE}", (local / CHECKPOINT_FILE).read_bytes())
    x = torch.randn(1, 3, 40, 40)
    a, b = resolve_model(remote), resolve_model(str(local))
    assert a.source == remote and a.mean_bgr == b.mean_bgr
    assert torch.equal(a.net(x), b.net(x))


def test_the_dataset_is_recorded_on_a_run(data, tmp_path):
    import mlflow

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("lineage", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(exp).info.run_id
    manifest = read_manifest(data)
    log_dataset_input(client, run, manifest.location, manifest.data)
    (inp,) = client.get_run(run).inputs.dataset_inputs
    ds = inp.dataset
    assert ds.name == "voc" and ds.digest == manifest.fingerprint[:36]  # MLflow's limit
    assert json.loads(ds.source)["uri"] == manifest.location
    profile = json.loads(ds.profile)
    assert profile["splits"] == {s: manifest.data["splits"][s]["rows"] for s in manifest.splits}
    assert profile["num_rows"] == 9 and profile["version"] == manifest.data["version"]
    assert profile["fingerprint"] == manifest.fingerprint
    assert {c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]} >= {"image", "label"}
    assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "training")]
    # The mlflow module works as the client too (its tracking URI).
    mlflow.set_tracking_uri(client.tracking_uri)
    run2 = client.create_run(exp).info.run_id
    log_dataset_input(mlflow, run2, manifest.location, manifest.data, context="evaluation")
    (inp2,) = client.get_run(run2).inputs.dataset_inputs
    assert inp2.dataset.digest == ds.digest and inp2.tags[0].value == "evaluation"


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


def test_a_sqlite_store_keeps_its_artifacts_beside_it_not_in_the_working_folder(
        tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI=sqlite:///PATH: new experiments put artifacts in PATH's folder
    (artifacts/NAME), never in ./mlruns of whatever folder the command ran in."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import experiment_id

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(uri)
    exp = client.get_experiment(experiment_id(client, "fcn-t"))
    assert exp.artifact_location == (store / "artifacts" / "fcn-t").as_uri()
    run = client.create_run(exp.experiment_id)
    (tmp_path / "a.txt").write_text("x")
    client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))
    assert not (tmp_path / "mlruns").exists()
    assert list((store / "artifacts" / "fcn-t").rglob("a.txt"))
