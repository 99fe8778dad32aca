"""Pre-flight checks: a user's mistake is refused in one line before any MLflow run or Ray
Train work starts (never a "stage failed, resume with ..." message, never a silent new run,
never a worker spinning on an empty shard).

Real manifests: the generated VOC layout ingested as ``synthetic`` (3 train + 2 val rows), and
a copy whose val images are all 0-byte files (an empty val split after quarantine).
"""

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines import preflight, train
from pipelines.config import TrainConfig
from pipelines.errors import UserError
from pipelines.ingest import IngestConfig, ingest
from pipelines.preflight import (
    DatasetMismatch,
    MissingInput,
    PreflightError,
    SplitTooSmall,
    UnknownRun,
)
from pipelines.shards import ManifestError, read_manifest
from pipelines.sources import synthetic as synth
from pipelines.train import driver as train_driver

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

# What a 3-row dataset can train with: one worker, a quarter CPU (no Ray work runs anyway).
OK = dict(name="pf", dataset="synthetic", width=1 / 16, workers=1, cpus_per_worker=0.25,
          optimizer="adam", stages=({"name": "32s", "steps": 2, "lr": 1e-3},))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    raw = synth.write_voc(root / "raw", n_train=3, n_val=2, size=(32, 32)).parents[1]
    ingest(IngestConfig(dataset="synthetic", root=raw, out=root / "out"), log=lambda m: None)
    # The same layout with every val image a 0-byte file: ingest quarantines them all.
    empty = synth.write_voc(root / "raw_empty_val", n_train=3, n_val=2, size=(32, 32))
    for id_ in (empty / "ImageSets/Segmentation/val.txt").read_text().split():
        (empty / "JPEGImages" / f"{id_}.jpg").write_bytes(b"")
    ingest(IngestConfig(dataset="synthetic", root=empty.parents[1], out=root / "out_empty"),
           log=lambda m: None)
    return {"ok": root / "out" / "synthetic", "empty_val": root / "out_empty" / "synthetic"}


@pytest.fixture
def guarded(tmp_path, monkeypatch):
    """MLflow in a fresh SQLite file; any stage reaching Ray Train fails the test."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")

    def no_stage(*args, **kwargs):
        raise AssertionError("a stage reached Ray Train: pre-flight let a mistake through")

    monkeypatch.setattr(train_driver, "train_stages", no_stage)  # where run_stage looks
    return db


def _refused(cfg: TrainConfig, data: Path, tmp_path: Path, db: Path, error: type,
             **kwargs) -> str:
    """train_pipeline refuses ``cfg`` with ``error`` before MLflow or Ray Train; the line."""
    t0 = time.perf_counter()
    with pytest.raises(error) as err:
        train.train_pipeline(cfg, data, storage=tmp_path / "runs", log=lambda m: None,
                             **kwargs)
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert isinstance(err.value, UserError) and not isinstance(err.value, train.StageFailed)
    assert "\n" not in msg and "--resume" not in msg  # not a "stage failed, resume" line
    assert not db.exists(), "an MLflow store was touched before the pre-flight refused"
    assert not (tmp_path / "runs").exists()
    return msg


def test_the_fixture_data_is_what_the_cases_assume(data):
    rows = {s: v["rows"] for s, v in read_manifest(data["ok"]).data["splits"].items()}
    assert rows == {"train": 3, "val": 2}
    empty = read_manifest(data["empty_val"]).data["splits"]
    assert empty["train"]["rows"] == 3 and empty["val"]["rows"] == 0
    assert empty["val"]["rejected"] == 2


def test_good_inputs_pass_every_check(data, tmp_path):
    weights = tmp_path / "vgg16.pth"
    weights.write_bytes(b"not empty")
    cfg = TrainConfig(**{**OK, "workers": 2, "backbone_weights": str(weights)})
    manifest = preflight.check_training(cfg, data["ok"])
    assert manifest.data["dataset"] == "synthetic"


def test_config_dataset_must_match_the_manifest(data, tmp_path, guarded):
    msg = _refused(TrainConfig(**{**OK, "dataset": "voc"}), data["ok"], tmp_path, guarded,
                   DatasetMismatch)
    assert f"is for dataset 'voc' but the data at {data['ok']} is 'synthetic'" in msg
    assert "give --data an ingested voc dataset" in msg


def test_a_dataset_named_before_ingest_must_be_the_config_s():
    preflight.check_dataset_name(TrainConfig(**OK), "synthetic")
    with pytest.raises(DatasetMismatch, match=r"^config 'pf' is for dataset 'synthetic' but "
                                              r"the run ingests 'voc': .*--dataset synthetic$"):
        preflight.check_dataset_name(TrainConfig(**OK), "voc")


def test_a_head_with_other_classes_than_the_labels(data, tmp_path, guarded):
    msg = _refused(TrainConfig(**{**OK, "heads": {"semantic": 5}}), data["ok"], tmp_path,
                   guarded, DatasetMismatch)
    assert "heads.semantic: 5 classes, but the labels at" in msg and "have 21" in msg


def test_no_ingested_dataset(tmp_path, guarded):
    with pytest.raises(ManifestError, match="no ingested dataset at .*run `fcn ingest` first"):
        train.train_pipeline(TrainConfig(**OK), tmp_path / "nothing", storage=tmp_path / "r",
                             log=lambda m: None)
    assert not guarded.exists()


@pytest.mark.parametrize("kind", ["missing", "folder", "empty"])
def test_missing_backbone_weights_is_a_usage_error_before_any_work(data, tmp_path, guarded,
                                                                   kind):
    where = {"missing": str(tmp_path / "vgg16.pth"), "folder": str(tmp_path),
             "empty": str(tmp_path / "empty.pth")}[kind]
    (tmp_path / "empty.pth").write_bytes(b"")
    msg = _refused(TrainConfig(**{**OK, "backbone_weights": where}), data["ok"], tmp_path,
                   guarded, MissingInput)
    expected = {"missing": "no such file", "folder": "is a folder, not a file",
                "empty": "the file is empty"}[kind]
    assert msg.startswith(f"backbone weights {where}: {expected}"), msg
    assert "give --backbone-weights" in msg


def test_missing_init_checkpoint(data, tmp_path, guarded):
    msg = _refused(TrainConfig(**OK), data["ok"], tmp_path, guarded, MissingInput,
                   init_checkpoint=str(tmp_path / "ckpt"))
    assert "init checkpoint" in msg and "no such file or folder" in msg
    (tmp_path / "ckpt").mkdir()
    msg = _refused(TrainConfig(**OK), data["ok"], tmp_path, guarded, MissingInput,
                   init_checkpoint=str(tmp_path / "ckpt"))
    assert "a folder without checkpoint.pt" in msg
    (tmp_path / "ckpt" / "checkpoint.pt").write_bytes(b"x")
    preflight.check_start(TrainConfig(**OK), str(tmp_path / "ckpt"))
    # An init checkpoint, not the backbone weights, is what the first stage starts from.
    cfg = TrainConfig(**{**OK, "backbone_weights": str(tmp_path / "gone.pth")})
    preflight.check_start(cfg, str(tmp_path / "ckpt"))
    with pytest.raises(MissingInput, match="gone.pth: no such file"):
        preflight.check_start(cfg)


def test_an_empty_split_is_refused(data, tmp_path, guarded):
    msg = _refused(TrainConfig(**OK), data["empty_val"], tmp_path, guarded, SplitTooSmall)
    assert f"split 'val' of {data['empty_val']} is empty (0 rows; 2 rejected" in msg
    assert "quarantine.parquet" in msg


def test_a_split_that_is_not_there(data, tmp_path, guarded):
    msg = _refused(TrainConfig(**{**OK, "train_split": "trian"}), data["ok"], tmp_path,
                   guarded, SplitTooSmall)
    assert "train_split 'trian' is not in" in msg and "did you mean 'train'?" in msg
    assert "rows: train 3, val 2" in msg


@pytest.mark.timeout(120)  # without the check, every worker spins on an empty shard
def test_fewer_rows_than_workers_is_refused_quickly_on_the_real_path(data, tmp_path,
                                                                     monkeypatch):
    """No guard on train_stages here: this is the path that used to spin forever (4 workers,
    3 rows: Ray Train's equal split gives every worker 0 rows)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = TrainConfig(**{**OK, "workers": 4})
    msg = _refused(cfg, data["ok"], tmp_path, tmp_path / "mlflow.db", SplitTooSmall)
    assert msg == (f"split 'train' of {data['ok']} has 3 row(s), fewer than the 4 training "
                   "workers (each needs at least one): use --workers 3 (workers: 3 in the "
                   "config) or ingest more rows")


def test_a_val_split_with_fewer_rows_than_workers(data, tmp_path, guarded):
    msg = _refused(TrainConfig(**{**OK, "workers": 3}), data["ok"], tmp_path, guarded,
                   SplitTooSmall)
    assert "split 'val'" in msg and "has 2 row(s), fewer than the 3 training workers" in msg


def test_run_stage_checks_too(data, tmp_path, guarded):
    """A stage run on its own (a Prefect task) gets the same checks before its MLflow run."""
    run = train.PipelineRun("pf-1", str(tmp_path / "runs"), "no-such-mlflow-run")
    cfg = TrainConfig(**{**OK, "workers": 4})
    with pytest.raises(SplitTooSmall):
        train.run_stage(cfg, cfg.stages[0], data["ok"], run, None, log=lambda m: None)
    with pytest.raises(MissingInput):
        train.run_stage(TrainConfig(**OK), cfg.stages[0], data["ok"], run,
                        str(tmp_path / "nope"), log=lambda m: None)
    assert not guarded.exists()


def test_resume_with_an_unknown_run_id_is_an_error_not_a_new_run(data, tmp_path, guarded):
    runs = tmp_path / "runs"
    (runs / "pf-20261122-101010-abcdef").mkdir(parents=True)
    cfg = TrainConfig(**OK)
    with pytest.raises(UnknownRun) as err:
        train.train_pipeline(cfg, data["ok"], storage=runs, resume="pf-20261122-101010-abcdeg",
                             log=lambda m: None)
    msg = str(err.value)
    assert msg.startswith(f"--resume pf-20261122-101010-abcdeg: no such pipeline run in "
                          f"{runs} or in MLflow experiment 'fcn-synthetic'")
    assert "did you mean 'pf-20261122-101010-abcdef'?" in msg
    assert "leave out --resume to start a new run" in msg
    client = MlflowClient(f"sqlite:///{guarded}")
    exp = client.get_experiment_by_name("fcn-synthetic")
    assert exp is None or not client.search_runs([exp.experiment_id]), "a run was created"
    assert sorted(p.name for p in runs.iterdir()) == ["pf-20261122-101010-abcdef"]

    # An id that could not be a run id (it would break MLflow's filter) is refused as such.
    with pytest.raises(UnknownRun, match=r"--resume \"x' or '1'='1\": not a pipeline run id"):
        train.train_pipeline(cfg, data["ok"], storage=runs, resume="x' or '1'='1",
                             log=lambda m: None)


def test_resume_finds_a_run_by_its_folder_or_its_mlflow_parent(data, tmp_path, guarded):
    runs = tmp_path / "runs"
    cfg = TrainConfig(**OK)
    # Known by MLflow only (stopped before any stage wrote to its folder).
    first = train.start_pipeline_run(cfg, data["ok"], runs, log=lambda m: None)
    assert not (runs / first.run_id).exists()
    again = train.start_pipeline_run(cfg, data["ok"], runs, resume=first.run_id,
                                     log=lambda m: None)
    assert again.mlflow_parent == first.mlflow_parent
    # Known by its folder only (e.g. an MLflow store that was reset).
    (runs / "pf-old").mkdir(parents=True)
    old = train.start_pipeline_run(cfg, data["ok"], runs, resume="pf-old", log=lambda m: None)
    assert old.run_id == "pf-old"
    preflight.check_resume("pf-old", runs)  # the folder alone is enough
    with pytest.raises(UnknownRun, match="the newest there: pf-old"):
        preflight.check_resume("zzz", runs, lambda: False)


def test_the_checkpoint_file_name_is_the_training_code_s():
    assert preflight.CHECKPOINT_FILE == train.CHECKPOINT_FILE


def test_every_preflight_error_is_a_user_error():
    for cls in (DatasetMismatch, MissingInput, SplitTooSmall, UnknownRun):
        assert issubclass(cls, PreflightError) and issubclass(cls, UserError)
        assert not issubclass(cls, train.StageFailed)
