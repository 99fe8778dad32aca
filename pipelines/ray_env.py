"""One way to reach Ray: the cluster in RAY_ADDRESS, or a local one started on demand."""

from __future__ import annotations

import os
from pathlib import Path

DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")


def quiet_env() -> dict[str, str]:
    """Environment for Ray's processes: Ray Data's console logs at WARNING (its INFO lines
    per dataset execution would drown training progress); no usage reporting (air-gapped
    clusters)."""
    # RAY_TRAIN_ENABLE_PRINT_PATCH=0: Ray Train would route workers' print() through the
    # root logger and also tee it, printing every progress line twice.
    return {"RAY_DATA_LOGGING_CONFIG": str(DATA_LOGGING), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def init_ray(num_cpus: int | None = None) -> str:
    """Connect once per process and say where. RAY_ADDRESS (e.g. 127.0.0.1:6379 or
    ray://head:10001) selects an existing cluster; without it a local Ray starts with this
    machine's CPUs (or ``num_cpus``) and its dashboard on 127.0.0.1:8265."""
    import ray

    if not ray.is_initialized():
        os.environ.update(quiet_env())
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True,
                     runtime_env={"env_vars": quiet_env()})
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     log_to_driver=True)
    ctx = ray.get_runtime_context()
    cpus = ray.cluster_resources().get("CPU", 0)
    where = os.environ.get("RAY_ADDRESS") or "a local Ray"
    dash = ray._private.worker.global_worker.node.address_info.get("webui_url")
    ui = f", dashboard http://{dash}" if dash else ""
    return f"Ray: {where} ({cpus:g} CPUs, {len(ray.nodes())} node(s), job {ctx.get_job_id()}{ui})"
