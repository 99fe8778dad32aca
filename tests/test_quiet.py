"""The driver's console keeps the workers' own lines and drops Ray's internal ones; tables
stay short and readable."""

import io

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


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_worker_prefixes_have_no_colour_codes_in_a_file_or_a_pipe(monkeypatch):
    """Ray's own printer of the workers' lines (the real one) writes a plain prefix when the
    driver's output is no terminal or NO_COLOR is set; on a terminal it keeps its colour, and
    a user's RAY_COLOR_PREFIX wins."""
    from ray._private.worker import print_worker_logs

    def printed(tty: bool, **env: str) -> str:
        for k in ("RAY_COLOR_PREFIX", "NO_COLOR"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        ray_env.plain_worker_prefixes(_Stream(tty))
        out = _Stream(tty)
        print_worker_logs({**_batch("RayTrainWorker", "[32s] step 1/4  loss 3.0"),
                           "localhost": "127.0.0.1"}, out)
        return out.getvalue()

    assert printed(False) == "(RayTrainWorker pid=1) [32s] step 1/4  loss 3.0\n"
    assert printed(True, NO_COLOR="1") == printed(False)
    assert "\x1b[" in printed(True)  # a terminal keeps Ray's colours
    assert "\x1b[" in printed(False, RAY_COLOR_PREFIX="1")


def test_verbose_keeps_ray_logs(monkeypatch):
    monkeypatch.setenv("FCN_VERBOSE", "1")
    assert "PYTHONWARNINGS" not in ray_env.quiet_env()
    assert ray_env.train_log_level() == "INFO"
    monkeypatch.delenv("FCN_VERBOSE")
    assert ray_env.quiet_env()["PYTHONWARNINGS"] == "ignore::DeprecationWarning"
    assert ray_env.train_log_level() == "WARNING"


def test_flow_logs_list_classes_without_pixels_on_one_line():
    """The per-class table in a flow's log (compact): a class with no pixel in the split (IU
    undefined) is named on one line, not given a row of its own; the MLflow artifact and
    `fcn evaluate` keep every row."""
    import numpy as np

    from pipelines.evaluate import EvalResult

    per_class = [("background", 0.9), ("aeroplane", float("nan")), ("bicycle", 0.25),
                 ("bird", float("nan"))]
    res = EvalResult("m", "val", {"pixel_acc": 0.9, "mean_iu": 0.575}, per_class,
                     np.zeros((4, 4), np.int64), 3)
    full, compact = res.table().splitlines(), res.table(compact=True).splitlines()
    assert [ln.split()[0] for ln in full[-4:]] == ["background", "aeroplane", "bicycle", "bird"]
    assert "aeroplane" in full[-3] and full[-3].endswith("-")
    assert [ln.split()[0] for ln in compact[-3:-1]] == ["background", "bicycle"]
    assert compact[-1] == "(no pixels in this split, IU undefined: aeroplane, bird)"
    assert compact[:-3] == full[:-4]


def test_fcn_models_shows_scores_to_four_decimals(capsys):
    from flows.cli.models import _table

    _table([{"name": "fcn-voc", "mean_iu": "0.743670586223468"},
            {"name": "fcn-voc", "mean_iu": "-"}], ("name", "mean_iu"))
    assert capsys.readouterr().out.splitlines() == [
        "name     mean_iu", "fcn-voc  0.7437", "fcn-voc  -"]
