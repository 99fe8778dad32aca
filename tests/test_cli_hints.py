"""The commands `fcn demo` suggests at its end work where the user is."""

import sys
from pathlib import Path

from flows.cli.pipeline import venv_bin


def test_the_suggested_programs_are_named_from_the_checkout_or_absolutely_elsewhere(tmp_path):
    venv = Path(sys.executable).parent
    checkout = venv.parent.parent if venv.parent.name == ".venv" else None
    if checkout is not None:  # `make demo` from the checkout: as the README writes them
        assert venv_bin(checkout) == ".venv/bin/"
    assert venv_bin(tmp_path) == f"{venv}/"  # from another folder: where they are
    assert Path(venv_bin(tmp_path), "fcn").exists()
