"""Staged Ray Train training on real Ray and a real MLflow SQLite store (tiny nets)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from fcn_core.surgery import promote
from pipelines import storage
from pipelines.config import StageConfig, TrainConfig
from pipelines.ingest import IngestConfig, ingest
from pipelines.shards import read_manifest
from pipelines.sources import synthetic as synth
from pipelines.train import CHECKPOINT_FILE, StageFailed, load_model, train_pipeline
from pipelines.train.driver import start_pipeline_run
from pipelines.train.step import build_stage_model
from pipelines.train.worker import DONE_FILE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

TINY = dict(width=1 / 16, batch_size=2, momentum=0.9, weight_decay=5e-4,
            normalize_loss=True, workers=2, checkpoint_every=4, val_every=4, mirror=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Generated VOC, SIFT Flow and NYUD layouts, ingested once for this module."""
    root = tmp_path_factory.mktemp("train_data")
    out = root / "shards"
    raws = {"voc": synth.write_voc(root / "raw", n_train=8, n_val=5, size=(32, 32)),
            "siftflow": synth.write_siftflow(root / "raw", n_train=4, n_val=2, size=(32, 32)),
            "nyud": synth.write_nyud(root / "raw", n_train=4, n_val=2, size=(32, 32))}
    for name, raw in raws.items():
        ingest(IngestConfig(dataset=name, root=raw, out=out), log=lambda m: None)
    return {name: out / name for name in raws}


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _train_workers() -> set[str]:
    """Every Ray Train worker actor this Ray has seen (alive or dead)."""
    import ray
    from ray.util.state import list_actors

    # This session's Ray by its address: `make test` runs another session beside this one,
    # whose Ray clusters the state API would otherwise also find (and refuse to choose).
    return {a.actor_id for a in list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker")], limit=10_000)}


def _new_train_workers(before: set[str], wait_s: float = 10.0) -> set[str]:
    """The worker actors started since ``before``; the state API can lag a moment behind
    the GCS, so a short count is asked again (an extra worker group shows at once)."""
    import time

    deadline = time.monotonic() + wait_s
    new = _train_workers() - before
    while len(new) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        new = _train_workers() - before
    return new


def test_staged_training_chains_stages_and_is_tracked(shards, tmp_path, mlflow_uri):
    cfg = TrainConfig(name="t", dataset="voc", **TINY, stages=(
        StageConfig("32s", 8, 0.01),
        StageConfig("16s", 4, 1e-12),  # ~no change: the stage must end where it started
        StageConfig("8s", 4, 0.005)))
    before = _train_workers()
    run, results = train_pipeline(cfg, shards["voc"], storage=tmp_path / "runs",
                                  log=lambda m: None)
    assert [(r.stage, r.steps) for r in results] == [("32s", 8), ("16s", 4), ("8s", 4)]
    # One worker group ran the three stages: the same rank-0 worker wrote each done file.
    # (Ray's state API sees 2 new workers, or 4 when Ray Train restarted a group that was
    # slow to start on a busy machine: that is Ray's retry, not a group per stage.)
    workers = {storage.read_json(storage.join(run.storage, run.run_id, s, DONE_FILE))["worker"]
               for s in ("32s", "16s", "8s")}
    assert len(workers) == 1 and None not in workers, workers
    assert len(_new_train_workers(before)) in (2, 4)
    for r in results:  # DDP over 2 workers kept every replica bit-identical
        assert r.metrics["world_size"] == 2 and r.metrics["replicas_in_sync"] == 1.0
        # 5 validation rows on 2 workers: each scored once, none dropped to even the shards.
        assert r.metrics["val_images"] == 5, r.metrics

    # Chaining: 16s started from 32s's final weights, promoted (new skip at zero).
    m32, m16 = load_model(results[0].checkpoint), load_model(results[1].checkpoint)
    expected = promote(m32).state_dict()
    got = m16.state_dict()
    assert set(got) == set(expected)
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6, msg=k)
    assert m16.config.variant == "fcn16s" and load_model(results[2].checkpoint).config.variant \
        == "fcn8s"

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(run.mlflow_parent)
    manifest = read_manifest(shards["voc"])
    assert parent.data.tags["manifest_fingerprint"] == manifest.fingerprint
    assert parent.data.params["stages.0.lr"] == "0.01" and parent.info.status == "FINISHED"
    # Lineage: the parent run records the dataset it read (mlflow.log_input).
    (ds,) = [d.dataset for d in parent.inputs.dataset_inputs]
    assert ds.digest == manifest.fingerprint[:36], (ds.digest, manifest.fingerprint)
    assert str(shards["voc"]) in ds.source, ds.source
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {c.data.tags["stage"]: c for c in children}
    assert set(by_stage) == {"32s", "16s", "8s"}
    for stage, steps in (("32s", 8), ("16s", 4), ("8s", 4)):
        child = by_stage[stage]
        assert child.info.status == "FINISHED"
        assert len(client.get_metric_history(child.info.run_id, "loss")) == steps
        assert {"final_mean_iu", "final_pixel_acc", "init_mean_iu"} <= set(child.data.metrics)
        arts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"checkpoint", "config.yaml"} <= arts
        files = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")}
        assert files == {f"checkpoint/{CHECKPOINT_FILE}"}
    # The 16s stage starts with the 32s stage's predictions (bilinear 2x+16x vs 32x aside).
    s16, s32 = by_stage["16s"].data.metrics, by_stage["32s"].data.metrics
    assert abs(s16["init_pixel_acc"] - s32["final_pixel_acc"]) < 0.02
    # Training lowered the loss.
    hist = [m.value for m in client.get_metric_history(by_stage["32s"].info.run_id, "loss")]
    assert sum(hist[-2:]) < sum(hist[:2]), hist


def test_a_failing_worker_is_restarted_and_resumes_from_the_last_checkpoint(
        shards, tmp_path, mlflow_uri):
    cfg = TrainConfig(name="ft", dataset="voc", **{**TINY, "checkpoint_every": 2},
                      stages=(StageConfig("32s", 8, 0.01),), fail_at_step=5, max_failures=1)
    _, (res,) = train_pipeline(cfg, shards["voc"], storage=tmp_path / "runs",
                               log=lambda m: None)
    assert any((tmp_path / "runs").rglob(".failure_injected"))
    assert res.metrics["resumed_from"] == 4  # the checkpoint before step 5, not step 0
    assert res.steps == 8 and res.metrics["step"] == 8


def test_siftflow_two_heads_and_nyud_rgbd_complete_a_few_steps(shards, tmp_path, mlflow_uri):
    base = {**TINY, "workers": 1, "checkpoint_every": 3, "val_every": 3}
    sift = TrainConfig(name="sf", dataset="siftflow", train_split="trainval", val_split="test",
                       heads={"semantic": 33, "geometric": 3}, **base,
                       stages=(StageConfig("32s", 3, 0.01),))
    _, (res,) = train_pipeline(sift, shards["siftflow"], storage=tmp_path / "r1",
                               log=lambda m: None)
    assert res.steps == 3 and {"mean_iu", "geometric_mean_iu"} <= set(res.metrics)
    assert load_model(res.checkpoint).config.heads == {"semantic": 33, "geometric": 3}

    # The paper's training options through Ray Train too (FCN-32s-fixed, loss sampling,
    # class balancing, jitter): the trunk comes back as it started, only score_fr learned.
    # (32 px images are one stride-32 cell each: p = 0.75 keeps 3 of the 6 cells seen.)
    nyud = TrainConfig(name="ny", dataset="nyud", input="rgbd", **base, loss_sampling=0.75,
                       class_weights="median_frequency", jitter=4,
                       stages=(StageConfig("32s", 3, 0.01, train="score_only"),))
    _, (res,) = train_pipeline(nyud, shards["nyud"], storage=tmp_path / "r2",
                               log=lambda m: None)
    model = load_model(res.checkpoint)
    assert res.steps == 3 and model.config.in_channels == 4 and "mean_iu" in res.metrics
    torch.manual_seed(nyud.seed)  # the worker's seed before it builds the stage's net
    start = build_stage_model(nyud, nyud.stages[0], 40, None, log=lambda m: None)
    after = model.state_dict()
    changed = {k for k, v in start.state_dict().items() if not torch.equal(v, after[k])}
    assert changed == {"heads.out.score_fr.weight", "heads.out.score_fr.bias"}


def test_a_diverging_stage_stops_at_the_first_non_finite_loss_and_says_which_lr(
        shards, tmp_path, mlflow_uri):
    """A learning rate far too high: the stage stops at the first NaN/inf loss instead of
    running its steps on NaN weights, without Ray Train's retries (a retry diverges again),
    the chain's later stage does not start, and the error names the stage, step and lr."""
    from pipelines.train.driver import Diverged
    from pipelines.train.worker import DIVERGED_FILE

    cfg = TrainConfig(name="dv", dataset="voc", **{**TINY, "normalize_loss": False,
                                                    "val_every": 0, "momentum": 0.99,
                                                    "workers": 1, "cpus_per_worker": 1},
                      stages=(StageConfig("32s", 200, 1e6), StageConfig("16s", 4, 1e-3)))
    before = _train_workers()
    with pytest.raises(Diverged) as info:
        train_pipeline(cfg, shards["voc"], storage=tmp_path / "runs", log=lambda m: None)
    msg = str(info.value)
    assert msg.startswith("stage 32s diverged: the training loss is "), msg
    assert msg.endswith("(lr 1e+06; normalize_loss: false sums the loss over every pixel, as "
                        "the paper does with lr 1e-10 for FCN-32s); lower the stage's lr or "
                        "set normalize_loss: true and train again"), msg
    step = int(msg.split(" at step ")[1].split()[0])
    assert step < 200
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    written = json.loads((run_dir / "32s" / DIVERGED_FILE).read_text())
    assert written["step"] == step and written["loss"] in ("nan", "inf", "-inf")
    assert not list(run_dir.rglob(DONE_FILE)) and not (run_dir / "16s").exists()
    assert len(_new_train_workers(before, wait_s=2)) == 1  # one worker group: no retry
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.pipeline_run = '{run_dir.name}'")
    assert {r.data.tags["stage"]: r.info.status for r in runs} == {
        "pipeline": "FAILED", "32s": "FAILED", "16s": "FAILED"}
    # Why, in MLflow: on the stage that failed and its pipeline run.
    assert {r.data.tags["stage"]: r.data.tags.get("failure") for r in runs} == {
        "pipeline": f"Diverged: {msg}", "32s": f"Diverged: {msg}", "16s": None}


def test_resume_continues_an_interrupted_stage_from_its_checkpoint(shards, tmp_path,
                                                                   mlflow_uri):
    # one worker (restoring every rank of a worker group: the test above)
    cfg = TrainConfig(name="rs", dataset="voc", **{**TINY, "checkpoint_every": 2, "workers": 1,
                                                    "cpus_per_worker": 1},
                      stages=(StageConfig("32s", 6, 0.01),), fail_at_step=3, max_failures=0)
    with pytest.raises(StageFailed, match="stage 32s failed.*--resume"):
        train_pipeline(cfg, shards["voc"], storage=tmp_path / "runs", log=lambda m: None)
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.pipeline_run = '{run_dir.name}'")
    assert {r.data.tags["stage"]: r.info.status for r in runs} == {
        "pipeline": "FAILED", "32s": "FAILED"}
    assert all(r.data.tags["failure"].startswith("StageFailed: stage 32s failed") for r in runs)
    # `fcn train --resume RUN_ID`: same run folder, Ray Train picks up the latest checkpoint;
    # the parent run is running again as soon as it is found, without its failure tag
    again = dataclasses.replace(cfg, fail_at_step=None)
    found = start_pipeline_run(again, shards["voc"], tmp_path / "runs", resume=run_dir.name,
                               log=lambda m: None)
    assert client.get_run(found.mlflow_parent).info.status == "RUNNING"
    assert "failure" not in client.get_run(found.mlflow_parent).data.tags
    run, (res,) = train_pipeline(again, shards["voc"], storage=tmp_path / "runs",
                                 resume=run_dir.name, log=lambda m: None)
    assert run.run_id == run_dir.name
    assert res.metrics["resumed_from"] == 2 and res.steps == 6
    parent = client.get_run(run.mlflow_parent)
    assert parent.data.tags["pipeline_run"] == run_dir.name  # the same MLflow parent run
    assert parent.info.status == "FINISHED"
    assert client.get_run(res.run_id).info.status == "FINISHED"
    assert "failure" not in client.get_run(res.run_id).data.tags


@pytest.mark.timeout(300)
def test_fcn_train_on_the_local_ray_it_started(shards, tmp_path):
    """``fcn train`` on its own, with the local Ray it starts (one test: each such command
    starts a Ray of its own, the suite's dearest part).

    Ray's processes live to the end: ``fcn train`` starts Ray in the main thread. Ray ties
    the local processes it starts (raylet, GCS, ...) to the starting thread: started in the
    stage chain's thread (as it was), they were killed when that thread ended, and the
    driver's shutdown at exit then waited ~15 s on timeouts (and Ray warned about SIGTERM
    handlers). Here every Ray process is still alive after the command returned. And the
    command's exit leaves nothing in /tmp: Ray's dashboard makes a multiprocessing folder
    (``pymp-*``) there that its killed process cannot remove; ``pipelines.ray_env`` does.

    Its processes: init_ray's own local Ray (one node, nothing drains it) starts no
    PreemptionWatcher actor per worker group (its process cost a stage's start ~1.5-2 s on
    2 cores). It has made Ray's autoscaling coordinator before any training (in one of Ray's
    prestarted processes, not a new one on the first stage's path), and the training uses
    that one. After ``prestart_train_processes``, every actor of the run (controller, its
    helpers, the worker) runs in a process that was up before ``fit()``: their runtime envs
    match; and the worker's and the controller's processes, only they, imported torch while
    they waited (``pipelines.warm``). The command is observed, not changed: just before
    ``fit()`` (``pipelines.warm.fit_started``) the test's wrapper waits until the processes
    started ahead are up and have imported (as a real dataset's ingest leaves them time to),
    and notes them."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("name: tiny\ndataset: voc\nwidth: 0.0625\noptimizer: adam\n"
                   "stages:\n  - {name: 32s, steps: 2, lr: 0.001}\nbatch_size: 2\n"
                   "normalize_loss: true\nworkers: 1\ncpus_per_worker: 1\n"
                   "checkpoint_every: 2\nval_every: 0\n")
    code = textwrap.dedent(f"""
        import json, os, time
        import pipelines.warm as warm
        from pipelines.prestart import _local_raylet, starting_processes
        from pipelines.ray_env import warm_dir

        seen = {{}}
        real_fit_started = warm.fit_started

        def has_torch(pid):
            try:
                with open(f"/proc/{{pid}}/maps") as f:
                    return "libtorch_cpu" in f.read()
            except OSError:
                return False

        def marks():
            found = {{}}
            for name in os.listdir(warm_dir()):
                if name.isdigit():
                    with open(os.path.join(warm_dir(), name)) as f:
                        found[int(name)] = f.read()
            return found

        def observed_fit_started(folder):
            import ray
            from ray.util.state import list_actors
            raylet = _local_raylet()
            deadline = time.monotonic() + 90
            while (starting_processes(raylet) or not marks()) and time.monotonic() < deadline:
                time.sleep(0.2)
            up = sorted(c.pid for c in raylet.children())
            while not all(map(has_torch, marks())) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # an unmarked process that (wrongly) imported ahead would be seen
            # read after the imports: a marked process touches <pid>.up just before its
            # import, so read earlier a loaded machine could list one not yet connected
            connected = sorted(int(p[:-3]) for p in os.listdir(warm_dir()) if p.endswith(".up"))
            coordinators = sorted(a.pid for a in list_actors(
                address=ray.get_runtime_context().gcs_address,
                filters=[("state", "=", "ALIVE")], limit=10000)
                if a.class_name == "_AutoscalingCoordinatorActor")
            seen.update(up=up, marked=marks(), connected=connected,
                        torch=[pid for pid in up if has_torch(pid)], coordinators=coordinators)
            real_fit_started(folder)

        warm.fit_started = observed_fit_started
        from flows.cli import main
        code = main(["train", "--config", {str(cfg)!r}, "--data", {str(shards["voc"])!r}])
        import ray
        from ray._private import worker
        from ray.util.state import list_actors
        alive = {{kind: [p.process.poll() is None for p in procs]
                 for kind, procs in worker._global_node.all_processes.items()}}
        from pipelines.ray_env import pymp_folders
        made = [str(f) for f in pymp_folders(since=0)]
        actors = list_actors(address=ray.get_runtime_context().gcs_address, limit=10000)
        # this command's Ray is this machine's second (the session's is the first): Ray
        # Train's PlacementGroupCleaner must still find its cluster (pipelines.warm)
        logs = os.path.join(worker._global_node.get_session_dir_path(), "logs")
        confused = []
        for name in os.listdir(logs):
            try:
                with open(os.path.join(logs, name), errors="replace") as f:
                    confused += [name] if "Found multiple active Ray instances" in f.read() else []
            except OSError:
                pass
        print(json.dumps({{"code": code, "alive": alive, "pymp": made, "seen": seen,
                          "classes": sorted({{a.class_name for a in actors}}),
                          "coordinators": sorted(a.pid for a in actors
                                                 if a.class_name == "_AutoscalingCoordinatorActor"),
                          "train": {{a.class_name: a.pid for a in actors
                                    if a.class_name != "_AutoscalingCoordinatorActor"}},
                          "hook_env": os.environ.get("__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"),
                          "confused": confused}}))
        """)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_TRAIN_", "MLFLOW_TRACKING_URI"))}
    env["FCN_DATA_DIR"] = str(tmp_path / "state")
    # This command's /tmp (Ray's sessions go to RAY_TMPDIR). Short: a socket's path has at
    # most 107 bytes, and under tmp_path the dashboard's did not fit (Ray hung at start).
    own_tmp = Path(tempfile.mkdtemp(prefix="fcn-t-", dir="/tmp"))
    env["TMPDIR"] = str(own_tmp)
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=240, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result["code"] == 0
        assert len(result["pymp"]) == 1, result["pymp"]  # the dashboard's, while Ray ran
        assert not list(own_tmp.glob("pymp-*"))
    finally:
        shutil.rmtree(own_tmp, ignore_errors=True)
    assert {"raylet", "gcs_server"} <= set(result["alive"]), result
    assert all(all(v) for v in result["alive"].values()), result["alive"]
    assert "SIGTERM handler is not set" not in r.stdout + r.stderr
    assert "starting a local Ray, the MLflow store ..." in r.stdout
    # channels_last: auto (the default) resolved in the worker: fp32 (amp off) on a CPU
    assert "[32s] channels_last auto: NCHW (fp32 on a CPU)" in r.stdout, r.stdout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_train_cli import MARKS  # the lines bench/bench_train_cli.py times

    assert all(text in r.stdout for _, text in MARKS), r.stdout

    classes, train, seen = result["classes"], result["train"], result["seen"]
    assert result["confused"] == [], result["confused"]
    assert "TrainController" in classes and "RayTrainWorker" in classes, classes
    assert "PreemptionWatcher" not in classes, classes
    # made once, by init_ray, before the training, which used that one
    assert len(seen["coordinators"]) == 1 and result["coordinators"] == seen["coordinators"], (
        seen["coordinators"], result["coordinators"])
    assert {"TrainController", "PlacementGroupCleaner", "RayTrainWorker"} <= set(train), train
    assert {c: pid for c, pid in train.items() if pid not in seen["up"]} == {}, (train, seen)
    # pipelines.warm: the worker's process and the controller's, and only they, imported
    # torch before fit(); the process marked for the controller is the one it took
    # (the first controller-side processes asked for, as many as the raylet starts at once,
    # are marked: the controller takes the first of them to connect)
    marked = {int(pid): kind for pid, kind in seen["marked"].items()}
    assert marked.get(train["RayTrainWorker"]) == "worker", (marked, train)
    assert marked.get(train["TrainController"]) == "controller", (marked, train)
    assert sorted(marked.values()).count("worker") == 1, marked
    assert 1 <= sorted(marked.values()).count("controller") <= 2, marked  # 2 CPUs: limit 2
    assert seen["torch"] == sorted(marked) == seen["connected"], (seen, train)
    assert result["hook_env"] is None  # the hook variable went to the raylet only


def _default_sigint() -> None:
    """A terminal's foreground command takes Ctrl-C; pytest-xdist's workers ignore SIGINT,
    and their children would inherit that (as a shell's background jobs do)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.timeout(300)
def test_ctrl_c_stops_fcn_train_marks_its_mlflow_runs_killed_and_says_how_to_resume(
        shards, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) in the middle of a stage: exit 130
    with one line that says how to resume, the parent and stage runs KILLED in MLflow (as
    MLflow marks a cancelled run; they were FAILED), and no process of the command left."""
    import signal
    import time

    from servers import descendant_pids, pid_alive

    cfg = tmp_path / "long.yaml"
    cfg.write_text("name: long\ndataset: voc\nwidth: 0.0625\noptimizer: adam\n"
                   "stages:\n  - {name: 32s, steps: 1000, lr: 0.001}\n"
                   "  - {name: 16s, steps: 10, lr: 0.001}\nbatch_size: 2\n"
                   "workers: 1\ncpus_per_worker: 1\ncheckpoint_every: 1000\nval_every: 0\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    env["FCN_DATA_DIR"] = str(tmp_path / "state")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "--config", str(cfg),
                             "--data", str(shards["voc"])], cwd=Path(__file__).parents[1],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_default_sigint)
    try:
        for line in proc.stdout:
            if "[32s] step 1/1000" in line:
                break
        family = descendant_pids(proc.pid)
        assert family, "no process under fcn train"
        os.killpg(proc.pid, signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("fcn train: interrupted; MLflow runs marked KILLED; resume with "
                           "--resume long-"), err[-3000:]
    run_id = last.rsplit(" ", 1)[1]
    client = MlflowClient(f"sqlite:///{tmp_path / 'state' / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.pipeline_run = '{run_id}'")
    assert {r.data.tags["stage"]: r.info.status for r in runs} == {  # the next one's too
        "pipeline": "KILLED", "32s": "KILLED", "16s": "KILLED"}
    deadline = time.monotonic() + 20
    while [p for p in family if pid_alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in family if pid_alive(p)], family
