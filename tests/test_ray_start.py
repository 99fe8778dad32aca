"""A local Ray that Ray gave up on during its start (its raylet did not register within Ray's
hard-coded 30 s, seen on a loaded 2-core machine) is started once more, after the first
try's processes are stopped (pipelines.ray_env.init_local_ray). ``ray.init`` is replaced by a
stand-in that starts real processes and fails as Ray does: the real start is every other
engine test's."""

import os
import subprocess
import sys

import pytest
import ray

from pipelines import ray_env

SLEEP = "import time; time.sleep(120)"


def _alive(p: subprocess.Popen) -> bool:
    return p.poll() is None


@pytest.fixture
def started():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if _alive(p):
            p.kill()
        p.wait()


def _fake_init(started, failures: list[Exception]):
    calls = []
    package = os.path.dirname(ray.__file__)

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) <= len(failures):
            # what a failed start leaves behind: Ray's own programs (their command lines name
            # the ray package's folder) and, here, one process of someone else's
            started.append(subprocess.Popen([sys.executable, "-c", SLEEP,
                                             f"{package}/core/src/ray/raylet/raylet"]))
            started.append(subprocess.Popen([sys.executable, "-c", SLEEP, "not-ray"]))
            raise failures[len(calls) - 1]
        return "context"
    return init, calls


def test_a_local_ray_that_timed_out_is_started_once_more(started, monkeypatch, capsys):
    timeout = Exception(f"{ray_env.NODE_START_TIMEOUT}. This could happen because ...")
    init, calls = _fake_init(started, [timeout])
    monkeypatch.setattr(ray, "init", init)
    assert ray_env.init_local_ray(address="local", num_cpus=2) == "context"
    assert calls == [{"address": "local", "num_cpus": 2}] * 2
    ray_like, other = started
    assert not _alive(ray_like) and _alive(other)  # only the first try's Ray processes
    assert "starting it once more (1 process(es) of the first try stopped)" in \
        capsys.readouterr().out


def test_other_failures_and_a_second_timeout_are_raised_as_ray_raised_them(started,
                                                                           monkeypatch):
    timeout = Exception(f"{ray_env.NODE_START_TIMEOUT}. This could happen because ...")
    init, calls = _fake_init(started, [timeout, timeout])
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(Exception, match=ray_env.NODE_START_TIMEOUT):
        ray_env.init_local_ray(address="local")
    assert len(calls) == 2

    other = RuntimeError("Failed to start the dashboard")
    init, calls = _fake_init(started, [other])
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(RuntimeError, match="dashboard"):
        ray_env.init_local_ray(address="local")
    assert len(calls) == 1
