"""One way to reach Ray: the cluster in RAY_ADDRESS, or a local one started on demand.

RAY_ADDRESS forms:
- unset: a local Ray of this process's own with this machine's CPUs (dashboard on
  127.0.0.1:8265), also where a ``ray start`` cluster runs on this machine (``ray.init()``
  would join that one: the "Ray:" line names it, and ``auto`` joins it);
- ``host:6379`` (the head's GCS) or ``auto``: this process is a driver on that cluster;
- ``http://host:8265`` (the dashboard): Ray Jobs; ``flows`` submits each cluster task as a
  job (``pipelines.jobs``) and this module refuses to start a driver on it;
- ``ray://`` (Ray Client) is refused: it does not run Ray Data and Ray Train reliably
  (ray-project/ray#42739, #48682).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import logging
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.errors import ServiceUnavailable, UsageError

DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")
_DASHBOARD: dict[str, str] = {}  # the dashboard URL ray.init() returned in this process
_OTHER: dict[str, str] = {}  # a `ray start` cluster this process's local Ray is not
_WARM: dict[str, str] = {}  # the folder of pipelines.warm's marks, for this process's Ray


class RayUnavailable(ServiceUnavailable, ConnectionError):
    """RAY_ADDRESS names a cluster this process cannot use; the message says why."""


def quiet_env() -> dict[str, str]:
    """Environment for Ray's processes: Ray Data's console logs at WARNING (its INFO lines
    per dataset execution would drown training progress); no usage reporting (air-gapped
    clusters)."""
    # RAY_TRAIN_ENABLE_PRINT_PATCH=0: Ray Train would route workers' print() through the
    # root logger and also tee it, printing every progress line twice.
    env = {"RAY_DATA_LOGGING_CONFIG": str(DATA_LOGGING), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not verbose():
        # Ray's internals, not the user's business: deprecation warnings Ray's own actors
        # raise (e.g. Ray Train's DatasetManager on ExecutionOptions.exclude_resources).
        # `-v` shows them.
        env.update(PYTHONWARNINGS="ignore::DeprecationWarning")
    return env


# Worker output that is Ray's own business, dropped from the driver's console unless `-v`:
# Ray Train's controller notes that its PreemptionWatcher actor has constructor arguments in
# the object store (ray-project/ray#53727: harmless, printed on every stage), and the
# PlacementGroupCleaner's monitor thread, which dies with a traceback when a second Ray runs on
# the same machine (it looks the cluster up without an address). The full logs stay in the
# session's log folder.
_INTERNAL_ACTORS = ("PlacementGroupCleaner",)
_INTERNAL_LINES = ("has constructor arguments in the object store and max_restarts",)


def _keep(batch: dict) -> dict | None:
    if str(batch.get("actor_name") or "").startswith(_INTERNAL_ACTORS):
        return None
    lines = [ln for ln in batch.get("lines", []) if not any(m in ln for m in _INTERNAL_LINES)]
    return {**batch, "lines": lines} if lines else None


def filter_worker_logs() -> None:
    """Drop Ray's internal worker lines (above) from what the driver prints. Ray has no public
    hook for this; on a Ray without this internal dispatcher it does nothing."""
    if verbose():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        handlers = list(dispatcher.handlers)
    for name, handler in handlers:
        if name != "ray_print_logs" or getattr(handler, "_fcn_filtered", False):
            continue

        def filtered(data: dict, _inner=handler) -> None:
            kept = _keep(data)
            if kept is not None:
                _inner(kept)

        filtered._fcn_filtered = True  # type: ignore[attr-defined]
        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, filtered)


def plain_worker_prefixes(stream: object | None = None) -> None:
    """Ray wraps the ``(RayTrainWorker pid=N)`` prefix of the workers' lines it prints in
    colour codes, also when the driver's output is a file or a pipe (a CI log, a Ray job's
    log, ``tee``), where they show as ``\\x1b[36m``. Plain prefixes there and under the
    ``NO_COLOR`` convention; a user's ``RAY_COLOR_PREFIX`` wins."""
    import sys

    out = sys.stdout if stream is None else stream
    isatty = getattr(out, "isatty", None)
    if os.environ.get("NO_COLOR") or not (callable(isatty) and isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


@contextlib.contextmanager
def remote_args_allowed() -> Iterator[None]:
    """Ray 2.60 warns about ``ray_remote_args`` in ``map_batches`` even for options it has
    no named parameter for (``max_restarts``): keep that warning off users' consoles."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        yield


def verbose() -> bool:
    """`fcn -v` (FCN_VERBOSE=1): show Ray's own logs too."""
    return os.environ.get("FCN_VERBOSE", "") not in ("", "0")


def quiet_ray_data(show: bool | None = None) -> None:
    """Ray Data logs every operator's progress at INFO when stderr is not a terminal. Keep
    its progress bars on a terminal, and otherwise only our own progress lines. Called where
    ray.data is imported (it configures Ray's loggers on import: adjust them after)."""
    import sys

    import ray.data

    if verbose() if show is None else show:
        return
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    for name in ("ray", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Progress bars disabled ..." once per dataset when stderr is not a terminal.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def quiet_train_worker() -> None:
    """In a Ray Train worker: drop Ray Train's "Reporting training result N:
    TrainingReport(...)" INFO line per report. Ray 2.60 logs it on a logger named by its file
    path, which its own log-level filter (names under "ray.train") does not catch."""
    import logging

    if verbose():
        return
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_log_level() -> str:
    """Ray Train's own console level: its INFO lines dump every report's metrics dict."""
    return "INFO" if verbose() else "WARNING"


def address_kind(address: str | None) -> str:
    """"local" | "gcs" | "jobs" | "client" for a RAY_ADDRESS value."""
    if not address:
        return "local"
    if address.startswith(("http://", "https://")):
        return "jobs"
    if address.startswith("ray://"):
        return "client"
    return "gcs"


def check_gpus(needed: int, each: str, fewer: str) -> str | None:
    """``needed`` GPUs (one per ``each``) against the connected Ray's. A local Ray of this
    process cannot grow: too few is a one-line usage error now, where Ray would wait for them
    for ever (its autoscaler only repeats "No available node types can fulfill resource
    request {'GPU': 1.0}"). A cluster may add GPU nodes when asked (the KubeRay GPU worker
    group starts at 0): there it is a line to show, and Ray waits for them."""
    import ray

    have = ray.cluster_resources().get("GPU", 0)
    if have >= needed:
        return None
    if address_kind(os.environ.get("RAY_ADDRESS")) == "local":
        fewer = f", {fewer}" if have else ""
        raise UsageError(f"--gpu needs {needed} GPU(s), one per {each}, and this machine's Ray "
                         f"has {have:g}: leave --gpu out{fewer}, or set RAY_ADDRESS to a "
                         "cluster with GPUs")
    return (f"--gpu needs {needed} GPU(s), one per {each}, and the cluster has {have:g} now: "
            "waiting for its autoscaler to add GPU nodes (Ray waits until they come)")


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A GCS address (host:port) that does not accept a connection fails here in one line,
    instead of after Ray's own long retries."""
    if address == "auto":
        if ray_start_address() is None:
            raise RayUnavailable("RAY_ADDRESS=auto joins the cluster `ray start` began on this "
                                 "machine, and none runs here: start one, set its address, or "
                                 "unset RAY_ADDRESS for a local Ray")
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"RAY_ADDRESS={address!r} is not host:port (e.g. 10.0.0.5:6379), "
                             "a dashboard URL (http://host:8265) or unset")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise RayUnavailable(f"the Ray cluster at RAY_ADDRESS={address} does not answer "
                             f"({why}): start it, or unset RAY_ADDRESS for a local Ray"
                             ) from None


def set_train_env() -> None:
    """This process's settings for the Ray Train runs it starts (Ray Train propagates
    RAY_TRAIN_* variables to its controller and workers; a user's value wins). Set before
    ``fit()`` and before ``pipelines.prestart`` starts processes for those runtime envs."""
    # Ray Train's controller polls the workers every 2 s by default: a checkpoint registers,
    # and a finished run returns, up to that long after the workers are done.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def _start_autoscaling_coordinator() -> None:
    """Create Ray's autoscaling coordinator (a detached actor every Ray Train run and Ray
    Data execution asks for resources) now, in the background, from this driver: without a
    runtime env it takes one of Ray's prestarted worker processes. Created later by Ray
    Train's controller, it inherits the controller's runtime env and needs a new process on
    the first stage's path: the workers started ~0.8 s later on 2 cores (measured)."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:  # moved in another Ray: Ray Train creates it when it needs it
        return
    get_or_create_autoscaling_coordinator()  # returns at once; the actor starts meanwhile


def warm_dir() -> str | None:
    """Where ``pipelines.prestart`` marks the processes that import ahead
    (``pipelines.warm``); None unless this process started the local Ray with the hook."""
    return _WARM.get("dir")


@contextlib.contextmanager
def _warm_hook() -> Iterator[None]:
    """Start the local Ray's raylet (it passes its environment to every worker process) with
    ``pipelines.warm.hook`` as Ray's worker setup hook, where the workers can import it (the
    project is installed in this interpreter). Only the raylet gets the variables."""
    from pipelines import warm

    try:
        importlib.metadata.distribution("fcn-pipeline")
    except importlib.metadata.PackageNotFoundError:
        yield
        return
    if os.environ.get(warm.HOOK_ENV):  # someone else's hook: leave it alone
        yield
        return
    folder = tempfile.mkdtemp(prefix="fcn-warm-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ.update({warm.HOOK_ENV: warm.HOOK, warm.DIR_ENV: folder})
    try:
        yield
        _WARM["dir"] = folder
    finally:
        os.environ.pop(warm.HOOK_ENV, None)
        os.environ.pop(warm.DIR_ENV, None)


def ray_start_address() -> str | None:
    """The GCS address the last ``ray start`` on this machine recorded (what ``ray.init()``
    without an address would join), if it still answers."""
    from ray._private.utils import read_ray_address

    try:
        address = read_ray_address()
        host, _, port = (address or "").rpartition(":")
        with socket.create_connection((host, int(port)), timeout=1.0):
            return address
    except (OSError, ValueError):
        return None


def pymp_folders(since: float) -> list[Path]:
    """The multiprocessing folders (``/tmp/pymp-*``) made since ``since``."""
    found = []
    for folder in Path(tempfile.gettempdir()).glob("pymp-*"):
        try:
            if folder.stat().st_mtime >= since:
                found.append(folder)
        except OSError:  # gone meanwhile
            continue
    return found


def remove_dead_pymp_folders(folders: list[Path]) -> list[Path]:
    """Remove those of ``folders`` whose sockets no live process holds; return the others.

    Ray's dashboard leaves one (one listener socket) for every local Ray: its process is
    killed, so Python cannot remove it. A bound socket is listed in /proc/net/unix, and its
    file appears when it is bound: an empty folder may be another process's, starting, and
    stays."""
    try:
        live = Path("/proc/net/unix").read_text()
    except OSError:  # not Linux: nothing to tell a live folder by
        return []
    kept = []
    for folder in folders:
        try:
            entries = list(folder.iterdir())
        except OSError:  # gone meanwhile, or another user's
            continue
        if not entries or any(str(f) in live for f in entries):
            kept.append(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return kept


def _shutdown_local_ray(folders: list[Path], wait_s: float = 3.0) -> None:
    """At exit: stop this process's local Ray (what Ray's own exit handler would do next), then
    remove the folders its dashboard made in /tmp once their sockets are closed (~0.3 s)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    deadline = time.monotonic() + wait_s
    while (folders := remove_dead_pymp_folders(folders)) and time.monotonic() < deadline:
        time.sleep(0.1)


# Ray gives up on a new local node whose raylet has not registered with its GCS within 30 s
# (hard-coded in ray._private.node). On a loaded 2-core machine it once did, in the middle of
# a scheduled pipeline run (`make test`, 2026-12-07 23:23).
NODE_START_TIMEOUT = "The current node timed out during startup"


def init_local_ray(**kwargs: Any) -> Any:
    """``ray.init(**kwargs)`` of a local Ray, started once more where Ray gave up waiting for
    its raylet; the first try's processes (children of this process, left running by Ray)
    are stopped first. Any other failure, or a second timeout, is raised as Ray raised it."""
    import psutil
    import ray

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        return ray.init(**kwargs)
    except Exception as exc:
        if NODE_START_TIMEOUT not in str(exc):
            raise
    stopped = stop_new_ray_processes(before)
    print(f"a local Ray did not start in Ray's 30 s (its raylet did not register: a busy "
          f"machine?); starting it once more ({stopped} process(es) of the first try "
          "stopped)", flush=True)
    return ray.init(**kwargs)


def stop_new_ray_processes(before: set[int], wait_s: float = 10.0) -> int:
    """Kill this process's descendants that run Ray's own programs (GCS, raylet, dashboard,
    log monitor: their command lines name the ray package's folder) and were not among
    ``before``; the number stopped."""
    import psutil
    import ray

    package = os.path.dirname(ray.__file__)
    victims = []
    for p in psutil.Process().children(recursive=True):
        if p.pid in before:
            continue
        with contextlib.suppress(psutil.Error):
            if any(package in part for part in p.cmdline()):
                victims.append(p)
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(victims, timeout=wait_s)
    return len(victims)


def init_ray(num_cpus: int | None = None) -> str:
    """Connect once per process and say where."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    kind = address_kind(address)
    if not ray.is_initialized():
        os.environ.update(quiet_env())
        plain_worker_prefixes()
        level = logging.INFO if verbose() else logging.WARNING  # "Started a local Ray ..."
        if kind == "client":
            raise RayUnavailable(
                f"RAY_ADDRESS={address} is a Ray Client address, which does not run Ray Data "
                "and Ray Train reliably: use the head's GCS address (host:6379) from a node of "
                "the cluster, or its dashboard (http://host:8265) to submit Ray jobs")
        if kind == "jobs":
            raise RayUnavailable(
                f"RAY_ADDRESS={address} is a Ray Jobs (dashboard) address: `fcn run` submits "
                "each step as a Ray job there; other commands need the GCS address "
                "(host:6379), or run them as the entrypoint of a Ray job")
        if kind == "gcs":
            assert address is not None
            check_reachable(address)
            # Inside a Ray job the job's runtime env already carries these (and Ray refuses
            # the same variable from both).
            in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
            ctx = ray.init(address=address, log_to_driver=True, logging_level=level,
                           runtime_env=None if in_job else {"env_vars": quiet_env()})
        else:
            # Ray Train's preemption watcher (an actor per worker group, polling node drains)
            # has nothing to watch on a local Ray: one node, no autoscaler. Its process start
            # cost a stage ~1.5-2 s on 2 cores. A user's value wins.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            if not verbose():  # "Token authentication is enabled for this Ray cluster ..."
                logging.getLogger("ray._private.authentication.authentication_token_setup"
                                  ).setLevel(logging.ERROR)
            # address="local": a Ray of our own even where `ray start` left one to join (Ray
            # would join it, and refuse num_cpus there); the "Ray:" line says how to use it.
            _OTHER["ray start"] = ray_start_address() or ""
            started = time.time()
            with _warm_hook():
                ctx = init_local_ray(address="local", num_cpus=num_cpus,
                                     include_dashboard=True, logging_level=level,
                                     dashboard_host="127.0.0.1", log_to_driver=True)
            _start_autoscaling_coordinator()
            # Before Ray's own exit handler (LIFO): the folders its dashboard made meanwhile.
            atexit.register(_shutdown_local_ray, pymp_folders(since=started))
        if ctx.dashboard_url:
            _DASHBOARD["url"] = ctx.dashboard_url
        filter_worker_logs()
    job = ray.get_runtime_context().get_job_id()
    cpus = ray.cluster_resources().get("CPU", 0)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    where = address or "a local Ray"
    if address == "auto":
        where = f"{ray.get_runtime_context().gcs_address} (RAY_ADDRESS=auto)"
    dash = _DASHBOARD.get("url")
    ui = f", dashboard http://{dash.removeprefix('http://')}" if dash else ""
    other = "" if address else _OTHER.get("ray start")
    aside = (f"; not the Ray that `ray start` runs at {other}: RAY_ADDRESS=auto uses that one"
             if other else "")
    return f"Ray: {where} ({cpus:g} CPUs, {nodes} node(s), job {job}{ui}){aside}"
