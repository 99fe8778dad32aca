"""A new project's Prefect database from a migrated copy, so its temporary API starts sooner.

Prefect's temporary API (no PREFECT_API_URL) creates its SQLite database in PREFECT_HOME and
runs every migration of its schema before it answers: ~14 s of the ~19 s it needs on 2 cores
(measured: 18.8 s on a new database, 7.2 s on a migrated copy, 4.5 s on its own database
again). Every `fcn demo` / `fcn run` in a new project folder, and every test that starts one,
paid that. After a temporary API has started, ``remember`` keeps a consistent copy of its
database (SQLite's backup API: migrations and Prefect's registered block types, no runs yet)
as a template for this Prefect version; ``seed`` copies the template into a new PREFECT_HOME
before the next temporary API starts there. Nothing is seeded when the database is elsewhere
(PREFECT_API_DATABASE_CONNECTION_URL) or already exists; a missing or unreadable template
only means the slow start.

Templates live in ``FCN_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fcn`` or ``~/.cache/fcn``),
one file per Prefect version (``prefect-3.8.8.db``).
"""

from __future__ import annotations

import os
import sqlite3
from importlib.metadata import version
from pathlib import Path

from pipelines.db_template import cache_dir, copy_db

DB_NAME = "prefect.db"  # Prefect's default database file in PREFECT_HOME
_URL_VARS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")


def template_path() -> Path:
    return cache_dir() / f"prefect-{version('prefect')}.db"


def _default_db(home: Path) -> Path | None:
    """PREFECT_HOME's database file when Prefect uses its default one, else None."""
    if any(os.environ.get(v) for v in _URL_VARS):
        return None
    return home / DB_NAME


def seed(home: Path) -> bool:
    """Copy the template into ``home`` when its database does not exist yet (and Prefect
    uses its default database there). True when seeded; then the temporary API need not
    register Prefect's block types again (the template has them)."""
    db = _default_db(home)
    template = template_path()
    if db is None or db.exists() or not template.is_file():
        return False
    try:
        copy_db(template, db)
    except (OSError, sqlite3.Error):
        return False
    os.environ.setdefault("PREFECT_API_BLOCKS_REGISTER_ON_START", "false")
    return True


def remember(home: Path) -> bool:
    """After a temporary API started on a new database in ``home``: keep it as this
    version's template (once). True when a template was written."""
    db = _default_db(home)
    template = template_path()
    if db is None or not db.is_file() or template.exists():
        return False
    try:
        copy_db(db, template)
    except (OSError, sqlite3.Error):
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.prefect_home seed|remember PREFECT_HOME`` (infra/local/up.sh)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("seed", "remember"):
        print("usage: python -m flows.prefect_home seed|remember PREFECT_HOME", file=sys.stderr)
        return 2
    done = (seed if args[0] == "seed" else remember)(Path(args[1]))
    print(f"{args[0]}: {'done' if done else 'nothing to do'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
