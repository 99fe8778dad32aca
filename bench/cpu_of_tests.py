"""Where `make test`'s CPU goes: each test's CPU seconds, with every process it started.

    .venv/bin/python bench/cpu_of_tests.py          # the whole suite, as make test runs it
    .venv/bin/python bench/cpu_of_tests.py --top 15 -- tests/test_flows.py -n 0

On 2 cores the three pytest sessions keep both cores busy, so the suite's wall time follows
its CPU time: a test that waits costs little, a test that starts processes costs a lot.
Timing a test tells neither apart; this does. It runs pytest (``make test``'s arguments unless
others follow ``--``) with this file as a plugin that notes when each test starts and ends,
and samples every process's CPU time (/proc, every 0.5 s). A process's CPU goes to the pytest
session (xdist worker) it descends from, and to the test that session ran then: Ray workers,
servers and subprocesses a test started count for it. Prints each session's CPU and wall
time, the tests by CPU (with their wall time and the kinds of process that used it), and the
whole run's CPU by kind of process. Linux only. CPU of processes that lived less than one
sample is missed, and processes that daemonize (leave their parent) count as unattributed.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLOCK_ENV = "FCN_TEST_CPU_CLOCK"  # the plugin writes test starts/ends there when set
MAKE_TEST_ARGS = ["-n", "3", "--dist", "loadgroup"]  # as the Makefile's test target
TICK = os.sysconf("SC_CLK_TCK")


# --- the pytest plugin side (loaded in each session with -p cpu_of_tests) -----------------

_NOTING = {"on": True}


def pytest_configure(config):
    """Note tests where they run: in xdist's workers, not in its controller (which gets every
    worker's reports, and so these hooks too), or in the one session without xdist."""
    workers = getattr(config.option, "numprocesses", None)
    _NOTING["on"] = not workers or hasattr(config, "workerinput")  # xdist's mark of a worker


def _note(event: str, nodeid: str) -> None:
    path = os.environ.get(CLOCK_ENV)
    if path and _NOTING["on"]:
        with open(path, "a") as f:
            f.write(json.dumps([event, nodeid, time.time(), os.getpid()]) + "\n")


def pytest_runtest_logstart(nodeid, location):  # noqa: ARG001 (pytest's hook signature)
    _note("start", nodeid)


def pytest_runtest_logfinish(nodeid, location):  # noqa: ARG001
    _note("end", nodeid)


# --- sampling ---------------------------------------------------------------------------

def kind(cmdline: str) -> str:
    """A short name for a process's kind, from its command line."""
    if cmdline.startswith("ray::"):
        return cmdline.split()[0].split(".")[0] if cmdline.split() else "ray::"
    if cmdline.startswith("ray-dashboard-"):
        return "ray dashboard module"
    for key, name in (("raylet/raylet", "ray raylet"), ("gcs_server", "ray gcs_server"),
                      ("dashboard/dashboard.py", "ray dashboard"),
                      ("multiprocessing.forkserver", "ray dashboard forkserver"),
                      ("log_monitor.py", "ray log_monitor"), ("autoscaler/_private/monitor",
                                                                "ray monitor"),
                      ("default_worker.py", "ray worker (starting)"),
                      ("import sys;exec(eval(sys.stdin", "pytest session"),
                      ("bin/fcn ", "fcn"), ("flows.cli", "fcn"), ("mlflow server", "mlflow"),
                      ("uvicorn", "uvicorn (mlflow/prefect)"), ("prefect", "prefect"),
                      ("bin/weed", "seaweedfs"), ("postgres", "postgres"), ("bench/", "bench")):
        if key in cmdline:
            return name
    words = cmdline.split()
    return Path(words[0]).name if words else "?"


def _read(pid: str) -> tuple[int, int, str] | None:
    """(parent pid, CPU ticks, start time) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2:].split()
    return int(rest[1]), int(rest[11]) + int(rest[12]), rest[19]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Every ``period`` s: each process's CPU since the last sample, attributed to the child
    of ``root`` it descends from. ``samples``: (time, session pid or None, kind, seconds)."""

    def __init__(self, root: int, period: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.period = root, period
        self.samples: list[tuple[float, int | None, str, float]] = []
        self.stop = threading.Event()
        with open("/proc/stat") as f:
            btime = int(next(ln for ln in f if ln.startswith("btime")).split()[1])
        self.started_ticks = (time.time() - btime) * TICK
        self._seen: dict[tuple[int, str], list] = {}  # (pid, start) -> [ticks, session, kind]

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.period)
        self.sample()

    def sample(self) -> None:
        now = time.time()
        procs = {int(p): r for p in os.listdir("/proc") if p.isdigit() and (r := _read(p))}
        sums: collections.Counter = collections.Counter()
        for pid, (_ppid, ticks, start) in procs.items():
            key = (pid, start)
            rec = self._seen.get(key)
            if rec is None:  # new to us: all its CPU if it started after us, else none
                rec = self._seen[key] = [0 if int(start) > self.started_ticks else ticks,
                                         self._session(pid, procs), kind(_cmdline(pid))]
            elif rec[2] in ("ray worker (starting)", "ray::IDLE"):  # Ray names it later
                rec[2] = kind(_cmdline(pid)) or rec[2]
            if ticks > rec[0]:
                sums[(rec[1], rec[2])] += (ticks - rec[0]) / TICK
                rec[0] = ticks
        self.samples += [(now, s, k, v) for (s, k), v in sums.items()]

    def _session(self, pid: int, procs: dict) -> int | None:
        """The child of ``root`` that ``pid`` descends from (``root`` itself without xdist)."""
        for _ in range(64):
            if pid == self.root:
                return pid
            if pid not in procs:
                return None
            ppid = procs[pid][0]
            if ppid == self.root:
                return pid
            parent = self._seen.get((ppid, procs[ppid][2])) if ppid in procs else None
            if parent is not None:
                return parent[1]
            if ppid <= 1:
                return None
            pid = ppid
        return None


# --- the report -------------------------------------------------------------------------

def report(samples: list, clock_lines: list[str], top: int, root: int | None = None) -> str:
    """The per-session, per-test and per-kind tables of a run (``root``: pytest's pid; when
    the tests ran in it, without xdist, all its processes are its session)."""
    spans: dict[int, list[tuple[float, float, str]]] = collections.defaultdict(list)
    begun: dict[tuple[int, str], float] = {}
    for line in clock_lines:
        event, nodeid, t, pid = json.loads(line)
        if event == "start":
            begun[(pid, nodeid)] = t
        elif (pid, nodeid) in begun:
            spans[pid].append((begun.pop((pid, nodeid)), t, nodeid))
    for v in spans.values():
        v.sort()
    starts = {pid: [s for s, _, _ in v] for pid, v in spans.items()}
    per_test: collections.Counter = collections.Counter()
    test_kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    per_session: collections.Counter = collections.Counter()
    per_kind: collections.Counter = collections.Counter()
    for t, session, what, sec in samples:
        if root in spans and session is not None:
            session = root
        per_kind[what] += sec
        if session not in spans:
            name = "(not under a pytest session)"
        else:
            per_session[session] += sec
            i = bisect.bisect_right(starts[session], t) - 1
            # a sample sees CPU used up to one period before it
            inside = i >= 0 and t <= spans[session][i][1] + 0.6
            name = spans[session][i][2] if inside else "(between tests: collection, fixtures)"
        per_test[name] += sec
        test_kinds[name][what] += sec
    wall = {n: e - s for v in spans.values() for s, e, n in v}
    total = sum(per_kind.values())
    out = [f"CPU {total:.0f} s in all; sessions (CPU s / wall s of their tests): " + ", ".join(
        f"{per_session[p]:.0f}/{sum(e - s for s, e, _ in spans[p]):.0f}" for p in sorted(spans))]
    out.append(f"\n{'CPU s':>7} {'wall s':>7}  test (kinds of process by CPU s)")
    for name, sec in per_test.most_common(top):
        kinds = ", ".join(f"{k} {v:.0f}" for k, v in test_kinds[name].most_common(4))
        out.append(f"{sec:7.1f} {wall.get(name, 0):7.1f}  {name}\n{'':17}{kinds}")
    out.append(f"\n{'CPU s':>7}  kind of process (whole run)")
    out += [f"{sec:7.1f}  {what}" for what, sec in per_kind.most_common(top) if sec >= 0.05]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=30, help="rows per table (default 30)")
    ap.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments "
                    f"(default: make test's, {' '.join(MAKE_TEST_ARGS)})")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="test-cpu-") as tmp:
        clock = Path(tmp) / "clock.jsonl"
        env = {**os.environ, CLOCK_ENV: str(clock),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "bench"),
                                                           os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "pytest", "-p", "cpu_of_tests", "-q",
               *(args.pytest_args or MAKE_TEST_ARGS)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        sampler = Sampler(proc.pid)
        sampler.start()
        code = proc.wait()
        sampler.stop.set()
        sampler.join()
        lines = clock.read_text().splitlines() if clock.exists() else []
    print(report(sampler.samples, lines, args.top, proc.pid))
    return code


if __name__ == "__main__":
    sys.exit(main())
