"""Ray Jobs: run an ``fcn`` subcommand on a remote cluster and bring its result back.

When RAY_ADDRESS is a dashboard address (``http://head:8265``) each cluster step of a
pipeline is submitted as a Ray job whose entrypoint is the same ``fcn`` subcommand with the
same arguments, plus ``--result-json LOCATION``: the job writes its result (a small JSON)
to shared storage (a bucket), and the caller reads it back. The job's logs are streamed to
``log`` line by line; a failed job raises ``JobFailed`` with the job's own error line.

The cluster's image (or runtime env) provides the project; credentials come from the
nodes' own environment. Only non-secret settings travel with a job (``FORWARDED_ENV``).
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from pipelines import storage
from pipelines.ray_env import RayUnavailable, address_kind, quiet_env, verbose

Log = Callable[[str], None]
# Settings a job needs that are not secrets (credentials stay in the cluster's environment).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "MLFLOW_EXPERIMENT_NAME", "FCN_MAX_IMAGE_PIXELS",
                 "FCN_VERBOSE")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobFailed(RuntimeError):
    """A Ray job ended in failure; the message is the job's own error line. ``usage`` is True
    when that line is a user's mistake (``fcn CMD: error: ...``, exit code 2): retrying
    cannot help."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


def jobs_address() -> str | None:
    """The dashboard address when RAY_ADDRESS selects Ray Jobs, else None."""
    address = os.environ.get("RAY_ADDRESS")
    return address if address_kind(address) == "jobs" else None


def job_env() -> dict[str, str]:
    env = dict(quiet_env())
    for var in FORWARDED_ENV:
        value = os.environ.get(var)
        if value and storage.redact(value) == value:  # never a URI with a password in it
            env[var] = value
    return env


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RayUnavailable(f"the Ray Jobs API at RAY_ADDRESS={address} does not answer: "
                             f"{storage.redact(first)}") from None


def check_jobs_api(address: str) -> None:
    """Raise RayUnavailable (one line) unless the Ray Jobs API at ``address`` answers."""
    _client(address)


def error_line(logs: str) -> str | None:
    """The ``fcn CMD: ...`` line a failed subcommand printed last, if any."""
    for line in reversed(logs.splitlines()):
        if re.match(r"^fcn [a-z]+: ", line):
            return line.strip()
    return None


# The job manager's own notes in a job's log ("Runtime env is setting up.", and the
# entrypoint again): shown with -v only.
_JOB_MANAGER_NOTE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+\w+ job_manager\.py:\d+ -- "
                               r"|Running entrypoint for job ")


def new_lines(logs: str, shown: int, final: bool) -> tuple[list[str], int]:
    """The lines of a job's log after its first ``shown`` characters, and the new ``shown``:
    only whole lines while the job runs (a line still being written comes whole in a later
    poll), everything once it has ended; blank lines and the job manager's notes left out."""
    end = len(logs) if final else logs.rfind("\n", shown) + 1
    if end <= shown:
        return [], shown
    keep_notes = verbose()
    return [ln for ln in logs[shown:end].splitlines()
            if ln.strip() and (keep_notes or not _JOB_MANAGER_NOTE.match(ln))], end


# The jobs this process submitted and still waits on (job id -> its client). A job outlives
# the process that submitted it: a Ctrl-C, a Prefect task's time limit, a failure elsewhere in
# the flow (or a stage chain's thread, a daemon, cut off at exit) would leave it training on
# the cluster, unwatched, for hours.
_LIVE: dict[str, Any] = {}
_LIVE_LOCK = threading.Lock()


# How long a stop waits for the job to end (Ray's own `ray job stop` waits too): Ray gives the
# entrypoint 3 s after SIGTERM, and a loaded cluster takes a while to start a job's supervisor.
STOP_WAIT_S = 20.0


def _stop(job_id: str, why: str, wait_s: float = STOP_WAIT_S) -> None:
    """Stop ``job_id`` if this process still waits on it, and say on stderr how it ended."""
    with _LIVE_LOCK:
        client = _LIVE.pop(job_id, None)
    if client is None:
        return
    status = "unknown"
    try:
        client.stop_job(job_id)
        deadline = time.monotonic() + wait_s
        while (status := str(client.get_job_status(job_id).value)) not in TERMINAL \
                and time.monotonic() < deadline:
            time.sleep(0.25)
    except Exception as exc:  # noqa: BLE001  (the cluster may be what went away)
        print(f"could not stop Ray job {job_id} ({storage.redact(str(exc).strip()[:200])}): "
              f"stop it with `ray job stop {job_id}`", file=sys.stderr, flush=True)
        return
    if status == "STOPPED":
        line = f"stopped Ray job {job_id}: {why}"
    elif status in TERMINAL:  # it ended by itself, or Ray failed it, as it was being stopped
        line = f"Ray job {job_id} {status.lower()} as it was being stopped ({why})"
        try:
            message = (client.get_job_info(job_id).message or "").strip().splitlines()
        except Exception:  # noqa: BLE001
            message = []
        line += f": {storage.redact(message[-1][:300])}" if message else ""
    else:
        line = (f"asked Ray job {job_id} to stop ({why}); after {wait_s:g} s it is still "
                f"{status.lower()}: `ray job status {job_id}` follows it")
    print(line, file=sys.stderr, flush=True)


def stop_live_jobs() -> None:
    """Stop every Ray job this process submitted and still waits on (at exit)."""
    for job_id in list(_LIVE):
        _stop(job_id, "the command that submitted it ended first")


atexit.register(stop_live_jobs)


def run_job(args: list[str], result_dir: str, log: Log = print, *,
            address: str | None = None, poll_s: float = 1.0,
            entrypoint_num_cpus: float = 0.25) -> dict[str, Any]:
    """Run ``fcn ARGS --result-json <result_dir>/<uuid>.json`` as a Ray job, stream its
    logs, and return the JSON result it wrote."""
    address = address or jobs_address()
    assert address, "run_job needs RAY_ADDRESS=http://host:8265 (or address=)"
    result = storage.join(result_dir, f"job-{uuid.uuid4().hex[:12]}.json")
    storage.check_writable(result_dir)
    entrypoint = shlex.join(["fcn", *args, "--result-json", result])
    client = _client(address)
    # Named for what it runs: `ray job list` and the dashboard show fcn-train-…, fcn-ingest-…
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": job_env()},
                               submission_id=f"fcn-{args[0]}-{uuid.uuid4().hex[:12]}",
                               entrypoint_num_cpus=entrypoint_num_cpus,
                               metadata={"fcn_command": args[0]})
    with _LIVE_LOCK:
        _LIVE[job_id] = client
    try:
        log(f"Ray job {job_id} on {address}: {storage.redact(entrypoint)}")
        shown = 0
        while True:
            status = str(client.get_job_status(job_id).value)
            logs = client.get_job_logs(job_id)
            lines, shown = new_lines(logs, shown, final=status in TERMINAL)
            for line in lines:
                log(storage.redact(line))
            if status in TERMINAL:
                break
            time.sleep(poll_s)
    except BaseException as exc:  # Ctrl-C, a time limit, a lost connection: stop it
        _stop(job_id, f"interrupted ({type(exc).__name__})")
        raise
    with _LIVE_LOCK:
        _LIVE.pop(job_id, None)
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        line = error_line(logs)
        why = line or ((info.message or "").strip().splitlines() or [status])[-1]
        raise JobFailed(storage.redact(f"Ray job {job_id} {status.lower()}: {why}"),
                        usage=bool(line and ": error: " in line))
    try:
        return storage.read_json(result)
    except FileNotFoundError:
        raise JobFailed(f"Ray job {job_id} succeeded but wrote no result at {result}: does "
                        "the cluster reach that storage?") from None
