"""Let the processes started ahead for Ray Train's workers import what a worker needs while
they wait.

``pipelines.prestart`` has the local raylet start idle processes for a Ray Train run while
ingest runs. A worker's process still imports Ray Train, torch, ``torch._dynamo`` (which
``torch.optim`` imports on first use) and our training code after ``fit()``: ~2 s of CPU each
on this machine, on the first stage's path. ``init_ray`` therefore starts a local Ray with
``hook`` as Ray's worker setup hook (the ``__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR`` variable
Ray's ``worker_process_setup_hook`` sets; every worker process of that raylet runs it once
after it connects, before it takes work) and a folder in ``FCN_WARM_DIR``. The prestart marks
each process it started for a Ray Train worker with a file named by its pid there; ``hook``
imports in marked processes only. Every other process (Ray Data tasks, evaluation actors, Ray
Train's controller side, any Ray Train run not started ahead) checks one path and goes on.

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
# What a Ray Train worker of ours imports between taking the actor and its first step.
MODULES = ("torch", "torch._dynamo", "ray.train.torch",
           "ray.train.v2._internal.execution.worker_group.worker",
           "pipelines.train.worker")


def mark(folder: str, pid: int) -> None:
    """Ask the process ``pid`` (started, not yet connected) to import ahead."""
    with open(os.path.join(folder, str(pid)), "w"):
        pass


def marked(pid: int | None = None) -> bool:
    folder = os.environ.get(DIR_ENV)
    return bool(folder) and os.path.exists(os.path.join(folder, str(pid or os.getpid())))


def hook() -> None:
    """Ray's worker setup hook. Never raises: Ray ends a worker whose hook fails."""
    try:
        if not marked():
            return
        for name in MODULES:
            importlib.import_module(name)
    except Exception:  # an optimization only: the actor imports what it needs itself
        pass
