"""Shared test settings: few threads (the CI machine has 2 cores), one Ray per session."""

import os
import shutil
import time
from pathlib import Path

# Several test sessions (and their Ray workers) share 2 cores. OpenMP's threads otherwise spin
# after each parallel region, taking the cores the other sessions need: `make test-fast` on 3
# workers took 122-131 s with spinning threads and 78 s without. Set before torch starts its
# OpenMP runtime; every process the tests start inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)
# Tests never talk to a user's cluster by accident.
os.environ.pop("RAY_ADDRESS", None)
# The Rays that tests start keep their sessions (logs, sockets; ~2 MB each, ~40 a run) in a
# folder of this test run (xdist's workers inherit it), not in the machine's /tmp/ray, where
# they stayed for good. Short: Ray's socket paths must stay under 107 bytes.
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ["RAY_TMPDIR"] = f"/tmp/fcn-tests-{os.getpid()}"
# Three sessions share 2 cores: a local Ray's dashboard can take more than Ray's 60 s to come
# up while the others start theirs (`ray.init` then fails).
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "240")
# The suite's Rays live long (a session's ~18 min) and idle between tests: an idle local Ray
# with its dashboard took 5.8 CPU-s a minute here, ~4.7 with these (bench/results/HISTORY.md,
# 2026-12-08). No metrics (the dashboard agent's and workers' collection: no test reads
# them), and Ray's log monitor looks for new log files once a second rather than ten times
# (RAY_LOG_MONITOR_MANY_FILES_THRESHOLD: the file count above which it does so; it still
# reads the files it has ten times a second). Every Ray the tests start inherits them.
os.environ.setdefault("RAY_enable_metrics_collection", "0")
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
os.environ.setdefault("LOG_NAME_UPDATE_INTERVAL_S", "1")
STARTED = time.time()

# A test that uses one of these starts a real engine or server: it is `slow` whether or not
# it says so, and `make test-fast` (-m "not slow") leaves it out.
ENGINE_FIXTURES = {"ray_local", "s3_server", "postgres", "mlflow_server"}


# `make test` runs three pytest sessions side by side (pytest-xdist, -n 3 --dist loadgroup),
# one per group below. With two the 2 cores still idled while tests waited on servers, jobs
# and worker starts; with three they are busy the whole run (831 -> 743 s of tests, measured
# in one hour). "cluster": the two-node cluster's module (its fixtures start once), the
# servers' own tests, the local stack and the benchmarks' runs; "own-engines": the training
# tests and the flows that start a Prefect API or server of their own; "shared": the rest.
# Each session starts a local Ray and servers only when one of its tests uses them. The
# groups are sized from `make test`'s durations (~700 s each); `session_group` names a test's.
SESSION_GROUPS: dict[str, tuple[str, ...]] = {
    "cluster": ("test_cluster.py", "test_servers.py",
                "test_infra.py::test_local_stack_up_and_down",
                "test_bench.py::test_bench_predict", "test_bench.py::test_bench_stage_start_runs"),
    "own-engines": ("test_flows.py::test_an_experiment_runs_its_rows",
                    "test_flows.py::test_served_deployment",
                    "test_train.py", "test_train_details.py"),
}
SHARED = "shared"  # every other test


def session_group(nodeid: str) -> str:
    for group, keys in SESSION_GROUPS.items():
        if any(k in nodeid for k in keys):
            return group
    return SHARED


def pytest_collection_modifyitems(config, items):
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session, exitstatus):
    """The run's Ray sessions go once it passed and no process of theirs is left; a failed
    run keeps them to read (the path is printed)."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        return
    folder = Path(os.environ["RAY_TMPDIR"])
    deadline = time.monotonic() + 20  # a Ray the last tests started may still be exiting
    while folder.exists() and _used_by_a_process(folder) and time.monotonic() < deadline:
        time.sleep(0.5)
    # The spawned ranks of the gloo test leave multiprocessing folders too (killed, as the
    # dashboards of the tests' own local Rays are).
    # A dashboard's forkserver holds its socket a moment after Ray's shutdown: wait for it.
    from pipelines.ray_env import pymp_folders, remove_dead_pymp_folders

    deadline = time.monotonic() + 10
    while remove_dead_pymp_folders(pymp_folders(since=STARTED)) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    if not folder.exists():
        return
    if exitstatus == 0 and not _used_by_a_process(folder):
        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"\nthe tests' Ray sessions (logs) are in {folder}")


def _used_by_a_process(folder: Path) -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(folder).encode() in cmdline.read_bytes():
                return True
        except OSError:  # gone meanwhile
            continue
    return False


def pytest_xdist_make_scheduler(config, log):
    """The sessions of ``--dist loadgroup``, one per ``session_group``. xdist's own loadgroup reads
    the ``xdist_group`` mark from a suffix its worker hook adds to ``item._nodeid``, which
    pytest 9 no longer reads (node ids live in ``_id``): every test went to either session,
    and a module's fixtures (the two-node cluster) could start in both."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupSessions(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return session_group(nodeid)

    return GroupSessions(config, log)


_REALDATA_CANDIDATES = [
    os.environ.get("FCN_REALDATA", ""),
    Path(__file__).resolve().parents[2] / "shared" / "realdata",  # beside the checkout
    "/work/shared/realdata",  # the team machines' shared folder, for clones elsewhere
]


def _find_realdata() -> Path | None:
    for cand in _REALDATA_CANDIDATES:
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The real sample files (../shared/realdata, or FCN_REALDATA)."""
    path = _find_realdata()
    if path is None:
        pytest.skip("real samples absent: set FCN_REALDATA to the shared/realdata folder")
    return path


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Registered models' checkpoints are cached in the session's temp folder, not in the
    checkout's ./data (commands the tests run inherit it)."""
    os.environ["FCN_MODEL_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    yield
    os.environ.pop("FCN_MODEL_CACHE", None)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (ray.init costs ~5 s)."""
    import ray

    from pipelines.ray_env import quiet_env

    os.environ.update(quiet_env())
    # As init_ray's own local Ray: no Ray Train preemption watcher (an actor, so a process
    # that imports Ray Train, per worker group) where one node has nothing to drain.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The dashboard serves the state API that Ray Train V2's controller monitor queries.
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The session Ray's GCS address, for a command a test starts (its RAY_ADDRESS): the
    command joins it as a driver, as on a cluster, instead of starting a local Ray of its
    own (~11 CPU-s to start and stop, its processes' imports, and its idle CPU meanwhile).
    For tests whose point is not the command's own local Ray."""
    return ray_local.get_runtime_context().gcs_address


# --- real servers, one of each per test session, started only when a test asks -----------


@pytest.fixture(scope="module")
def monkeypatch_module():
    """A module-scoped monkeypatch (for environment variables shared by a module's tests)."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API (SeaweedFS) on 127.0.0.1 with generated credentials; stopped by pid."""
    from servers import SeaweedS3

    with SeaweedS3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A throwaway PostgreSQL 15 cluster on 127.0.0.1 (run as an unprivileged user)."""
    from servers import Postgres

    with Postgres(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server, postgres):
    """`mlflow server` with a PostgreSQL backend store and artifacts in s3://fcn/mlflow."""
    from servers import MlflowServer

    s3_server.create_bucket("fcn")
    with MlflowServer(tmp_path_factory.mktemp("mlflow"), postgres.uri(), "s3://fcn/mlflow",
                      env=s3_server.env()) as server:
        yield server
