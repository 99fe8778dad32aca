"""Let the processes started ahead for Ray Train's workers import what a worker needs while
they wait.

``pipelines.prestart`` has the local raylet start idle processes for a Ray Train run while
ingest runs. A worker's process still imports Ray Train, torch, ``torch._dynamo`` (which
``torch.optim`` imports on first use) and our training code after ``fit()``: ~2 s of CPU each
on this machine, on the first stage's path. ``init_ray`` therefore starts a local Ray with
``hook`` as Ray's worker setup hook (the ``__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR`` variable
Ray's ``worker_process_setup_hook`` sets; every worker process of that raylet runs it once
after it connects, before it takes work) and a folder in ``FCN_WARM_DIR``. The prestart marks
each process it started with a file named by its pid there, holding the kind of actor it is
for (``worker`` or ``controller``); ``hook`` imports what that kind needs, in marked processes
only. Every other process (Ray Data tasks, evaluation actors, any Ray Train run not started
ahead) checks one path and goes on. Every process also gets its cluster's GCS address in
RAY_ADDRESS (``_own_cluster``).

This module is imported by every worker of such a Ray: it imports nothing heavy itself.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

DIR_ENV = "FCN_WARM_DIR"
# ray._private.ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR (Ray 2.60), read by Ray's
# default_worker.py at start
HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
HOOK = "pipelines.warm.hook"
WAIT_S = 60.0  # the most the controller's process waits for the workers' imports
FIT = "fit"  # the file the driver writes when it calls fit()
WORKERS = "workers"  # how many worker processes the prestart marks
# What each kind of process imports between taking its actor and the first step: a Ray
# Train worker of ours, and Ray Train's controller (its helper actors' classes come with its
# module; it unpickles the run's TorchConfig, which imports torch).
MODULES = {
    "worker": ("torch", "torch._dynamo", "ray.train.torch",
               "ray.train.v2._internal.execution.worker_group.worker",
               "pipelines.train.worker"),
    "controller": ("ray.train.v2._internal.execution.controller.controller",
                   "ray.train.torch"),
}


def mark(folder: str, pid: int, kind: str = "worker") -> None:
    """Ask the process ``pid`` (started, not yet connected) to import ahead what ``kind``
    (a key of ``MODULES``) needs."""
    if kind not in MODULES:
        raise ValueError(f"unknown kind of process {kind!r}; one of {sorted(MODULES)}")
    with open(os.path.join(folder, str(pid)), "w") as f:
        f.write(kind)


def marked(pid: int | None = None) -> str | None:
    """The kind this process (or ``pid``) was marked with, None if unmarked."""
    folder = os.environ.get(DIR_ENV)
    if not folder:
        return None
    try:
        with open(os.path.join(folder, str(pid or os.getpid()))) as f:
            return f.read().strip() or None
    except OSError:
        return None


def up(folder: str, pid: int) -> bool:
    """Whether the marked process ``pid`` has connected to Ray (its hook has begun)."""
    return os.path.exists(os.path.join(folder, f"{pid}.up"))


def _touch(folder: str, name: str) -> None:
    with open(os.path.join(folder, name), "w"):
        pass


def expect_workers(folder: str, n: int) -> None:
    """Say how many processes the prestart will mark ``worker`` (before it asks for any)."""
    with open(os.path.join(folder, WORKERS), "w") as f:
        f.write(str(n))


def _workers_done(folder: str) -> bool:
    """Whether the processes marked ``worker`` (as many as ``expect_workers`` said) have
    all imported (or are gone)."""
    try:
        with open(os.path.join(folder, WORKERS)) as f:
            expected = int(f.read())
    except (OSError, ValueError):
        expected = 0
    workers = [name for name in os.listdir(folder)
               if name.isdigit() and marked(int(name)) == "worker"]
    return len(workers) >= expected and all(
        os.path.exists(os.path.join(folder, f"{name}.done")) or not os.path.exists(
            f"/proc/{name}") for name in workers)


def _import(names: tuple[str, ...]) -> None:
    for name in names:
        importlib.import_module(name)


def fit_started(folder: str | None) -> None:
    """Tell the controller's process that ``fit()`` is called (the driver, just before): if
    it is still waiting, it takes its actor now and imports on its own."""
    if folder:
        try:
            _touch(folder, FIT)
        except OSError:  # an optimization only
            pass


def _controller_should_import(folder: str) -> bool:
    """Wait, in the controller's process, until the workers' processes have imported (then
    True) or ``fit()`` has been called (then False), at most ``WAIT_S``. Where ingest leaves
    idle CPU (a real dataset's takes minutes) the controller then imports ahead too; where it
    leaves none (the demo's takes 1 s), its imports would slow the workers', which are on
    the first stage's path sooner, and once ``fit()`` is called the actor must not wait."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if os.path.exists(os.path.join(folder, FIT)):
            return False
        if _workers_done(folder):
            return True
        time.sleep(0.05)
    return False


def _own_cluster() -> None:
    """Name this worker's cluster in RAY_ADDRESS. Ray's state API, which Ray Train's
    PlacementGroupCleaner asks whether the controller is alive, finds its cluster by
    RAY_ADDRESS, or else by the Ray instances running on this machine: beside a second one
    (a user's own `ray start`, another command's local Ray) it refused to choose
    ("Found multiple active Ray instances") and the cleaner's thread died."""
    ray = sys.modules.get("ray")  # a Ray worker has it; elsewhere asking would start a Ray
    if ray is not None and ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def hook() -> None:
    """Ray's worker setup hook. Never raises: Ray ends a worker whose hook fails."""
    try:
        _own_cluster()
    except Exception:  # the cleaner then looks for the cluster as before
        pass
    try:
        kind = marked()
        if not kind:
            return
        folder = os.environ[DIR_ENV]
        pid = os.getpid()
        _touch(folder, f"{pid}.up")
        if kind == "controller" and not _controller_should_import(folder):
            return
        _import(MODULES[kind])
        _touch(folder, f"{pid}.done")
    except Exception:  # an optimization only: the actor imports what it needs itself
        pass
