"""MLflow tracking: where runs go, and a small buffered logger for the rank-0 worker.

Default store: SQLite + a local artifact folder, both under the project data directory
(``FCN_DATA_DIR``, default ``./data``). ``MLFLOW_TRACKING_URI`` selects a server instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.errors import ServiceUnavailable, UsageError


def data_dir() -> Path:
    """The project's data directory (shards, runs, MLflow store)."""
    return Path(os.environ.get("FCN_DATA_DIR", "data")).resolve()


_ANSWERED: set[str] = set()  # tracking servers that answered in this process


def check_server(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer is one line now, not minutes of MLflow's
    retries and then a traceback. Checked once per process and server."""
    if not uri.startswith(("http://", "https://")) or uri in _ANSWERED:
        return
    import urllib.error
    import urllib.request

    from pipelines.storage import redact

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            ok = r.status == 200
        cause = "" if ok else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        ok, cause = False, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        ok, cause = False, str(getattr(e, "reason", e))
    if not ok:
        raise ServiceUnavailable(redact(
            f"the MLflow tracking server at MLFLOW_TRACKING_URI={uri} does not answer "
            f"({cause}): start it, or point MLFLOW_TRACKING_URI at one that runs"))
    _ANSWERED.add(uri)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI (a server that answers), else SQLite under the data folder. A new
    SQLite store starts from the migrated template (``seed_sqlite_store``)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_server(uri)
        seed_sqlite_store(uri)
        return uri
    folder = data_dir() / "mlflow"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # FCN_DATA_DIR under a folder that cannot be written, say
        raise UsageError(f"cannot create {folder}, the MLflow store of FCN_DATA_DIR (or "
                         f"--project-dir): {exc.strerror or exc}; or set MLFLOW_TRACKING_URI"
                         ) from None
    uri = _default_uri()
    seed_sqlite_store(uri)
    return uri


def _default_uri() -> str:
    return f"sqlite:///{data_dir() / 'mlflow' / 'mlflow.db'}"


def store_template() -> Path:
    """This MLflow version's migrated SQLite store (``pipelines.db_template``)."""
    from importlib.metadata import version

    from pipelines.db_template import cache_dir

    return cache_dir() / f"mlflow-{version('mlflow')}.db"


def seed_sqlite_store(uri: str) -> bool:
    """A new SQLite store (``sqlite:///PATH`` whose file does not exist) as a copy of this
    MLflow version's template: MLflow otherwise runs its ~100 schema migrations there first
    (3.1-3.4 s to a first query on an idle 2-core machine, 1.2 s on a migrated store). Where no
    template exists yet, MLflow makes the store now and it becomes the template. The copy is
    what MLflow would have made in this folder: its Default experiment's artifacts go to
    ./mlruns/0 of the working folder. Any other URI, an existing file, or a template that
    cannot be read or written: MLflow's own way. True when the store was copied."""
    if not uri.startswith("sqlite:///"):
        return False
    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists() or not db.parent.is_dir():
        return False
    import sqlite3

    from pipelines.db_template import copy_db

    template = store_template()
    if not template.is_file():
        _make_template(uri, db, template)
        return False
    now = int(time.time() * 1000)
    default_root = os.path.join(os.path.abspath("mlruns"), "0")

    def as_new(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, "
                     "last_update_time = ? WHERE experiment_id = 0", (default_root, now, now))

    try:
        return copy_db(template, db, exclusive=True, adjust=as_new)
    except (OSError, sqlite3.Error):
        return False


def _make_template(uri: str, db: Path, template: Path) -> None:
    """MLflow makes the new store (as its first client would); a copy is kept as the
    template, only when no run or other experiment is in it yet."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    from pipelines.db_template import copy_db

    MlflowClient(uri).search_experiments(max_results=1)  # creates and migrates the store
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            fresh = conn.execute("SELECT count(*) FROM experiments").fetchone()[0] == 1 and \
                conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
        conn.close()
        if fresh:
            copy_db(db, template)
    except (OSError, sqlite3.Error):
        pass


def _artifact_root() -> str | None:
    """For a SQLite store (ours by default, or a user's ``sqlite:///PATH``): artifacts beside
    the database, in ``artifacts/`` (else MLflow puts new experiments' artifacts in ./mlruns of
    whatever folder the command ran in). A server chooses its own. MLflow's
    ``set_tracking_uri`` exports MLFLOW_TRACKING_URI, so the variable may hold our default."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or _default_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()


def experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = _artifact_root()
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params ("stages.0.lr": "1e-10")."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], Mapping):
            for i, item in enumerate(v):
                out.update(flatten(item, f"{key}.{i}."))
        else:
            out[key] = str(v)
    return out


class MetricLogger:
    """Buffered ``log_batch`` to one run; used by rank 0 inside a Ray Train worker.

    MLflow's client is made in a thread: importing MLflow takes a worker 1.5 s or more, which
    held up a stage's first step. Metrics logged before it is ready wait in the buffer; a
    failure to make it is raised by the next ``log`` or ``flush``."""

    def __init__(self, uri: str, run_id: str, flush_every_s: float = 5.0):
        import threading

        self.run_id, self.flush_every_s = run_id, flush_every_s
        self._buf: list[tuple[str, float, int, int]] = []
        self._last = time.monotonic()
        self._client: Any = None
        self._error: BaseException | None = None

        def make() -> None:
            try:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(uri)
            except BaseException as e:  # noqa: BLE001  (raised in the caller's thread)
                self._error = e

        self._making = threading.Thread(target=make, name="fcn-mlflow-client", daemon=True)
        self._making.start()

    def _ready(self, wait: bool) -> bool:
        if wait:
            self._making.join()
        if self._error is not None:
            raise self._error
        return self._client is not None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._buf += [(k, float(v), ts, step) for k, v in metrics.items()]
        if time.monotonic() - self._last >= self.flush_every_s and self._ready(wait=False):
            self.flush()

    def flush(self) -> None:
        """Send what is buffered (waiting for the client if it is still being made)."""
        self._ready(wait=True)
        from mlflow.entities import Metric

        metrics = [Metric(k, v, ts, step) for k, v, ts, step in self._buf]
        for i in range(0, len(metrics), 1000):  # MLflow caps a batch at 1000 metrics
            self._client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        self._buf = []
        self._last = time.monotonic()
