"""One way to reach Ray: the cluster in RAY_ADDRESS, or a local one started on demand."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> str:
    """Connect once per process and say where. RAY_ADDRESS (e.g. 127.0.0.1:6379 or
    ray://head:10001) selects an existing cluster; without it a local Ray starts with this
    machine's CPUs (or ``num_cpus``)."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    ctx = ray.get_runtime_context()
    cpus = ray.cluster_resources().get("CPU", 0)
    where = os.environ.get("RAY_ADDRESS") or "a local Ray"
    return f"Ray: {where} ({cpus:g} CPUs, {len(ray.nodes())} node(s), job {ctx.get_job_id()})"
