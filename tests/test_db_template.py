"""A new MLflow SQLite store is a copy of the migrated template of an earlier one
(pipelines.tracking.seed_sqlite_store, pipelines.db_template): real MLflow on SQLite files."""

import sqlite3
from pathlib import Path

import pytest

from pipelines import tracking
from pipelines.db_template import copy_db


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "cache"


def _dump(db: Path) -> dict[str, list]:
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        out = {t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in tables}  # noqa: S608
    conn.close()
    return out


def test_a_new_store_is_the_template_as_mlflow_would_have_made_it_here(cache, tmp_path,
                                                                      monkeypatch):
    from mlflow.tracking import MlflowClient

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = tmp_path / "a" / "mlflow.db"
    monkeypatch.chdir(tmp_path / "a")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{first}")
    assert tracking.tracking_uri() == f"sqlite:///{first}"
    # no template yet: MLflow made the store, and it became the template
    template = tracking.store_template()
    assert first.is_file() and template.parent == cache and template.name.startswith("mlflow-")
    made = _dump(first)
    assert made["alembic_version"] and made["experiments"][0][:2] == (0, "Default")

    second = tmp_path / "b" / "mlflow.db"
    monkeypatch.chdir(tmp_path / "b")
    assert tracking.seed_sqlite_store(f"sqlite:///{second}")
    seeded = _dump(second)
    # every table and row as MLflow made them, but the Default experiment is this folder's
    assert seeded.keys() == made.keys()
    assert {t: r for t, r in seeded.items() if t != "experiments"} == \
        {t: r for t, r in made.items() if t != "experiments"}
    exp = seeded["experiments"][0]
    assert exp[:2] == (0, "Default") and exp[2] == str(tmp_path / "b" / "mlruns" / "0")
    assert exp[4] >= made["experiments"][0][4]  # created now, not when the template was

    client = MlflowClient(f"sqlite:///{second}")  # MLflow takes it as its own
    run = client.create_run(tracking.experiment_id(client, "fcn-test"))
    client.log_metric(run.info.run_id, "mean_iu", 0.5)
    assert client.get_run(run.info.run_id).data.metrics == {"mean_iu": 0.5}
    assert client.get_experiment("0").artifact_location == str(tmp_path / "b" / "mlruns" / "0")
    assert not tracking.seed_sqlite_store(f"sqlite:///{second}")  # exists: never touched
    assert len(_dump(second)["runs"]) == 1


def test_other_stores_and_a_broken_template_are_left_to_mlflow(cache, tmp_path):
    assert not tracking.seed_sqlite_store("http://127.0.0.1:5000")
    assert not tracking.seed_sqlite_store(f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")
    assert not (tmp_path / "absent").exists()
    template = tracking.store_template()
    template.parent.mkdir(parents=True)
    template.write_bytes(b"not a database")
    db = tmp_path / "mlflow.db"
    assert not tracking.seed_sqlite_store(f"sqlite:///{db}")
    assert not db.exists() and [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_an_exclusive_copy_keeps_a_file_that_appeared_meanwhile(tmp_path):
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    with sqlite3.connect(src) as conn:
        conn.execute("CREATE TABLE t (v TEXT)")
        conn.execute("INSERT INTO t VALUES ('template')")
    conn.close()
    dst.write_bytes(b"opened by another process")
    assert not copy_db(src, dst, exclusive=True)
    assert dst.read_bytes() == b"opened by another process"
    assert copy_db(src, dst)  # not exclusive: replaced whole
    assert _dump(dst)["t"] == [("template",)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.db", "src.db"]  # no temp left
