"""The rank-0 worker's MLflow logger makes its client in a thread: a stage's first steps do not
wait for MLflow's import, nothing logged meanwhile is lost, and a failure is not swallowed."""

from __future__ import annotations

import threading

import pytest
from mlflow.tracking import MlflowClient

from pipelines.tracking import MetricLogger


def test_metrics_logged_before_and_after_the_client_is_ready_all_reach_the_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e"))
    log = MetricLogger(uri, run.info.run_id, flush_every_s=0.0)
    for step in range(1, 4):
        log.log({"loss": 1.0 / step, "lr": 0.1}, step)
    log.flush()
    log.log({"loss": 0.1}, 4)
    log.flush()
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.1)]
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 3


def test_log_does_not_wait_for_the_client_and_flush_does(monkeypatch):
    release, made = threading.Event(), []

    class SlowClient:  # stands in for MLflow's import and client set-up taking a while
        def __init__(self, uri):
            release.wait(10)
            self.batches = []
            made.append(self)

        def log_batch(self, run_id, metrics):
            self.batches.append([(m.key, m.value, m.step) for m in metrics])

    monkeypatch.setattr("mlflow.tracking.MlflowClient", SlowClient)
    log = MetricLogger("unused://", "run", flush_every_s=0.0)
    log.log({"loss": 2.0}, 1)  # due to flush, but the client is not ready: kept, no wait
    log.log({"loss": 1.0}, 2)
    assert made == []
    release.set()
    log.flush()
    assert made[0].batches == [[("loss", 2.0, 1), ("loss", 1.0, 2)]]


def test_a_client_that_cannot_be_made_fails_the_next_flush(monkeypatch):
    class Broken:
        def __init__(self, uri):
            raise RuntimeError("no tracking store at broken://")

    monkeypatch.setattr("mlflow.tracking.MlflowClient", Broken)
    log = MetricLogger("broken://", "run")
    log.log({"loss": 1.0}, 1)
    with pytest.raises(RuntimeError, match="no tracking store at broken://"):
        log.flush()
