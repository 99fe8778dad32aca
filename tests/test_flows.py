"""The Prefect DAG end to end on real Prefect, Ray and MLflow; caching; a served schedule."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """Prefect's local API for this module: one temporary server on a private PREFECT_HOME,
    its database seeded from the migrated template as `fcn run` seeds a new project's
    (flows.prefect_home), and stopped at the end (by the object that started it)."""
    from flows.prefect_home import remember, seed

    home = tmp_path_factory.mktemp("prefect_home")
    keys = ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED",
            "PREFECT_API_BLOCKS_REGISTER_ON_START",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    seed(home)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli.pipeline import prefect_api_server

    server = prefect_api_server()  # as `fcn run` starts it (a session of its own)
    server.start(timeout=120)
    remember(home)
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
            _drain_prefect_workers()  # as prefect_test_harness: no log lost or sent late
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _drain_prefect_workers() -> None:
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


def _tiny_config(tmp: Path) -> Path:
    cfg = tmp / "tiny.yaml"
    cfg.write_text(
        "name: tiny\ndataset: synthetic\nwidth: 0.0625\noptimizer: adam\n"
        "stages:\n  - {name: 32s, steps: 3, lr: 0.001}\n  - {name: 16s, steps: 2, lr: 0.0005}\n"
        "  - {name: 8s, steps: 2, lr: 0.0002}\n"
        "batch_size: 2\nnormalize_loss: true\nworkers: 1\ncheckpoint_every: 2\nval_every: 2\n")
    return cfg


def test_pipeline_runs_through_prefect_registers_and_caches(prefect_api, tmp_path,
                                                            monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId

    from flows.pipeline import fcn_pipeline

    monkeypatch.setenv("FCN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = dict(dataset="synthetic", root=str(tmp_path / "raw"), config=str(
        _tiny_config(tmp_path)), out=str(tmp_path / "shards"), model_name="fcn-flowtest")
    first = fcn_pipeline(**params, evaluate_every_stage=False, return_state=True)
    assert first.is_completed(), first
    summary = first.result()
    assert [s["stage"] for s in summary["stages"]] == ["32s", "16s", "8s"]
    assert summary["registration"]["version"] == "1" and summary["registration"]["champion"]

    with get_client(sync_client=True) as client:
        def task_states(flow_run_id):
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[r.id for r in runs])))
            out = {r.name: r.state for r in runs}
            for child in children:
                assert child.state.is_completed(), (child.name, child.state)
                out.update(task_states(child.id))
            return out

        flow_run = client.read_flow_run(first.state_details.flow_run_id)
        assert flow_run.state.is_completed()
        states = task_states(flow_run.id)
        assert {"train-32s", "train-16s", "train-8s", "register"} <= {
            n.rsplit("-", 1)[0] if n.startswith(("ingest", "register")) else n for n in states}
        assert all(s.is_completed() for s in states.values()), states
        # The Prefect UI shows the results: stage table, evaluations, champion decision.
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
            ArtifactFilterKey,
        )

        keys = ["fcn-stages", "fcn-evaluation-8s", "fcn-champion-fcn-flowtest"]
        arts = {a.key: a.data for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))}
        assert set(arts) == set(keys), sorted(arts)
        assert all(f"| FCN-{s} | " in arts["fcn-stages"] for s in ("32s", "16s", "8s"))
        final_iu = summary["evaluations"][-1]["metrics"]["mean_iu"]
        assert f"| {final_iu:.4f} |" in arts["fcn-evaluation-8s"]
        assert "version 1 took the champion alias" in arts["fcn-champion-fcn-flowtest"]

        # Unchanged inputs: ingest, the three stages and the evaluation are cache hits (no
        # second MLflow run with the same scores).
        second = fcn_pipeline(**params, evaluate_every_stage=False, return_state=True)
        assert second.is_completed()
        states2 = task_states(second.state_details.flow_run_id)
        cached = {n for n, s in states2.items() if s.name == "Cached"}
        assert any(n.startswith("ingest") for n in cached), states2
        assert {"train-32s", "train-16s", "train-8s", "evaluate-8s"} <= cached, states2
        assert second.result()["stages"] == summary["stages"]
        assert second.result()["evaluations"] == summary["evaluations"]
        # Its MLflow parent run has no stage runs of its own: its description says where they
        # are (the first run's), which the first run's parent does not need.
        from mlflow.tracking import MlflowClient

        mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        parents = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()],
                                     "tags.stage = 'pipeline'", order_by=["start_time ASC"])
        assert len(parents) == 2, parents
        assert "mlflow.note.content" not in parents[0].data.tags
        note = parents[1].data.tags["mlflow.note.content"]
        assert note.startswith("every stage was reused from an earlier run"), note
        assert all(f"- {s['stage']}: run {s['mlflow_run']}, " in note for s in summary["stages"])
        # ... and the registration says so, with where the champion is now (the first run's
        # "there was none" read as if the registry were still empty).
        reg2 = second.result()["registration"]
        assert (reg2["version"], reg2["reused"]) == ("1", True), reg2
        assert reg2["decision"].startswith("champion now: version 1 (mean IU"), reg2
        arts2 = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["fcn-champion-fcn-flowtest"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[second.state_details.flow_run_id])))
        assert len(arts2) == 1 and "version 1 was registered from this checkpoint before" in \
            arts2[0].data, arts2

        # The shards and the 16s checkpoint deleted (by hand, or a bucket's lifecycle rule):
        # the cached results that point at them are not trusted. Ingest runs again, 32s
        # stays a hit, 16s and 8s train again. (Every run after such a deletion failed.)
        shutil.rmtree(tmp_path / "shards")
        shutil.rmtree(summary["stages"][1]["checkpoint"])
        third = fcn_pipeline(**params, evaluate_every_stage=False, return_state=True)
        assert third.is_completed(), third
        stages3 = third.result()["stages"]
        assert stages3[0] == summary["stages"][0]
        assert all(Path(s["checkpoint"]).is_dir() for s in stages3)
        assert stages3[1]["checkpoint"] != summary["stages"][1]["checkpoint"]
        # a new checkpoint on a new dataset version: scored again
        evals3 = third.result()["evaluations"]
        assert evals3[-1]["mlflow_run"] != summary["evaluations"][-1]["mlflow_run"]
        parents = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()],
                                     "tags.stage = 'pipeline'", order_by=["start_time ASC"])
        note = parents[2].data.tags["mlflow.note.content"]
        assert note.startswith("1 of 3 stages were reused") and "- 32s: run " in note, note
        assert "- 16s: " not in note, note
        assert (tmp_path / "shards" / "synthetic" / "manifest.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(method: str, url: str, json: dict | None = None):
    """A Prefect REST call, retried as Prefect's own client does: its server answers 503
    while its SQLite database is locked (the scheduler and the runner write at the same
    time), which made this test fail about one run in ten. And with the client's timeout
    (PREFECT_API_REQUEST_TIMEOUT, 60 s): under `make test`'s load a create_flow_run once
    took more than the 10 s this used to allow."""
    import httpx

    for _ in range(10):
        r = httpx.request(method, url, json=json, timeout=60)
        if r.status_code not in (429, 503):
            return r
        time.sleep(1)
    return r


def test_served_deployment_with_cron_has_scheduled_runs(tmp_path, monkeypatch, ray_address):
    """A real `prefect server start` (with its scheduler) and `fcn deploy` serving against
    it: the API shows the deployment's cron schedule and runs scheduled from it. The served
    runs join the session's Ray (RAY_ADDRESS, as a deployment on a cluster's node would)."""
    import httpx

    from flows.prefect_home import seed

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    # The server's new database from the migrated template, as infra/local/up.sh seeds its
    # server's: its migrations took ~12 s of an idle machine (~17 s to answer, 5 s seeded)
    # and minutes here beside the other sessions. (`seed` turns block registration off in
    # this process's environment: the test's own setting, restored after it.)
    monkeypatch.setenv("PREFECT_API_BLOCKS_REGISTER_ON_START", "true")
    if seed(tmp_path / "ph"):
        monkeypatch.setenv("PREFECT_API_BLOCKS_REGISTER_ON_START", "false")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PREFECT_API_URL": api}
    bin_dir = Path(sys.executable).parent
    served_log = tmp_path / "served.log"

    def tail() -> str:
        return "\nfcn deploy's output ends:\n" + served_log.read_text()[-4000:]

    server = subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    served = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "no Prefect server"
            time.sleep(1)
        cfg = _tiny_config(tmp_path)
        served = subprocess.Popen(
            [str(bin_dir / "fcn"), "deploy", "--cron", "0 3 * * *", "--config", str(cfg),
             "--dataset", "synthetic", "--root", str(tmp_path / "raw"), "--synthetic-size",
             "32", "--project-dir", str(tmp_path / "data"), "--deployment", "nightly"],
            env={**env, "RAY_ADDRESS": ray_address}, cwd=ROOT, stdout=served_log.open("w"),
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            r = _api("GET", f"{api}/deployments/name/fcn-pipeline/nightly")
            if r.status_code == 200:
                dep = r.json()
                runs = _api("POST", f"{api}/flow_runs/filter", json={
                    "deployments": {"id": {"any_": [dep["id"]]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}).json()
                if runs:
                    break
            assert served.poll() is None, f"fcn deploy exited: {tail()}"
            assert time.monotonic() < deadline, f"no scheduled runs appeared: {tail()}"
            time.sleep(2)
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
        assert all(r["expected_start_time"] for r in runs)
        assert {r["parameters"]["dataset"] for r in runs} == {"synthetic"}
        assert (dep.get("global_concurrency_limit") or {}).get("limit") == 1, dep
        assert (dep.get("concurrency_options") or {}).get("collision_strategy") == \
            "CANCEL_NEW", dep

        # Two runs come due at once: the served process runs one to the end (it loads the
        # flow from a cloudpickled copy: every run once failed its parameter validation
        # there) and skips the other.
        made = []
        for _ in range(2):
            r = _api("POST", f"{api}/deployments/{dep['id']}/create_flow_run",
                     json={"parameters": {"evaluate_every_stage": False}})
            assert r.status_code == 201, r.text
            made.append(r.json()["id"])
        # A hang's safety net, not a speed goal: on a loaded 2-core machine a whole pipeline
        # run here once took 4 min and missed the 240 s this allowed by 2 s.
        deadline = time.monotonic() + 480
        while True:
            got = {r["id"]: r["state"] for r in _api(
                "POST", f"{api}/flow_runs/filter",
                json={"flow_runs": {"id": {"any_": made}}}).json()}
            kinds = sorted(st["type"] for st in got.values())
            if "FAILED" in kinds or "CRASHED" in kinds or kinds == ["CANCELLED", "COMPLETED"]:
                break
            assert served.poll() is None, f"fcn deploy exited: {tail()}"
            assert time.monotonic() < deadline, f"the runs did not end: {got} {tail()}"
            time.sleep(2)
        assert kinds == ["CANCELLED", "COMPLETED"], f"{got} {tail()}"
        skipped = next(i for i, st in got.items() if st["type"] == "CANCELLED")
        # Prefect's runner said "Aborted submission of flow run '…': Server returned a
        # non-pending state 'CANCELLED'"; the output says what that means.
        assert f"skipped flow run '{skipped}': it came due while the last run still went" \
            in served_log.read_text(), tail()
        assert "Aborted submission" not in served_log.read_text(), tail()
        # Every stage's lines as printed: Ray's log deduplication folded the controller's and
        # the workers' checkpoint lines of these short stages into one, printed later.
        assert "[repeated" not in served_log.read_text(), tail()
        assert all(f"[{s}] checkpoint at step 2: " in served_log.read_text()
                   for s in ("32s", "16s", "8s")), tail()
    finally:
        for proc in (served, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


def test_cached_results_live_in_the_bucket_and_hit_from_there(prefect_api, s3_server,
                                                             monkeypatch, tmp_path):
    """A cached task's result is an object under the run's bucket prefix, and a second flow
    run (any machine with the S3 variables) is a cache hit read from there."""
    from prefect import flow, task

    from flows.results import BucketResults, result_storage, results_location
    from pipelines import storage

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    s3_server.create_bucket("prefect-results")
    base = "s3://prefect-results/runs"
    assert results_location(None, str(tmp_path)) is None  # local runs keep Prefect's default
    assert results_location(None, base) == f"{base}/_prefect/results"
    calls = tmp_path / "calls"

    @task(cache_key_fn=lambda ctx, params: f"square-{params['x']}", persist_result=True)
    def square(x: int) -> int:
        with calls.open("a") as f:
            f.write("x")
        return x * x

    @flow
    def twice(x: int) -> int:
        return square(x)

    @flow
    def outer() -> BucketResults | None:  # the pipeline saves its block inside its flow
        return result_storage(str(tmp_path), base)

    block = outer()
    assert block is not None and block._block_document_id is not None
    run = twice.with_options(result_storage=block)
    assert run(7) == 49 and run(7) == 49
    assert calls.read_text() == "x"  # the second run read the cached result
    names = [storage.name(o.path) for o in storage.listdir(f"{base}/_prefect/results")]
    assert "square-7" in names, names  # (the flows' own results are beside it)
    # A missing key is "not cached" to Prefect; a key that escapes the base is refused.
    store = BucketResults(basepath=f"{base}/_prefect/results")
    with pytest.raises(OSError):
        store.read_path("nope", _sync=True)
    with pytest.raises(ValueError):
        store.write_path("../escape", b"", _sync=True)


def test_ctrl_c_in_an_experiment_row_marks_its_parent_run_killed(prefect_api, tmp_path,
                                                                 monkeypatch):
    """Ctrl-C while a row trains: the experiment's MLflow parent run is KILLED (it stayed
    RUNNING), the interrupt goes on to the command with a note on what a rerun does."""
    from mlflow.tracking import MlflowClient

    import flows.experiment as experiment

    monkeypatch.setenv("FCN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "base.yaml").write_text(
        "name: b\ndataset: synthetic\nwidth: 0.0625\nworkers: 1\n"
        "stages: [{name: 32s, steps: 2, lr: 0.001}]\n")
    spec = tmp_path / "t.yaml"
    spec.write_text("name: t\nbase: base.yaml\nrows:\n  - {label: A}\n  - {label: B}\n")
    calls = []

    def interrupted(config, *args, **kwargs):
        calls.append(config["name"])
        raise KeyboardInterrupt  # what the terminal's SIGINT raises in the main thread

    monkeypatch.setattr(experiment, "train_stages", interrupted)
    with pytest.raises(KeyboardInterrupt) as info:
        experiment.experiment_flow(spec=str(spec), root=str(tmp_path / "raw"),
                                   out=str(tmp_path / "shards"), synthetic_size=32)
    assert len(calls) == 1  # the next row did not start
    assert info.value.__notes__ == ["MLflow runs marked KILLED; the same command again takes "
                                    "what finished from the cache"]
    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()],
                              "tags.fcn_experiment = 't'")
    assert [(r.info.run_name, r.info.status) for r in runs] == [("experiment-t", "KILLED")]


def test_an_experiment_runs_its_rows_isolates_a_failure_and_reruns_only_it(
        prefect_api, tmp_path, monkeypatch):
    """`fcn experiment`'s flow on one of Table 1's trunks (GoogLeNet) and a successor
    (LR-ASPP): each row trains through Ray Train and is measured; a row that fails (here:
    more workers than rows) is marked in the table while the others finish; the same file
    again, fixed, trains only that row, the others come from the cache; the table is in
    MLflow with a child run per row; the two nets then register under one name, the
    champion gate picks between the architectures, and stock MLflow serves the champion."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.experiment import experiment_flow

    monkeypatch.setenv("FCN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "base.yaml").write_text(
        "name: b\ndataset: synthetic\nwidth: 0.0625\noptimizer: adam\nbatch_size: 2\n"
        "normalize_loss: true\nworkers: 1\nval_every: 0\ncheckpoint_every: 10\n"
        "stages: [{name: 32s, steps: 2, lr: 0.001}]\n")
    spec = tmp_path / "t1.yaml"
    rows = ("rows:\n  - {label: FCN-GoogLeNet, set: {backbone: googlenet, workers: WORKERS}, "
            "paper: 42.5}\n"
            "  - {label: LR-ASPP, set: {model: lraspp_mobilenet_v3_large, width: 1.0, "
            "stages: [{name: train, steps: 2, lr: 0.001}]}}\n")
    spec.write_text("name: t1\ntitle: Table 1\nbase: base.yaml\n" + rows.replace("WORKERS",
                                                                                 "500"))
    params = dict(spec=str(spec), root=str(tmp_path / "raw"), out=str(tmp_path / "shards"),
                  synthetic_size=32)
    first = experiment_flow(**params)
    assert first["failed"] == ["FCN-GoogLeNet"]
    by = {r["label"]: r for r in first["rows"]}
    assert "500 training workers" in by["FCN-GoogLeNet"]["error"]
    r = by["LR-ASPP"]  # a successor trains the same way as the FCNs
    assert 0 <= r["mean_iu"] <= 1 and r["params_m"] > 3 and r["gmac"] > 1
    assert r["train_img_s"] > 0 and r["infer_img_s"] > 0
    md = Path(first["table"]["markdown"]).read_text()
    assert "| FCN-GoogLeNet | failed: " in md and "| LR-ASPP | " in md
    assert Path(first["table"]["chart"]).read_bytes()[:4] == b"\x89PNG"

    spec.write_text("name: t1\ntitle: Table 1\nbase: base.yaml\n" + rows.replace("WORKERS",
                                                                                 "1"))
    second = experiment_flow(**params, return_state=True)
    assert second.is_completed(), second
    result = second.result()
    assert result["failed"] == []
    again = {r["label"]: r for r in result["rows"]}
    # The finished row: the same checkpoint and scores, from the cache.
    assert again["LR-ASPP"]["checkpoint"] == by["LR-ASPP"]["checkpoint"]
    assert again["LR-ASPP"]["mean_iu"] == by["LR-ASPP"]["mean_iu"]
    assert again["FCN-GoogLeNet"]["gmac"] > 0
    with get_client(sync_client=True) as client:
        rows_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(
                any_=[second.state_details.flow_run_id])))
        trained: dict[str, list[str]] = {}
        for run in rows_runs:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
            trained[run.name] = sorted(t.name for t in tasks if t.name.startswith(
                ("train-", "measure-")) and t.state.name != "Cached")
        # the speeds: one task of the experiment's flow for both rows, run again (not cached)
        own = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id={"any_": [second.state_details.flow_run_id]}))
        speed = [t for t in own if t.name.startswith("inference-speed")]
        assert [t.state.name for t in speed] == ["Completed"], [t.name for t in own]
    assert trained.get("t1-lr-aspp") == [], trained
    assert trained.get("t1-fcn-googlenet") == ["measure-FCN-GoogLeNet", "train-32s"], trained

    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = mlflow.get_run(result["mlflow_parent"])
    assert parent.info.status == "FINISHED"
    children = mlflow.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["FCN-GoogLeNet", "LR-ASPP"]
    child = next(c for c in children if c.info.run_name == "LR-ASPP")
    assert child.data.params["model"] == "lraspp_mobilenet_v3_large"
    assert child.data.metrics["mean_iu"] == by["LR-ASPP"]["mean_iu"]
    # the speeds measured together once both rows had trained, in the row runs as in the table
    assert child.data.metrics["infer_img_s"] == again["LR-ASPP"]["infer_img_s"] > 0
    assert again["FCN-GoogLeNet"]["infer_img_s"] > 0
    arts = {a.path for a in mlflow.list_artifacts(parent.info.run_id)}
    assert {"table.md", "chart.png", "table.json"} <= arts

    # Both rows' nets go on as the pipeline's do: `fcn register` (with each row's evaluation
    # run) under one name, where the champion gate compares the two architectures on the
    # same split; stock MLflow serves the champion, whichever net it is.
    import mlflow.pyfunc as pyfunc
    import numpy as np

    from fcn_core.inference import predict_labels
    from flows.cli import main
    from pipelines.registry import resolve_model

    data = str(tmp_path / "shards" / "synthetic")
    for label in ("FCN-GoogLeNet", "LR-ASPP"):
        assert main(["register", "--checkpoint", again[label]["checkpoint"], "--data", data,
                     "--name", "fcn-zoo", "--metrics-from-run",
                     again[label]["evaluation_run"]]) == 0
    best = max(("LR-ASPP", "FCN-GoogLeNet"), key=lambda k: again[k]["mean_iu"])  # ties: LR-ASPP
    champion = mlflow.get_model_version_by_alias("fcn-zoo", "champion")  # (the client)
    assert champion.tags["arch"] == {"LR-ASPP": "lraspp_mobilenet_v3_large",
                                     "FCN-GoogLeNet": "fcn32s_googlenet"}[best]
    image = np.random.default_rng(0).integers(0, 255, (1, 40, 36, 3), dtype=np.uint8)
    served = pyfunc.load_model("models:/fcn-zoo@champion").predict(image)
    own = resolve_model(again[best]["checkpoint"])
    assert np.array_equal(served[0], predict_labels(own.net, [image[0]], own.mean_bgr)[0])
