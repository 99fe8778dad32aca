"""The driver's console keeps the workers' own lines and drops Ray's internal ones."""

from pipelines import ray_env


def _batch(actor: str, *lines: str) -> dict:
    return {"actor_name": actor, "lines": list(lines), "pid": 1, "ip": "127.0.0.1",
            "is_err": False, "task_name": None}


def test_internal_worker_lines_are_dropped_and_ours_kept(monkeypatch):
    monkeypatch.delenv("FCN_VERBOSE", raising=False)
    ours = _batch("RayTrainWorker", "[32s] step 2/4  loss 2.72")
    assert ray_env._keep(ours) == ours
    assert ray_env._keep(_batch("PlacementGroupCleaner", "Traceback (most recent call")) is None
    mixed = _batch("TrainController",
                   "[2026-11-22 07:07:29,155 E 1 2] core_worker.cc:2465: Actor with class name: "
                   "'PreemptionWatcher' and ID: 'd1' has constructor arguments in the object "
                   "store and max_restarts > 0.", "a real controller error")
    assert ray_env._keep(mixed)["lines"] == ["a real controller error"]


def test_verbose_keeps_ray_logs(monkeypatch):
    monkeypatch.setenv("FCN_VERBOSE", "1")
    assert "PYTHONWARNINGS" not in ray_env.quiet_env()
    assert ray_env.train_log_level() == "INFO"
    monkeypatch.delenv("FCN_VERBOSE")
    assert ray_env.quiet_env()["PYTHONWARNINGS"] == "ignore::DeprecationWarning"
    assert ray_env.train_log_level() == "WARNING"
