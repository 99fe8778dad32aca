"""A local cache of registered models' checkpoints, keyed by MLflow's logged-model id.

A registered version points at a logged model (``source: models:/m-<id>``) whose artifacts
never change, so its serving checkpoint can be kept under that id and reused: looking up
``models:/name@alias`` then needs only the alias -> version -> source answer, which is read
without importing MLflow (a read-only SQLite query of a ``sqlite:///`` store, or one REST
call to a server). Anything this lookup cannot answer with certainty (another store, a
workspace, TLS options, a deleted or unknown version, an older ``runs:/`` source) returns
``None`` and the caller takes MLflow's own path, which then fills the cache. Registration
fills it too, so the model a run just registered is predicted from at once.

The cache lives in ``<FCN_DATA_DIR>/model-cache/`` or ``FCN_MODEL_CACHE`` (``off`` turns it
off): one ``<model id>.pt`` per model, written atomically; the ``KEEP`` most recently used are
kept.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

KEEP = 8  # checkpoints kept (a VGG16 FCN's is ~0.5 GB)
_MODEL_ID = re.compile(r"m-[0-9a-f]{32}")
_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))/?")
_DELETED = "Deleted_Internal"  # MLflow's SQL store soft-deletes versions with this stage


def cache_dir() -> Path | None:
    """``FCN_MODEL_CACHE`` (a folder, or ``off``), else ``<FCN_DATA_DIR>/model-cache``."""
    from pipelines.tracking import data_dir

    where = os.environ.get("FCN_MODEL_CACHE", "")
    if where.lower() == "off":
        return None
    return Path(where).resolve() if where else data_dir() / "model-cache"


def cached(model_id: str) -> Path | None:
    """The cached checkpoint of a logged model (and marks it used), or None."""
    d = cache_dir()
    if d is None or not _MODEL_ID.fullmatch(model_id):
        return None
    path = d / f"{model_id}.pt"
    if not path.is_file():
        return None
    with contextlib.suppress(OSError):  # a read-only shared cache is still read
        os.utime(path)  # most recently used: kept longest
    return path


def store(model_id: str, checkpoint: str | Path) -> None:
    """Keep a copy of ``checkpoint`` as the logged model's; drop the least recently used
    beyond ``KEEP``. A cache that cannot be written is skipped (it only saves time)."""
    d = cache_dir()
    if d is None or not _MODEL_ID.fullmatch(model_id):
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".part")
        os.close(fd)
        shutil.copyfile(checkpoint, tmp)
        os.replace(tmp, d / f"{model_id}.pt")
        kept = sorted(d.glob("m-*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[KEEP:]:
            old.unlink(missing_ok=True)
    except OSError:
        return


def logged_model_id(uri: str, tracking_uri: str, timeout: float = 5.0) -> str | None:
    """The logged-model id a ``models:/name@alias`` or ``models:/name/N`` URI points at now,
    read without MLflow; None when this cannot be told for sure (MLflow then decides)."""
    m = _URI.fullmatch(uri)
    if m is None or os.environ.get("MLFLOW_WORKSPACE"):
        return None
    name, alias, version = m["name"], m["alias"], m["version"]
    try:
        if tracking_uri.startswith("sqlite:///"):
            source = _sqlite_source(tracking_uri.removeprefix("sqlite:///"), name, alias,
                                    version, timeout)
        elif tracking_uri.startswith(("http://", "https://")):
            source = _rest_source(tracking_uri, name, alias, version, timeout)
        else:
            return None
    except (OSError, sqlite3.Error, ValueError, KeyError, TypeError):
        return None  # a server that does not answer, a schema this does not know: MLflow's path
    if not source or not source.startswith("models:/"):
        return None
    model_id = source.removeprefix("models:/").strip("/")
    return model_id if _MODEL_ID.fullmatch(model_id) else None


def _sqlite_source(db: str, name: str, alias: str | None, version: str | None,
                   timeout: float) -> str | None:
    if not os.path.isfile(db):
        return None
    conn = sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)
    try:
        if alias is not None:
            row = conn.execute(
                "SELECT v.source, v.current_stage, v.status FROM registered_model_aliases a "
                "JOIN model_versions v ON v.workspace = a.workspace AND v.name = a.name "
                "AND v.version = a.version WHERE a.workspace = 'default' AND a.name = ? "
                "AND a.alias = ?", (name, alias)).fetchone()
        else:
            row = conn.execute(
                "SELECT source, current_stage, status FROM model_versions "
                "WHERE workspace = 'default' AND name = ? AND version = ?",
                (name, int(str(version)))).fetchone()
    finally:
        conn.close()
    if row is None or row[1] == _DELETED or row[2] != "READY":
        return None
    return str(row[0])


def _rest_source(server: str, name: str, alias: str | None, version: str | None,
                 timeout: float) -> str | None:
    """One GET to MLflow's REST API, authenticated as MLflow's client would (a token, or a
    user and password); TLS options other than the defaults are left to MLflow."""
    env = os.environ
    if any(env.get(k) for k in ("MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                                "MLFLOW_TRACKING_CLIENT_CERT_PATH", "MLFLOW_TRACKING_AUTH")):
        return None
    if alias is not None:
        path, query = "registered-models/alias", {"name": name, "alias": alias}
    else:
        path, query = "model-versions/get", {"name": name, "version": str(version)}
    req = urllib.request.Request(
        f"{server.rstrip('/')}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}")
    if env.get("MLFLOW_TRACKING_TOKEN"):
        req.add_header("Authorization", f"Bearer {env['MLFLOW_TRACKING_TOKEN']}")
    elif env.get("MLFLOW_TRACKING_USERNAME") and env.get("MLFLOW_TRACKING_PASSWORD"):
        pair = f"{env['MLFLOW_TRACKING_USERNAME']}:{env['MLFLOW_TRACKING_PASSWORD']}"
        req.add_header("Authorization", f"Basic {base64.b64encode(pair.encode()).decode()}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError:
        return None  # not found, not allowed: MLflow's path says so in its own words
    mv = body["model_version"]
    if mv.get("current_stage") == _DELETED or mv.get("status", "READY") != "READY":
        return None
    return str(mv.get("source") or "")
