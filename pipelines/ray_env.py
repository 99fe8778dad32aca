"""One way to reach Ray: the cluster in RAY_ADDRESS, or a local one started on demand.

RAY_ADDRESS forms:
- unset: a local Ray with this machine's CPUs (dashboard on 127.0.0.1:8265);
- ``host:6379`` (the head's GCS) or ``auto``: this process is a driver on that cluster;
- ``http://host:8265`` (the dashboard): Ray Jobs; ``flows`` submits each cluster task as a
  job (``pipelines.jobs``) and this module refuses to start a driver on it;
- ``ray://`` (Ray Client) is refused: it does not run Ray Data and Ray Train reliably
  (ray-project/ray#42739, #48682).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pipelines.errors import ServiceUnavailable

DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")
_DASHBOARD: dict[str, str] = {}  # the dashboard URL ray.init() returned in this process


class RayUnavailable(ServiceUnavailable, ConnectionError):
    """RAY_ADDRESS names a cluster this process cannot use; the message says why."""


def quiet_env() -> dict[str, str]:
    """Environment for Ray's processes: Ray Data's console logs at WARNING (its INFO lines
    per dataset execution would drown training progress); no usage reporting (air-gapped
    clusters)."""
    # RAY_TRAIN_ENABLE_PRINT_PATCH=0: Ray Train would route workers' print() through the
    # root logger and also tee it, printing every progress line twice.
    return {"RAY_DATA_LOGGING_CONFIG": str(DATA_LOGGING), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def address_kind(address: str | None) -> str:
    """"local" | "gcs" | "jobs" | "client" for a RAY_ADDRESS value."""
    if not address:
        return "local"
    if address.startswith(("http://", "https://")):
        return "jobs"
    if address.startswith("ray://"):
        return "client"
    return "gcs"


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A GCS address (host:port) that does not accept a connection fails here in one line,
    instead of after Ray's own long retries."""
    if address == "auto":
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


def init_ray(num_cpus: int | None = None) -> str:
    """Connect once per process and say where."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    kind = address_kind(address)
    if not ray.is_initialized():
        os.environ.update(quiet_env())
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
            ctx = ray.init(address=address, log_to_driver=True,
                           runtime_env=None if in_job else {"env_vars": quiet_env()})
        else:
            ctx = ray.init(num_cpus=num_cpus, include_dashboard=True,
                           dashboard_host="127.0.0.1", log_to_driver=True)
        if ctx.dashboard_url:
            _DASHBOARD["url"] = ctx.dashboard_url
    job = ray.get_runtime_context().get_job_id()
    cpus = ray.cluster_resources().get("CPU", 0)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    where = address or "a local Ray"
    dash = _DASHBOARD.get("url")
    ui = f", dashboard http://{dash.removeprefix('http://')}" if dash else ""
    return f"Ray: {where} ({cpus:g} CPUs, {nodes} node(s), job {job}{ui})"
