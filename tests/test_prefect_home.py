"""A new project's Prefect database seeded from the template of an earlier one (no engine: a
real SQLite database stands in for Prefect's; test_flows starts a real server from one)."""

import sqlite3
from pathlib import Path

import pytest

from flows import prefect_home


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    for var in prefect_home._URL_VARS + ("PREFECT_API_BLOCKS_REGISTER_ON_START",):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "cache"


def _database(path: Path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")  # as Prefect's server keeps it
        db.execute("CREATE TABLE alembic_version (version_num TEXT)")
        db.executemany("INSERT INTO alembic_version VALUES (?)", [(f"v{i}",) for i in range(rows)])
    db.close()


def _rows(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        rows = [r[0] for r in db.execute("SELECT version_num FROM alembic_version")]
    db.close()
    return rows


def test_the_first_database_becomes_the_template_and_seeds_new_homes_only(cache, tmp_path,
                                                                         monkeypatch):
    first = tmp_path / "first"
    assert not prefect_home.seed(first)  # no template yet: Prefect migrates as usual
    _database(first / "prefect.db", 3)
    assert prefect_home.remember(first)
    template = prefect_home.template_path()
    assert template.parent == cache and template.name.startswith("prefect-3.")
    assert not prefect_home.remember(first)  # once per Prefect version
    new = tmp_path / "new"
    assert prefect_home.seed(new) and _rows(new / "prefect.db") == ["v0", "v1", "v2"]
    import os

    assert os.environ["PREFECT_API_BLOCKS_REGISTER_ON_START"] == "false"
    _database(tmp_path / "mine" / "prefect.db", 1)
    assert not prefect_home.seed(tmp_path / "mine")  # an existing database is never touched
    assert _rows(tmp_path / "mine" / "prefect.db") == ["v0"]
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://db/p")
    assert not prefect_home.seed(tmp_path / "elsewhere")  # the database lives elsewhere
    assert not (tmp_path / "elsewhere" / "prefect.db").exists()


def test_a_broken_template_only_means_the_slow_start(cache, tmp_path):
    template = prefect_home.template_path()
    template.parent.mkdir(parents=True)
    template.write_bytes(b"not a database")
    assert not prefect_home.seed(tmp_path / "home")
    assert not list((tmp_path / "home").glob("*prefect.db*"))  # nothing half-written left


def test_the_module_command_seeds_and_remembers(cache, tmp_path, capsys):
    _database(tmp_path / "a" / "prefect.db", 2)
    assert prefect_home.main(["remember", str(tmp_path / "a")]) == 0
    assert prefect_home.main(["seed", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.splitlines() == ["remember: done", "seed: done"]
    assert prefect_home.main(["grow", "x"]) == 2
