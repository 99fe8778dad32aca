"""The reference split and class lists shipped with the project (see README.md here for where
they come from): ``ids("pascal", "seg11valid")``, ``classes("pascal-context", "classes-59")``."""

from __future__ import annotations

from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent


def path(protocol: str, name: str) -> Path:
    """The shipped file ``<protocol>/<name>.txt``."""
    p = HERE / protocol / f"{name}.txt"
    if not p.is_file():
        raise FileNotFoundError(f"no reference list {protocol}/{name}.txt in {HERE}")
    return p


@cache
def ids(protocol: str, name: str) -> tuple[str, ...]:
    """The ids of a reference split list, in file order (blank lines skipped)."""
    text = path(protocol, name).read_text(encoding="utf-8")
    return tuple(ln.strip() for ln in text.splitlines() if ln.strip())


@cache
def numbered_classes(protocol: str, name: str) -> tuple[str, ...]:
    """Class names of a numbered list ("0: background", "1: aeroplane", ...) in number order."""
    out: dict[int, str] = {}
    for ln in path(protocol, name).read_text(encoding="utf-8").splitlines():
        if ":" in ln and ln.split(":", 1)[0].strip().isdigit():
            k, v = ln.split(":", 1)
            out[int(k)] = v.strip()
    assert sorted(out) == list(range(len(out))), f"{protocol}/{name}: numbers not 0..n-1"
    return tuple(out[k] for k in range(len(out)))
