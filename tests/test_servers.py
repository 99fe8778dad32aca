"""tests/servers.py against the real programs: SeaweedFS S3, PostgreSQL, MLflow on both, and a
two-node Ray cluster; each helper's stop() leaves none of its processes behind.

Servers are shared per module (started once, stopped by the last tests of each group, which
check that nothing is left). Driver code runs in fresh interpreters with an explicit
environment, independent of any Ray or MLflow this pytest process may hold.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from servers import (
    MlflowServer,
    Postgres,
    RayHead,
    SeaweedS3,
    ServerProcess,
    ServerStartError,
    cmdline,
    pid_alive,
    port_listening,
    start_all,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()  # (the test run's folder for Ray sessions)
           if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "PREFECT_")) or k == "RAY_TMPDIR"}
    env.update(extra)
    return env


def _py(code: str, env: dict[str, str], timeout: float = 120):
    """Run CODE in a fresh interpreter; its last stdout line is JSON."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _assert_all_gone(name: str, pids: list[int]) -> None:
    assert pids, f"{name}: no pids recorded"
    left = [p for p in pids if pid_alive(p)]
    assert left == [], f"{name}: still alive after stop(): {[cmdline(p)[:2] for p in left]}"


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("servers")


# The session's shared servers (tests/conftest.py): the same instances the other modules use.
@pytest.fixture(scope="module")
def s3(s3_server) -> SeaweedS3:
    return s3_server


@pytest.fixture(scope="module")
def pg(postgres) -> Postgres:
    return postgres


# --- S3 --------------------------------------------------------------------------------------


def test_s3_put_get_list_with_the_env_variables_only(s3):
    s3.create_bucket("envonly")
    res = _py("""
        import json
        from pyarrow import fs
        # Only the standard variables: endpoint, keys and region come from the environment.
        f, root = fs.FileSystem.from_uri("s3://envonly/run1")
        with f.open_output_stream(root + "/a.bin") as out:
            out.write(b"\\x00payload")
        with f.open_output_stream(root + "/sub/b.txt") as out:
            out.write(b"second")
        listed = sorted(i.path for i in f.get_file_info(fs.FileSelector(root, recursive=True))
                        if i.type == fs.FileType.File)
        print(json.dumps([f.open_input_stream(root + "/a.bin").read().decode("latin-1"),
                          listed]))
    """, _clean_env(**s3.env()))
    assert res == ["\x00payload", ["envonly/run1/a.bin", "envonly/run1/sub/b.txt"]]
    # The same objects, read back here with explicit settings.
    assert s3.filesystem().open_input_stream("envonly/run1/sub/b.txt").read() == b"second"


def test_s3_wrong_credentials_and_anonymous_are_refused(s3):
    from pyarrow import fs

    s3.create_bucket("guarded")
    with s3.filesystem().open_output_stream("guarded/x") as out:
        out.write(b"x")
    for kw in ({"secret_key": s3.secret_key + "x"}, {"access_key": "nobody-" + s3.access_key},
               {"anonymous": True, "access_key": None, "secret_key": None}):
        f = s3.filesystem(**kw)
        with pytest.raises(OSError, match=r"(?i)signature|access.?denied|invalid.?access.?key|403"):
            with f.open_output_stream("guarded/y") as out:
                out.write(b"y")
        if not kw.get("anonymous"):
            with pytest.raises(OSError):
                f.get_file_info(fs.FileSelector("guarded"))
    names = [i.path for i in s3.filesystem().get_file_info(fs.FileSelector("guarded"))]
    assert names == ["guarded/x"]


def test_pyarrow_aws_endpoint_url_only_through_from_uri(s3):
    """pyarrow 25: FileSystem.from_uri("s3://...") takes AWS_ENDPOINT_URL from the environment;
    a bare S3FileSystem() ignores it (it would go to amazonaws.com). Code that builds an
    S3FileSystem itself must pass endpoint_override (from AWS_ENDPOINT_URL) explicitly."""
    res = _py("""
        import json
        from pyarrow import fs
        bare = fs.S3FileSystem().__reduce__()[1][0]
        via_uri = fs.FileSystem.from_uri("s3://any-bucket/key")[0].__reduce__()[1][0]
        print(json.dumps([bare["endpoint_override"], via_uri["endpoint_override"]]))
    """, _clean_env(**s3.env()))
    assert res == ["", s3.endpoint]


# --- PostgreSQL ------------------------------------------------------------------------------


def test_postgres_password_auth(pg):
    import psycopg2

    conn = psycopg2.connect(pg.uri(), connect_timeout=5)
    with conn, conn.cursor() as cur:
        cur.execute("select current_user, current_database(), inet_server_port()")
        assert cur.fetchone() == (pg.user, pg.database, pg.port)
    conn.close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=pg.port, user=pg.user, dbname=pg.database,
                         password=pg.password + "x", connect_timeout=5)
    uri = pg.create_database("second_db")
    assert uri.endswith(f":{pg.port}/second_db")
    conn = psycopg2.connect(uri, connect_timeout=5)
    with conn, conn.cursor() as cur:
        cur.execute("create table t (x int); insert into t values (7); select x from t")
        assert cur.fetchone() == (7,)
    conn.close()
    if os.geteuid() == 0:  # initdb/postgres refuse root: they run as an unprivileged account
        owner = Path(f"/proc/{pg.pid}").stat().st_uid
        assert owner != 0 and pg.data_dir.stat().st_uid == owner


# --- MLflow on PostgreSQL + S3 ---------------------------------------------------------------


def test_mlflow_postgres_backend_and_s3_artifacts(mlflow_server, s3, pg):
    import psycopg2
    from pyarrow import fs

    client_env = _clean_env(MLFLOW_TRACKING_URI=mlflow_server.tracking_uri, **s3.env())
    res = _py("""
        import json
        from mlflow import MlflowClient
        c = MlflowClient()
        exp = c.create_experiment("servers-smoke")
        run = c.create_run(exp)
        c.log_metric(run.info.run_id, "miou", 0.5, step=1)
        c.log_text(run.info.run_id, "hello s3", "notes/a.txt")
        c.set_terminated(run.info.run_id)
        print(json.dumps([exp, run.info.run_id, run.info.artifact_uri]))
    """, client_env)
    exp_id, run_id, artifact_uri = res
    assert artifact_uri == f"mlflow-artifacts:/{exp_id}/{run_id}/artifacts"
    # The object is in the bucket, under --artifacts-destination s3://fcn/mlflow.
    key = f"fcn/mlflow/{exp_id}/{run_id}/artifacts/notes/a.txt"
    assert s3.filesystem().open_input_stream(key).read() == b"hello s3"
    found = [i.path for i in s3.filesystem().get_file_info(fs.FileSelector("fcn", recursive=True))
             if i.type == fs.FileType.File]
    assert key in found
    # The run is in PostgreSQL.
    conn = psycopg2.connect(pg.uri(), connect_timeout=5)
    with conn, conn.cursor() as cur:
        cur.execute("select status from runs where run_uuid = %s", (run_id,))
        assert cur.fetchone() == ("FINISHED",)
    conn.close()
    # The backend URI went in MLFLOW_BACKEND_STORE_URI: no password on any command line.
    for pid in mlflow_server.pids():
        assert pg.password not in " ".join(cmdline(pid)), cmdline(pid)[:3]


def test_stop_s3_postgres_mlflow_leaves_nothing(workdir):
    # Its own instances: the session's are shared with other modules.
    s3, pg = SeaweedS3(workdir / "s3-stop"), Postgres(workdir / "pg-stop")
    start_all(s3, pg)
    s3.create_bucket("fcn")
    mlflow_server = MlflowServer(workdir / "mlflow-stop", pg.uri(), "s3://fcn/mlflow",
                                 env=s3.env()).start()
    servers = {"mlflow": mlflow_server, "postgres": pg, "seaweedfs": s3}
    pids = {name: srv.pids() for name, srv in servers.items()}
    ports = [mlflow_server.port, pg.port, s3.port]
    pg_base = pg.base
    weed_pid = s3.proc.pid
    assert len(pids["postgres"]) > 1  # the postmaster and its (setsid) children
    for name, srv in servers.items():
        srv.stop()
        _assert_all_gone(name, pids[name])
        assert srv.pids() == []
    assert [p for p in ports if _port_open(p)] == []
    assert pg_base is not None and not pg_base.exists()
    # SeaweedFS's logs go to its folder, not the system's temporary one (glog's default).
    assert list(Path(tempfile.gettempdir()).glob(f"weed.*.{weed_pid}")) == []
    assert list((workdir / "s3-stop" / "seaweedfs-logs").glob(f"weed.*.{weed_pid}"))
    print({name: (srv.ready_seconds, srv.stop_seconds) for name, srv in servers.items()})


# The Ray helpers (RayHead, RayWorkerNode: custom resources, raylet loss, stop) are proven by
# tests/test_cluster.py on the session's one two-node cluster.


# --- the shared machinery, with stand-in programs --------------------------------------------


class _Script(ServerProcess):
    """A python one-liner as a 'server' that is ready when its log says READY."""

    name = "script"
    stop_grace = 1.0

    def __init__(self, workdir, code: str, timeout: float = 5) -> None:
        super().__init__(workdir, timeout=timeout)
        self.code = code

    def _start(self) -> None:
        self._spawn([sys.executable, "-c", textwrap.dedent(self.code)])
        self._wait_ready(lambda: b"READY" in self.log_path.read_bytes(), "script", step=0.05)


def test_start_failure_reports_log_tail_and_stops(tmp_path):
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*boom: bad config"):
        _Script(tmp_path / "a", "import sys; print('boom: bad config', flush=True); "
                                "sys.exit(3)").start()
    srv = _Script(tmp_path / "b", "import time; print('starting', flush=True); time.sleep(60)",
                  timeout=1)
    with pytest.raises(ServerStartError, match=r"(?s)not ready after 1 s.*starting"):
        srv.start()
    assert srv.pids() == [] and not pid_alive(srv.proc.pid)


def test_stop_kills_a_session_that_ignores_sigterm(tmp_path):
    code = """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        print("READY", child.pid, flush=True)
        time.sleep(60)
    """
    with _Script(tmp_path, code) as srv:
        deadline = time.monotonic() + 5
        while len(srv.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = srv.pids()
        assert len(pids) == 2
    _assert_all_gone("script", pids)
    assert srv.stop_seconds is not None and srv.stop_seconds < 10


class _FlakyHead(RayHead):
    """RayHead's start-up and retry with scripts for ``ray start``: each attempt runs the
    next script (exit during start-up, or come up)."""

    def __init__(self, workdir, scripts: list[str], timeout: float = 30) -> None:
        super().__init__(workdir, timeout=timeout)
        self.scripts = list(scripts)

    def _start_once(self) -> None:
        self._spawn([sys.executable, "-c", textwrap.dedent(self.scripts.pop(0))])
        self._wait_ready(lambda: b"READY" in self.log_path.read_bytes(), "script", step=0.05)


def test_a_ray_head_that_exits_during_start_up_is_started_once_more(tmp_path):
    """Under load Ray's Client server gives up waiting for the raylet and `ray start --block`
    stops the head it had started: one more start, then an error with the log's tail."""
    dies = "import sys; print('starting, then the client server gave up', flush=True); " \
           "sys.exit(1)"
    comes_up = "import time; print('READY', flush=True); time.sleep(60)"
    with _FlakyHead(tmp_path / "a", [dies, comes_up]) as head:
        assert head.running and head.scripts == []
        assert head.retried is not None and "exited with code 1 during start-up" in \
            head.retried, head.retried
        pids = head.pids()
    _assert_all_gone("ray-head", pids)

    twice = _FlakyHead(tmp_path / "b", [dies, dies])
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 1.*client server gave"):
        twice.start()
    assert twice.scripts == [] and twice.pids() == []

    # a head that is still running but not ready is not started again
    slow = _FlakyHead(tmp_path / "c", ["import time; time.sleep(60)", comes_up], timeout=1)
    with pytest.raises(ServerStartError, match="not ready after 1 s"):
        slow.start()
    assert slow.scripts == [comes_up] and slow.retried is None and slow.pids() == []


def test_port_listening_sees_a_listener_and_not_a_bound_socket():
    with socket.socket() as listening, socket.socket() as bound:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        bound.bind(("127.0.0.1", 0))
        assert port_listening(listening.getsockname()[1])
        assert not port_listening(bound.getsockname()[1])
