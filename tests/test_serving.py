"""Serving without pickle: pickle-free checkpoints, the models-from-code pyfunc loaded by a
process that never imported this project, and `mlflow models serve` answering over HTTP."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcn_core import fcn8s
from fcn_core.inference import predict_labels
from pipelines.registry import ModelLookupError, register, resolve_model
from pipelines.train.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    load_model,
    open_checkpoint,
    read_checkpoint,
    write_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = {"dataset": "voc", "version": "v1", "source": {"fingerprint": "f" * 64}}


def tiny_net(seed: int) -> torch.nn.Module:
    """An untrained FCN-8s, width 1/16, with random score layers (varied predictions)."""
    torch.manual_seed(seed)
    model = fcn8s(width=1 / 16)
    for name, m in model.named_modules():
        if name.split(".")[-1].startswith("score_"):
            torch.nn.init.normal_(m.weight, std=1.0)
    return model


def trained_one_step(model: torch.nn.Module) -> torch.optim.Optimizer:
    """An SGD optimizer with momentum buffers: a training checkpoint's optimizer state."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    opt.step()
    return opt


# ---------------------------------------------------------------- checkpoints: no pickle

def test_checkpoints_load_with_weights_only_and_keep_everything(tmp_path):
    model = tiny_net(0)
    opt = trained_one_step(model)
    loc = write_checkpoint(tmp_path / "c" / CHECKPOINT_FILE, model, optimizer=opt, step=7,
                           stage="32s", config={"dataset": "voc", "stages": ({"lr": 1e-3},)})
    raw = torch.load(loc, map_location="cpu", weights_only=True)  # what "no pickle" means
    assert raw["format"] == "fcn-checkpoint/2" and raw["step"] == 7 and raw["stage"] == "32s"
    assert raw["config"]["stages"] == [{"lr": 1e-3}]  # JSON: the tuple came back a list
    assert raw["arch"] == {"kind": "fcn", **model.config.to_dict()}
    momentum = raw["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, opt.state_dict()["state"][0]["momentum_buffer"])
    again = load_model(tmp_path / "c")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    ck = open_checkpoint(tmp_path / "c")  # a folder resolves to its checkpoint.pt
    assert ck.sha256 == hashlib.sha256(Path(loc).read_bytes()).hexdigest()


def test_the_older_checkpoint_layout_still_loads(tmp_path):
    """Files written before this format (same keys, no "format") load with weights_only."""
    model = tiny_net(1)
    opt = trained_one_step(model)
    (tmp_path / "old").mkdir()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 3,
                "stage": "32s", "arch": {"kind": "fcn", **model.config.to_dict()},
                "config": {"dataset": "voc", "input": "rgb"}}, tmp_path / "old" / CHECKPOINT_FILE)
    state = read_checkpoint(tmp_path / "old")
    assert state["step"] == 3 and "format" not in state
    x = torch.randn(1, 3, 40, 40)
    model.eval()
    assert torch.equal(load_model(tmp_path / "old").eval()(x), model(x))


class _Payload:
    """A pickle that runs code when unpickled: it would create the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    model = tiny_net(2)
    marker = tmp_path / "code-ran"
    bad = tmp_path / "bad" / CHECKPOINT_FILE
    bad.parent.mkdir()
    torch.save({"model": model.state_dict(), "arch": {"kind": "fcn", **model.config.to_dict()},
                "config": {"dataset": "voc"}, "hook": _Payload(marker)}, bad)
    with pytest.raises(CheckpointError, match="not a pickle-free checkpoint") as e:
        read_checkpoint(bad)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ModelLookupError, match="pickle-free"):
        resolve_model(str(bad.parent))
    assert not marker.exists()


def test_metadata_that_json_cannot_hold_is_refused_when_written(tmp_path):
    with pytest.raises(TypeError, match="config"):
        write_checkpoint(tmp_path / CHECKPOINT_FILE, tiny_net(0),
                         config={"weights": Path("/x/vgg16.pth")})
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def tiny_nyud_net(input: str, seed: int) -> torch.nn.Module:
    """An untrained width-1/16 FCN-8s for one of NYUD's inputs (two of them, late fusion,
    for rgb-hha), random score layers."""
    from fcn_core.fcn import LateFusion

    if input == "rgb-hha":
        return LateFusion(tiny_net(seed), tiny_net(seed + 1))
    torch.manual_seed(seed)
    model = fcn8s(width=1 / 16, in_channels=4 if input == "rgbd" else 3)
    for name, m in model.named_modules():
        if name.split(".")[-1].startswith("score_"):
            torch.nn.init.normal_(m.weight, std=1.0)
    return model


def nyud_batch(input: str, seed: int = 0, shape: tuple[int, int] = (45, 61)
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(the stacked array a served model of ``input`` takes, the same images as a
    ``training_batch`` for ``model_input``)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    hha = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    depth = rng.integers(0, 9000, (2, *shape), dtype=np.uint16)
    depth[0, :5] = 0  # holes read as 1 mm, in both
    pad = np.zeros((2, *shape), bool)
    stacked = {"hha": hha, "rgb-hha": np.concatenate([rgb, hha], axis=3),
               "rgbd": np.concatenate([rgb.astype(np.uint16), depth[..., None]], axis=3)}
    batch = {"image": np.concatenate([rgb, hha], axis=3) if "hha" in input else rgb,
             "depth": depth, "pad": pad}
    return stacked[input], batch


@pytest.mark.parametrize("input", ["hha", "rgbd", "rgb-hha"])
def test_nyud_nets_are_served_from_stacked_inputs_as_evaluation_reads_them(tmp_path, input):
    """A NYUD net (HHA, RGB-D or RGB + HHA late fusion) is served from one stacked
    (N, H, W, C) array: uint8 HHA as stored, uint16 RGB + depth in mm, uint8 RGB then HHA.
    Its labels are exactly those of evaluation's input path (``model_input``) on the same
    images; the wrong channel count or a value out of the dtype's range is refused by name."""
    from fcn_core.serving import load_checkpoint, predict_ids, serving_model
    from pipelines.shards import model_input

    write_checkpoint(tmp_path / CHECKPOINT_FILE, tiny_nyud_net(input, 5),
                     config={"dataset": "nyud", "input": input})
    state = load_checkpoint((tmp_path / CHECKPOINT_FILE).read_bytes())
    served = serving_model(state)
    stacked, batch = nyud_batch(input)
    got = predict_ids(served, stacked)
    own = resolve_model(str(tmp_path))
    assert own.input == input
    with torch.no_grad():
        x, _ = model_input(batch, own.mean_bgr, "cpu", input)
        expected = own.net(x).argmax(1).numpy()
    assert got.shape == (2, 45, 61) and got.dtype == np.int64
    assert np.array_equal(got, expected)
    assert len(np.unique(got)) > 1  # a real prediction, not a constant
    c = stacked.shape[-1]
    with pytest.raises(ValueError, match=rf"images must be \(N, H, W, {c}\)"):
        predict_ids(served, stacked[..., :-1])
    too_big = stacked.astype(np.int64)
    too_big[0, 0, 0, -1] = np.iinfo(stacked.dtype).max + 1
    with pytest.raises(ValueError, match=f"values 0..{np.iinfo(stacked.dtype).max}"):
        predict_ids(served, too_big)
    assert np.array_equal(predict_ids(served, stacked.astype(np.int64)), got)  # in range: fine
    if input == "rgbd":  # depth may use 16 bits, colour may not
        bright = stacked.copy()
        bright[0, 0, 0, 0] = 256
        with pytest.raises(ValueError, match="R, G, B in 0..255, got up to 256"):
            predict_ids(served, bright)


# ---------------------------------------------------------------- the registered model

@pytest.fixture(scope="module")
def champion(tmp_path_factory, monkeypatch_module):
    """A tiny model registered as champion in a SQLite store of its own (a user's process
    gets its URI as MLFLOW_TRACKING_URI)."""
    from pipelines.tracking import tracking_uri

    root = tmp_path_factory.mktemp("serving")
    # The project's default store: SQLite and artifacts under the data folder.
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch_module.setenv("FCN_DATA_DIR", str(root / "data"))
    uri = tracking_uri()
    ckpt = root / "ckpt"
    write_checkpoint(ckpt / CHECKPOINT_FILE, tiny_net(3),
                     config={"dataset": "voc", "input": "rgb"})
    reg = register(str(ckpt), name="fcn-serve", metrics={"mean_iu": 0.5}, split="val",
                   manifest=MANIFEST, config_digest="-", log=lambda m: None)
    assert reg.champion
    return {"uri": uri, "model": "models:/fcn-serve@champion", "ckpt": ckpt, "root": root}


@pytest.fixture(scope="module")
def image(realdata) -> np.ndarray:
    """A real photo (SBD 2008_000051.jpg, 500x371), uint8 RGB (H, W, 3)."""
    return np.array(Image.open(realdata / "sbd" / "dataset" / "img" / "2008_000051.jpg")
                    .convert("RGB"))


def _clean_env(uri: str) -> dict[str, str]:
    """The environment of a user's process with the venv active (``mlflow models serve``
    execs ``uvicorn`` from PATH), and no PYTHONPATH to this checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MLFLOW_TRACKING_URI"] = uri
    return env


def test_a_process_that_never_imported_the_project_loads_and_predicts(champion, image,
                                                                     tmp_path):
    np.save(tmp_path / "x.npy", image[None])
    code = (
        "import json, sys, numpy as np, mlflow.pyfunc\n"
        f"m = mlflow.pyfunc.load_model({champion['model']!r})\n"
        "y = m.predict(np.load('x.npy'))\n"
        "np.save('y.npy', y)\n"
        "import fcn_core\n"
        "print(json.dumps({'pipelines': [k for k in sys.modules if k.split('.')[0] in "
        "('pipelines', 'flows')], 'fcn_core': fcn_core.__file__, 'dtype': str(y.dtype)}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180, env=_clean_env(champion["uri"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["pipelines"] == []  # the model's code is fcn_core alone
    assert not Path(report["fcn_core"]).is_relative_to(ROOT)  # shipped with the model
    assert report["dtype"] == "int64"
    got = np.load(tmp_path / "y.npy")
    own = resolve_model(str(champion["ckpt"]))
    expected = np.stack(predict_labels(own.net, [image], own.mean_bgr)).astype(np.int64)
    assert got.shape == (1, *image.shape[:2]) and np.array_equal(got, expected)
    assert len(np.unique(got)) > 1  # a real prediction, not a constant


@pytest.mark.parametrize("input", ["rgbd", "rgb-hha"])
def test_nyud_models_register_and_serve_through_stock_pyfunc(champion, tmp_path, input):
    """Registration takes NYUD's RGB-D and late-fusion nets: the version says what it reads
    (its ``input`` tag and signature: uint16 (-1, -1, -1, 4), uint8 (-1, -1, -1, 6)), and
    the stock pyfunc predicts from the stacked array what the net itself does; an RGB array
    is refused by MLflow's schema check."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from fcn_core.serving import predict_ids, serving_model
    from pipelines.train.checkpoint import read_checkpoint

    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt / CHECKPOINT_FILE, tiny_nyud_net(input, 7),
                     config={"dataset": "nyud", "input": input})
    name = f"fcn-nyud-{input}"
    reg = register(str(ckpt), name=name, metrics={"mean_iu": 0.3}, split="test",
                   manifest={**MANIFEST, "dataset": "nyud"}, config_digest="-",
                   log=lambda m: None)
    version = MlflowClient(champion["uri"]).get_model_version(name, reg.version)
    assert version.tags["input"] == input
    mlflow.set_tracking_uri(champion["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{name}/{reg.version}")
    (spec,) = model.metadata.get_input_schema().inputs
    channels, dtype = (4, np.uint16) if input == "rgbd" else (6, np.uint8)
    assert (spec.shape, spec.type) == ((-1, -1, -1, channels), np.dtype(dtype))
    stacked, _ = nyud_batch(input, seed=3)
    got = model.predict(stacked)
    own = predict_ids(serving_model(read_checkpoint(ckpt / CHECKPOINT_FILE)), stacked)
    assert np.array_equal(got, own) and len(np.unique(got)) > 1
    with pytest.raises(MlflowException, match="shape"):
        model.predict(np.zeros((1, 32, 32, 3), dtype))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (its uvicorn workers), SIGKILL if it
    lingers; only what this test started."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def test_mlflow_models_serve_answers_with_class_ids(champion, image, tmp_path):
    import mlflow.pyfunc

    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
         champion["model"], "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=_clean_env(champion["uri"]), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve did not answer"
                time.sleep(0.5)
        body = json.dumps({"inputs": image[None].tolist()}).encode()
        req = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.load(io.TextIOWrapper(r, encoding="utf-8"))
    finally:
        _stop(proc)
        log.close()
    ids = np.array(answer["predictions"])
    assert ids.shape == (1, *image.shape[:2]) and np.issubdtype(ids.dtype, np.integer)
    mlflow.set_tracking_uri(champion["uri"])
    local = mlflow.pyfunc.load_model(champion["model"]).predict(image[None])
    assert np.array_equal(ids, local) and ids.min() >= 0 and ids.max() < 21
    assert len(np.unique(ids)) > 1


def test_a_pickled_model_of_an_older_version_is_refused_by_name(champion, tmp_path):
    """Versions registered before models-from-code are pickles: the project's lookup does
    not unpickle them; it says what to do instead."""
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from fcn_core.serving import SegmentationModel
    from pipelines.registry import model_history

    client = MlflowClient(champion["uri"])
    exp = client.create_experiment("legacy", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(exp).info.run_id
    mlflow.set_tracking_uri(champion["uri"])
    with mlflow.start_run(run_id=run):
        mlflow.pytorch.log_model(SegmentationModel(tiny_net(4), (104.0, 116.7, 122.7)),
                                 name="legacy", serialization_format="pickle",
                                 pip_requirements=["torch"])
    with pytest.raises(ModelLookupError, match="pickled PyTorch model.*register its"):
        resolve_model(f"runs:/{run}/legacy", champion["uri"])
    # The champion's history: one reign, still going.
    (row,) = model_history("fcn-serve")
    assert row["version"] == "1" and row["current"] and row["until"] is None
    with pytest.raises(ModelLookupError, match="no registered model named 'nope'"):
        model_history("nope")
