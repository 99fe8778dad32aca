"""`make test`'s three pytest sessions, one per group of tests (tests/conftest.py's
SESSION_GROUPS). xdist's own loadgroup silently stopped splitting them under pytest 9; this
runs a real three-worker session and reads which worker ran what."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED, session_group

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # three pytest workers (~20 s)
def test_each_group_of_tests_runs_in_a_session_of_its_own():
    cluster = "tests/test_servers.py::test_start_failure_reports_log_tail_and_stops"
    training = ["tests/test_train_details.py::test_summed_loss_is_divided_by_the_batch_size_as_"
                "caffe_does", "tests/test_train_details.py::test_atonce_from_scratch_keeps_"
                "deconvolutions_fixed"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-n", "3", "--dist", "loadgroup", "-v",
                        "-p", "no:cacheprovider", "tests/test_context.py", cluster, *training],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    ran = {nodeid: worker for worker, nodeid in
           re.findall(r"^\[(gw\d)\] \[\s*\d+%\] PASSED (\S+)", r.stdout, re.M)}
    assert len(ran) >= 10 and cluster in ran and set(training) <= set(ran), r.stdout[-3000:]
    workers: dict[str, set[str]] = {}
    for nodeid, worker in ran.items():
        workers.setdefault(session_group(nodeid), set()).add(worker)
    assert sorted(workers) == sorted(["cluster", "own-engines", SHARED]), workers
    assert all(len(w) == 1 for w in workers.values()), workers
    assert len(set().union(*workers.values())) == 3, workers
