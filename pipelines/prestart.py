"""Start a training run's Ray processes ahead of it, on a local Ray, while ingest runs.

A Ray Train run creates its actors in new worker processes, because each carries a runtime
env (Ray's pool hands an idle process only to an actor of the same runtime env):

- the TrainController (from the driver), and from it the PlacementGroupCleaner, the
  SynchronizationActor and the DatasetManager: Ray Train's env vars, as the driver's
  ``runtime_env`` serializes them;
- one RayTrainWorker per worker: the same env vars merged by Ray's core worker into the
  controller's, serialized compactly with sorted keys.

On 2 cores those processes are most of a first stage's start (measured: ``fit()`` to the
train function 5.8 -> 4.0 s). ``prestart_train_processes`` asks this node's raylet (its
``PrestartWorkers`` call, the one Ray's own prestart uses) for idle processes of exactly those
runtime envs, one at a time and below the raylet's startup limit (it drops requests above).
They hold no resources: ingest keeps every CPU. Whatever does not match or does not start
costs nothing but its process; the raylet reclaims idle ones after ``KEEP_ALIVE_S`` or when
the driver ends.

Only a local Ray this process started (``init_ray`` without RAY_ADDRESS): on a cluster the
workers land on other nodes, whose raylets this driver does not know.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

KEEP_ALIVE_S = 600  # a long ingest outlives them: the run then starts its own processes
GIVE_UP_S = 60.0  # stop asking after this long (the raylet stays busy starting others)
CONFIRM_S = 1.0  # a requested process not started by then was dropped: ask again
CONTROLLER_SIDE = 4  # TrainController, PlacementGroupCleaner, SynchronizationActor, DatasetManager


def train_env_vars() -> dict[str, str]:
    """The env vars Ray Train gives its controller (and, merged, its workers)."""
    from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
    from ray.train.v2._internal.constants import (
        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
        get_env_vars_to_propagate,
    )

    from pipelines.ray_env import set_train_env

    set_train_env()  # as pipelines.train sets them before fit()
    env = dict(get_env_vars_to_propagate())
    env.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                   DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    return env


def runtime_env_infos(env: dict[str, str]) -> tuple[Any, Any]:
    """(controller side, worker side) RuntimeEnvInfo protos for ``{"env_vars": env}``."""
    from ray._private.utils import get_runtime_env_info, parse_runtime_env_for_task_or_actor

    spaced = get_runtime_env_info(parse_runtime_env_for_task_or_actor({"env_vars": env}),
                                  is_job_runtime_env=False, serialize=False)
    compact = type(spaced)()
    compact.CopyFrom(spaced)
    compact.serialized_runtime_env = json.dumps({"env_vars": env}, separators=(",", ":"),
                                                sort_keys=True)
    return spaced, compact


def _local_raylet() -> Any | None:
    """This process's own raylet (a psutil.Process), when this process started Ray."""
    import psutil
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    procs = getattr(node, "all_processes", {}) or {}
    raylets = procs.get("raylet") or []
    if not raylets or raylets[0].process is None:
        return None
    return psutil.Process(raylets[0].process.pid)


def _startup_limit(raylet: Any) -> int:
    for arg in raylet.cmdline():
        if arg.startswith("--maximum_startup_concurrency="):
            return max(1, int(arg.split("=", 1)[1]))
    return 1


def starting_processes(raylet: Any) -> int:
    """Worker processes the raylet started that have not registered yet (a registered
    worker renames itself ``ray::IDLE``)."""
    import psutil

    n = 0
    for child in raylet.children():
        try:
            n += any("default_worker.py" in a for a in child.cmdline())
        except psutil.Error:
            continue
    return n


def _children(raylet: Any) -> set[int]:
    return {c.pid for c in raylet.children()}


def prestart_train_processes(workers: int) -> threading.Thread | None:
    """Ask the local raylet, in the background, for the processes of a Ray Train run of
    ``workers`` workers on this node. Returns the thread (done when all were asked for), or
    None where there is nothing to do (no local Ray started by this process)."""
    try:
        import ray

        raylet = _local_raylet() if ray.is_initialized() else None
        if raylet is None:
            return None
        node_id = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        address = f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
        job_id = bytes.fromhex(ray.get_runtime_context().get_job_id())
        spaced, compact = runtime_env_infos(train_env_vars())
        from pipelines.ray_env import warm_dir

        folder = warm_dir()
        if folder:  # a new run: its fit() is not called yet, its workers will be marked
            from pipelines.warm import FIT, expect_workers

            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, FIT))
            expect_workers(folder, workers)
    except Exception:  # an optimization only: a Ray that differs starts its own processes
        log.debug("not prestarting Ray Train's processes", exc_info=True)
        return None
    # The controller side first (measured: the workers' first made the demo's first stage
    # start later, 8.3-8.7 vs 6.6 s, medians of 3), then the workers'.
    todo = [spaced] * CONTROLLER_SIDE + [compact] * workers
    thread = threading.Thread(target=_ask, args=(raylet, address, job_id, todo, compact, folder),
                              name="prestart-train", daemon=True)
    thread.start()
    return thread


def _ask(raylet: Any, address: str, job_id: bytes, todo: list[Any], worker_env: Any,
         warm_dir: str | None) -> None:
    try:
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

        from pipelines.warm import mark

        channel = init_grpc_channel(address)
        stub = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
        limit = _startup_limit(raylet)
        deadline = time.monotonic() + GIVE_UP_S
        controllers = 0
        while todo and time.monotonic() < deadline:
            if starting_processes(raylet) >= limit:  # the raylet would drop the request
                time.sleep(0.1)
                continue
            children = _children(raylet)
            stub.PrestartWorkers(node_manager_pb2.PrestartWorkersRequest(
                language=common_pb2.PYTHON, job_id=job_id, runtime_env_info=todo[0],
                keep_alive_duration_secs=KEEP_ALIVE_S, num_workers=1), timeout=5)
            # The process starts once the runtime env agent answers. The raylet drops a
            # request silently when it counts more processes starting than we see (a worker
            # renames itself before it registers): no new process means ask again.
            sent = time.monotonic()
            while time.monotonic() - sent < CONFIRM_S:
                new = _children(raylet) - children
                if new:
                    # Import ahead what its actor will need: every worker's, and the
                    # controller's. Ray's pool hands the first controller-side process to
                    # connect to the TrainController: one of the first ``limit`` asked for
                    # (a later one is asked for only once one of them has connected), so
                    # those are marked; the helper actors that get the others import
                    # little, and a marked one imports only while nothing else needs the
                    # CPU (pipelines.warm).
                    kind = ("worker" if todo[0] is worker_env
                            else "controller" if controllers < limit else None)
                    if warm_dir and kind:
                        for pid in new:
                            mark(warm_dir, pid, kind)
                    controllers += kind == "controller"
                    todo.pop(0)
                    break
                time.sleep(0.05)
            else:
                time.sleep(0.2)
        channel.close()
    except Exception:
        log.debug("prestarting Ray Train's processes stopped", exc_info=True)
