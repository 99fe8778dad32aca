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
ahead) checks one path and goes on.

This module is imported by every worker of such a Ray: it imports nothing heavy itself.
"""

from __future__ import annotations

import importlib
import os

DIR_ENV = "FCN_WARM_DIR"
# ray._private.ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR (Ray 2.60), read by Ray's
# default_worker.py at start
HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
HOOK = "pipelines.warm.hook"
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


def hook() -> None:
    """Ray's worker setup hook. Never raises: Ray ends a worker whose hook fails."""
    try:
        kind = marked()
        if kind:
            with open(os.path.join(os.environ[DIR_ENV], f"{os.getpid()}.up"), "w"):
                pass
        for name in MODULES.get(kind or "", ()):
            importlib.import_module(name)
    except Exception:  # an optimization only: the actor imports what it needs itself
        pass
