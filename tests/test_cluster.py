"""The pipeline on a real two-node Ray cluster with every location in a real S3 server and
MLflow on PostgreSQL + S3: a GCS-address driver, Ray Jobs submission from Prefect, and no
secret anywhere it could leak.

The cluster: a head and a second node, separate processes started from different working
directories, each with its own temp dir, ports and custom resource (node_a / node_b), and
the S3 variables in their own environment (as on a real cluster, where a secret provides
them). Training workers take 1.5 CPUs; SPREAD puts one on each node, and the head (4 CPUs)
can host both when the second node (2 CPUs) is lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from servers import RayHead, RayWorkerNode, descendant_pids, pid_alive

from pipelines import storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "fcn-cluster"


def _config(tmp: Path, steps: tuple[int, ...] = (4, 2, 2), dataset: str = "synthetic",
            **extra: object) -> Path:
    lrs = {"32s": 0.001, "16s": 0.0005, "8s": 0.0002}
    lines = ["name: cluster", f"dataset: {dataset}", "width: 0.0625", "optimizer: adam",
             "stages:"] + [f"  - {{name: {name}, steps: {n}, lr: {lrs[name]}}}"
                           for name, n in zip(lrs, steps, strict=False)] + [
             "batch_size: 2", "normalize_loss: true", "workers: 2", "cpus_per_worker: 1.5",
             "placement_strategy: SPREAD", "checkpoint_every: 2", "val_every: 0",
             # Streamed, not materialised first: a new job's cold workers would spend ~30 s
             # caching 128 rows before the first step.
             "cache_dataset: false"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path = tmp / f"cluster-{len(list(tmp.glob('cluster-*.yaml')))}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server, mlflow_server):
    """Head (4 CPUs, node_a) + second node (2 CPUs, node_b), S3 credentials in each node's
    environment, the venv's `fcn` on their PATH (what a cluster image provides)."""
    s3_server.create_bucket(BUCKET)
    work = tmp_path_factory.mktemp("cluster")
    node_env = {**s3_server.env(), "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
                "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri,
                # A lost node is declared dead after ~3 s instead of Ray's default ~30 s.
                "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                "RAY_health_check_failure_threshold": "3"}
    head = RayHead(work, num_cpus=4, resources={"node_a": 1}, env=node_env,
                   object_store_memory=200 * 1024**2)
    with head:
        node = RayWorkerNode(head, work, num_cpus=2, resources={"node_b": 1}, env=node_env,
                             object_store_memory=200 * 1024**2)
        with node:
            yield head, node


def _client_env(tmp: Path, s3_server, mlflow_server, **extra: str) -> dict[str, str]:
    """A user's shell: the servers' addresses and the S3 variables, nothing of the tests'."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "PREFECT_", "FCN_"))}
    env.update(s3_server.env(), MLFLOW_TRACKING_URI=mlflow_server.tracking_uri,
               RAY_AUTH_MODE="token", FCN_DATA_DIR=str(tmp / "data"),
               PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    env.update(extra)
    return env


def _fcn(args: list[str], env: dict[str, str], timeout: float = 600
         ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _train_worker_nodes(head: RayHead, env: dict[str, str]) -> list[tuple[str, str]]:
    """(node id, state) of every Ray Train worker actor the cluster has seen."""
    code = textwrap.dedent(f"""
        import json
        from ray.util.state import list_actors
        actors = list_actors(address={head.dashboard_url!r}, limit=1000, detail=True,
                             filters=[("class_name", "=", "RayTrainWorker")])
        print(json.dumps([[a.node_id, a.state] for a in actors]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(x) for x in json.loads(proc.stdout.strip().splitlines()[-1])]


def test_custom_resources_place_tasks_on_each_node(cluster, tmp_path):
    head, node = cluster
    assert head.node_id and node.node_id and head.node_id != node.node_id
    code = textwrap.dedent("""
        import json, os, ray
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)

        @ray.remote(num_cpus=0.5)
        def where():
            return ray.get_runtime_context().get_node_id()

        on_b = ray.get(where.options(resources={"node_b": 1}).remote())
        on_a = ray.get(where.options(resources={"node_a": 1}).remote())
        print(json.dumps([on_a, on_b]))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(head.env(), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [head.node_id, node.node_id]


def test_without_ray_address_a_ray_start_cluster_is_named_not_joined(cluster, tmp_path):
    """A user's own `ray start` on this machine (Ray records its address where `ray.init()`
    without one looks, and joins it, refusing num_cpus there: it was a ValueError
    traceback): with RAY_ADDRESS unset, commands start their local Ray as documented, and
    the "Ray:" line names the other one and how to use it."""
    import shutil
    import tempfile

    head, _ = cluster
    recorded = head.temp_dir / "ray_current_cluster"  # what `ray start` wrote
    assert recorded.is_file()
    # RAY_TMPDIR: the driver's default temp dir, where its `ray.init()` reads the record;
    # short, for Ray's socket paths
    tmp = Path(tempfile.mkdtemp(prefix="fcnrt-", dir="/tmp"))
    try:
        (tmp / "ray").mkdir()
        shutil.copy(recorded, tmp / "ray" / "ray_current_cluster")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_TMPDIR=str(tmp), RAY_USAGE_STATS_ENABLED="0")
        code = ("from pipelines.ray_env import init_ray\nprint(init_ray(1 if {own} else None))"
                "\nimport ray\nprint(ray.get_runtime_context().gcs_address)")
        runs = [subprocess.run([sys.executable, "-c", code.format(own=own)], cwd=ROOT, env={
            **env, **({} if own else {"RAY_ADDRESS": "auto", "RAY_AUTH_MODE": "token"})},
            capture_output=True, text=True, timeout=180) for own in (True, False)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert all(r.returncode == 0 for r in runs), [r.stderr[-3000:] for r in runs]
    (line, gcs), (joined_line, joined) = (r.stdout.strip().splitlines()[-2:] for r in runs)
    other = recorded.read_text().strip()
    assert line.startswith("Ray: a local Ray (1 CPUs, 1 node(s)"), line
    assert line.endswith(f"; not the Ray that `ray start` runs at {other}: RAY_ADDRESS=auto "
                         "uses that one"), line
    assert gcs != other and gcs.rpartition(":")[2] != other.rpartition(":")[2]
    # and RAY_ADDRESS=auto joins that one, as the line says
    assert joined == other and joined_line.startswith(
        f"Ray: {other} (RAY_ADDRESS=auto) (6 CPUs, 2 node(s)"), (
        joined_line, joined)


@pytest.fixture(scope="module")
def shards(cluster, s3_server, mlflow_server, tmp_path_factory) -> str:
    """The generated set, ingested once into the bucket by a driver on the cluster."""
    head, _ = cluster
    tmp = tmp_path_factory.mktemp("shards")
    env = _client_env(tmp, s3_server, mlflow_server, RAY_ADDRESS=head.address)
    base = f"s3://{BUCKET}/gcs"
    proc = _fcn(["ingest", "synthetic", "--root", f"{base}/raw", "--out", f"{base}/shards",
                 "--engine", "ray", "--synthetic-size", "64"], env)  # Ray Data on two nodes
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Ray: {head.address} (6 CPUs, 2 node(s)" in proc.stdout
    return f"{base}/shards/synthetic"


def test_prefect_submits_ray_jobs_and_the_model_lands_in_the_registry(
        cluster, s3_server, mlflow_server, postgres, tmp_path, monkeypatch):
    head, _ = cluster
    env = _client_env(tmp_path, s3_server, mlflow_server, RAY_ADDRESS=head.dashboard_url)
    base = f"s3://{BUCKET}/jobs"
    proc = _fcn(["run", "--config", str(_config(tmp_path, steps=(4, 2))), "--dataset",
                 "synthetic", "--root", f"{base}/raw", "--out", f"{base}/shards", "--storage",
                 f"{base}/runs", "--name", "fcn-cluster", "--project-dir", str(tmp_path / "data"),
                 "--evaluate", "final", "--synthetic-size", "64"],
                env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # The ingest job generated what the flow asked for (its size was once dropped: 64 px
    # whatever was asked).
    assert "(96 train + 32 val, 64x64)" in out, out[-6000:]
    submitted = [ln for ln in out.splitlines() if "Ray job fcn-" in ln and " on " in ln]
    # ingest, the 2 stages as one job (one worker group), evaluation, registration
    assert len(submitted) == 4, submitted
    assert "registered fcn-cluster version 1" in proc.stdout

    # Stock MLflow, in a process that never imported this project, with only the tracking
    # URI and the S3 variables: the champion loads and segments an image.
    code = textwrap.dedent("""
        import mlflow.pyfunc, numpy as np
        m = mlflow.pyfunc.load_model("models:/fcn-cluster@champion")
        out = m.predict(np.zeros((1, 40, 36, 3), np.uint8))
        print(tuple(out.shape))
    """)
    clean = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "FCN_DATA_DIR")}
    probe = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.strip().splitlines()[-1] == "(1, 40, 36)"
    # Its artifacts are objects in the bucket behind the MLflow server.
    fs = s3_server.filesystem()
    from pyarrow.fs import FileSelector

    keys = [i.path for i in fs.get_file_info(FileSelector("fcn/mlflow", recursive=True))]
    assert any(k.endswith("MLmodel") for k in keys), keys[:20]
    # Prefect's cached results (ingest, each stage, the evaluation) are in the bucket beside
    # the runs, so a scheduled run on another machine finds them; none went to the local
    # Prefect home.
    keys = [i.base_name for i in fs.get_file_info(FileSelector(
        f"{BUCKET}/jobs/runs/_prefect/results"))]
    # cache keys: ingest + 2 stages + the final stage's evaluation
    assert len([k for k in keys if len(k) == 64]) == 4, keys
    assert not list((tmp_path / "prefect").rglob("storage/*"))

    # No secret in anything the run produced: its output, the MLflow store (params, tags,
    # metrics of every run, in PostgreSQL), Prefect's database and logs, the Ray logs.
    secret, key_id = s3_server.secret_key, s3_server.access_key
    assert secret not in out and key_id not in out
    with postgres.connect() as conn, conn.cursor() as cur:
        for table in ("params", "tags", "model_version_tags", "registered_model_tags",
                      "experiment_tags", "runs", "model_versions"):
            cur.execute(f"SELECT * FROM {table}")  # noqa: S608 (fixed names)
            dump = repr(cur.fetchall())
            assert secret not in dump and key_id not in dump, table
    for folder in (tmp_path / "prefect", head.temp_dir):
        for f in Path(folder).rglob("*"):
            if f.is_file() and f.stat().st_size < 50_000_000:
                data = f.read_bytes()
                assert secret.encode() not in data, f


def test_ray_addresses_that_cannot_work_are_one_line_exit_2(tmp_path, s3_server):
    from servers import free_ports

    (port,) = free_ports(1)  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    raw = str(tmp_path / "raw")
    cases = [
        ({"RAY_ADDRESS": f"127.0.0.1:{port}"},
         ["ingest", "synthetic", "--root", raw, "--out", str(tmp_path / "o")],
         f"the Ray cluster at RAY_ADDRESS=127.0.0.1:{port} does not answer"),
        ({"RAY_ADDRESS": "auto", "RAY_TMPDIR": str(tmp_path / "no-ray-here")},
         ["ingest", "synthetic", "--root", raw, "--out", str(tmp_path / "o")],
         "RAY_ADDRESS=auto joins the cluster `ray start` began on this machine, and none "
         "runs here"),
        ({"RAY_ADDRESS": f"ray://127.0.0.1:{port}"},
         ["ingest", "synthetic", "--root", raw, "--out", str(tmp_path / "o")],
         "is a Ray Client address"),
        ({"RAY_ADDRESS": f"http://127.0.0.1:{port}", **s3_server.env()},
         ["run", "--config", str(_config(tmp_path)), "--dataset", "synthetic", "--root",
          f"s3://{BUCKET}/r", "--out", f"s3://{BUCKET}/o", "--storage", f"s3://{BUCKET}/s"],
         f"the Ray Jobs API at RAY_ADDRESS=http://127.0.0.1:{port} does not answer"),
        ({"RAY_ADDRESS": f"http://127.0.0.1:{port}"},
         ["run", "--config", str(_config(tmp_path)), "--dataset", "synthetic", "--root", raw],
         "give --root as a URI they reach"),
    ]
    for extra, args, expected in cases:
        proc = _fcn(args, {**env, **extra}, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert len(lines) == 1 and expected in lines[0], (args, proc.stderr[-2000:])


def test_a_failing_ray_job_fails_the_flow_with_its_own_line_and_no_retry(
        cluster, s3_server, mlflow_server, tmp_path):
    head, _ = cluster
    env = _client_env(tmp_path, s3_server, mlflow_server, RAY_ADDRESS=head.dashboard_url)
    base = f"s3://{BUCKET}/failing"
    proc = _fcn(["run", "--config", str(_config(tmp_path, dataset="voc")), "--dataset", "voc",
                 "--root", f"{base}/not-a-dataset", "--out", f"{base}/shards", "--storage",
                 f"{base}/runs", "--project-dir", str(tmp_path / "data")], env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    (last,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("fcn run: ")]
    assert last.startswith("fcn run: Ray job fcn-ingest-") and " failed: fcn ingest: error: " \
        in last and f"no VOC layout under {base}/not-a-dataset" in last, last
    submitted = [ln for ln in out.splitlines() if "Ray job fcn-" in ln and " on " in ln]
    assert len(submitted) == 1, submitted  # a user's mistake is not retried
    assert s3_server.secret_key not in out


def test_a_ray_job_is_stopped_when_its_submitter_is_interrupted_or_exits_first(
        cluster, s3_server, mlflow_server, tmp_path):
    """A Ray job outlives the process that submitted it: Ctrl-C on `fcn run` (or a task's
    time limit) left its training job running on the cluster. Here one submitter is
    interrupted while it streams the job's log, and another exits while a thread (as a
    stage chain's) still waits on its job: both jobs end STOPPED, and each says so once Ray
    says it. A job that ended before its stop is named as what it is, not as stopped."""
    head, _ = cluster
    env = _client_env(tmp_path, s3_server, mlflow_server, RAY_ADDRESS=head.dashboard_url)
    results = f"s3://{BUCKET}/stopped/_jobs"
    # `fcn describe` as the job: stopped within milliseconds of its submission, long before
    # its interpreter has even imported the project.
    code = textwrap.dedent(f"""
        import sys, threading
        from pipelines.jobs import run_job
        submitted = threading.Event()

        def log(line):
            print(line, flush=True)
            if line.startswith("Ray job fcn-describe-"):
                submitted.set()
                if sys.argv[1] == "interrupt":
                    raise KeyboardInterrupt

        if sys.argv[1] == "interrupt":
            try:
                run_job(["describe", "fcn8s"], {results!r}, log=log)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
        elif sys.argv[1] == "exit":  # a daemon thread still waiting when the process ends
            threading.Thread(target=run_job, args=(["describe", "fcn8s"], {results!r}, log),
                             daemon=True).start()
            assert submitted.wait(60)
        else:  # a job that ended by itself before this process stopped it
            import time
            from pipelines import jobs
            client = jobs._client({head.dashboard_url!r})
            job = client.submit_job(entrypoint="echo done", submission_id="fcn-describe-" + (
                "%x" % time.time_ns()))
            print("Ray job", job, "on", flush=True)
            while str(client.get_job_status(job).value) not in jobs.TERMINAL:
                time.sleep(0.2)
            jobs._LIVE[job] = client
            jobs._stop(job, "interrupted (KeyboardInterrupt)")
    """)
    status = textwrap.dedent(f"""
        import sys, time
        from ray.job_submission import JobSubmissionClient
        client = JobSubmissionClient({head.dashboard_url!r})
        for _ in range(120):
            status = str(client.get_job_status(sys.argv[1]).value)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(0.5)
        print(status, repr(client.get_job_info(sys.argv[1]).message))
    """)
    for how in ("interrupt", "exit", "ended"):
        proc = subprocess.run([sys.executable, "-c", code, how], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (job,) = [ln.split()[2] for ln in proc.stdout.splitlines()
                  if ln.startswith("Ray job fcn-describe-")]
        why = ("interrupted (KeyboardInterrupt)" if how == "interrupt" else
               "the command that submitted it ended first")
        if how == "ended":
            assert f"Ray job {job} succeeded as it was being stopped (interrupted " \
                   "(KeyboardInterrupt))" in proc.stderr, proc.stderr[-3000:]
            assert "stopped Ray job" not in proc.stderr, proc.stderr[-3000:]
            continue
        assert f"stopped Ray job {job}: {why}" in proc.stderr, proc.stderr[-3000:]
        end = subprocess.run([sys.executable, "-c", status, job], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert end.stdout.split()[0] == "STOPPED", (how, end.stdout, end.stderr[-2000:])


def test_gcs_driver_trains_on_two_nodes_in_s3_and_survives_losing_one(
        cluster, shards, s3_server, mlflow_server, tmp_path, monkeypatch):
    """`fcn train` as a driver on the cluster (GCS address), data and checkpoints in the
    bucket, its two workers on the two nodes. Then kill the second node's raylet (the pid
    this test session started) and every process it started, in the middle of the stage, as
    a machine going down would: the stage finishes on the
    surviving node from its last checkpoint in the bucket. Runs last: the node stays dead."""
    import signal
    import time

    head, node = cluster
    env = _client_env(tmp_path, s3_server, mlflow_server, RAY_ADDRESS=head.address)
    base = f"s3://{BUCKET}/failover"
    every, steps = 10, 40
    config = _config(tmp_path, steps=(steps,), checkpoint_every=every, max_failures=3)
    # SPREAD is best effort: wait until earlier tests' jobs and actors have let go of the
    # cluster's CPUs, so the two workers land on the two nodes.
    idle = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import time, ray
        ray.init(log_to_driver=False)
        for _ in range(120):
            if ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"]:
                break
            time.sleep(1)
    """)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert idle.returncode == 0, idle.stderr[-3000:]
    train = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "train", "--config", str(config), "--data",
         shards, "--storage", f"{base}/runs", "--stages", "32s",
         "--result-json", f"{base}/result.json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, saved, lines, killed_at = 0, 0, [], None
    deadline = time.monotonic() + 600
    assert train.stdout is not None
    for line in train.stdout:
        lines.append(line)
        if killed_at is None and "[32s] checkpoint at step " in line:
            saved = int(line.split("[32s] checkpoint at step ", 1)[1].split(":", 1)[0])
        if killed_at is None and "[32s] step " in line:
            seen = int(line.split("[32s] step ", 1)[1].split("/", 1)[0])
        # Kill once Ray Train has registered a checkpoint (its line) and training went on
        # past it: a worker's "step N" line alone can precede the registration (~2 s poll).
        if killed_at is None and saved >= every and seen >= saved + every // 2:
            if seen < steps:
                # The node goes down as a machine does: its raylet and every process it
                # started (the training worker there) at once. A worker outliving its raylet
                # trained on for seconds, and a fast run could end before Ray saw the node
                # dead (no restart to check).
                raylet = node.raylet_pid()
                assert raylet is not None
                for pid in [raylet, *descendant_pids(raylet)]:
                    os.kill(pid, signal.SIGKILL)
                killed_at = seen
        assert time.monotonic() < deadline, "".join(lines[-50:])
    assert train.wait(timeout=120) == 0, "".join(lines[-80:])
    assert killed_at is not None, "the stage ended before the node could be killed"

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    (stage,) = storage.read_json(f"{base}/result.json")["stages"]
    resumed = int(stage["metrics"]["resumed_from"])
    # Before the loss, the two workers ran on the two nodes (Ray's state API, not our own
    # bookkeeping): otherwise the kill could not touch them.
    assert {n for n, _ in _train_worker_nodes(head, env)} == {head.node_id, node.node_id}
    # It resumed from a checkpoint (not from the start) no older than the last one announced
    # as saved before the kill, and finished every step with both workers.
    assert saved <= resumed <= killed_at + every, (resumed, saved, killed_at)
    assert resumed > 0 and resumed % every == 0
    assert stage["steps"] == steps and stage["metrics"]["world_size"] == 2
    assert stage["metrics"]["replicas_in_sync"] == 1
    # The final checkpoint is in the bucket and the next stage can start from it; nothing of
    # the run was written on this machine's disk.
    assert stage["checkpoint"].startswith(f"{base}/runs/")
    from pipelines.train import load_model

    assert load_model(stage["checkpoint"]).config.variant == "fcn32s"
    assert not (tmp_path / "data" / "runs").exists()
    # The helper stops what is left of the node (its raylet died): nothing of it survives.
    pids, temp = node.pids(), node.temp_dir
    node.stop()
    assert [p for p in pids if pid_alive(p)] == [] and temp is not None and not temp.exists()
    print(f"\nnode failure: killed after step {killed_at} was printed; resumed from the "
          f"checkpoint at step {resumed}; final mean IU {stage['metrics']['mean_iu']:.4f}")
    if os.environ.get("FCN_MEASURE_FAILOVER"):  # the README's comparison (not a test)
        proc = _fcn(["train", "--config", str(config), "--data", shards, "--storage",
                     f"{base}/undisturbed", "--stages", "32s", "--result-json",
                     f"{base}/undisturbed.json"], env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (ref,) = storage.read_json(f"{base}/undisturbed.json")["stages"]
        print(f"undisturbed run, same seed and config: final mean IU "
              f"{ref['metrics']['mean_iu']:.4f}")
