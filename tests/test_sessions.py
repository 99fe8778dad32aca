"""`make test`'s two pytest sessions: the tests with engines of their own in one, the rest in
the other (tests/conftest.py). xdist's own loadgroup silently stopped splitting them under
pytest 9; this runs a real two-worker session and reads which worker ran what."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two pytest workers (~15 s)
def test_the_tests_with_engines_of_their_own_run_in_one_session_the_rest_in_the_other():
    own = "tests/test_servers.py::test_start_failure_reports_log_tail_and_stops"
    r = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v",
                        "-p", "no:cacheprovider", "tests/test_context.py", own],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    ran = {nodeid: worker for worker, nodeid in
           re.findall(r"^\[(gw\d)\] \[\s*\d+%\] PASSED (\S+)", r.stdout, re.M)}
    shared = {w for nodeid, w in ran.items() if nodeid.startswith("tests/test_context.py")}
    assert len(ran) >= 8 and own in ran, r.stdout[-3000:]
    assert len(shared) == 1 and ran[own] not in shared, ran
