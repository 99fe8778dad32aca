"""Migrated copies of new SQLite databases, so a new project's servers and stores start sooner.

Prefect's database (``flows.prefect_home``) and MLflow's SQLite store (``pipelines.tracking``)
each run their whole schema's migrations when their file is new. The first new database of a
version is kept as that version's template in ``FCN_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fcn``
or ``~/.cache/fcn``); the next new one is a copy of it. A missing or unreadable template only
means the slow start.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("FCN_CACHE_DIR"):
        return Path(os.environ["FCN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fcn"


def copy_db(src: Path, dst: Path, *, exclusive: bool = False,
            adjust: Callable[[sqlite3.Connection], None] | None = None) -> bool:
    """A consistent copy of an SQLite database (even one a server has open), written beside
    ``dst``, changed by ``adjust`` there, then put in place whole: readers never see half a
    file. ``exclusive``: only where ``dst`` does not exist yet (False when it appeared
    meanwhile: a process that opened it keeps its file). True when ``dst`` was written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as s, sqlite3.connect(tmp) as d:
            s.backup(d)
            if adjust is not None:
                adjust(d)
        s.close()
        d.close()
        if not exclusive:
            os.replace(tmp, dst)
            return True
        try:
            os.link(tmp, dst)  # fails where dst exists: never replaces a file in use
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)
