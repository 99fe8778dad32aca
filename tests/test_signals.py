"""Signals a command gets from its terminal: Ctrl-C (SIGINT to the whole foreground process
group) and a hangup (the terminal closed)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _default_sigint() -> None:
    """As in a terminal's foreground: pytest-xdist's workers ignore SIGINT, and their
    children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow  # a Prefect server (~10 s)
def test_prefects_temporary_server_outlives_a_ctrl_c_of_the_command_that_started_it(
        tmp_path):
    """`fcn run`/`fcn demo` start Prefect's temporary API. Ctrl-C reaches every process of
    the terminal's group: the server died with the command's KeyboardInterrupt, and Prefect
    then retried the crashed runs' states for minutes (217 s to exit, then a traceback).
    Here a Ctrl-C to the command's group leaves the server answering, a flow still runs on
    it, and the command's exit handler stops it."""
    code = textwrap.dedent("""
        import json, os, signal, time
        import httpx
        from flows.prefect_home import seed
        from flows.cli.pipeline import prefect_api_server
        from pathlib import Path
        seed(Path(os.environ["PREFECT_HOME"]))
        server = prefect_api_server()
        server.start(timeout=120)
        try:
            os.killpg(0, signal.SIGINT)  # what a terminal's Ctrl-C does to this group
            time.sleep(5)
        except KeyboardInterrupt:
            pass
        time.sleep(1)  # a server that got it would be shutting down now
        from prefect import flow
        from prefect.settings import PREFECT_API_URL, temporary_settings

        @flow
        def still_there():
            return 42

        with temporary_settings({PREFECT_API_URL: server.api_url}):
            answer = still_there()
        health = httpx.get(server.api_url + "/health", timeout=10).status_code
        print(json.dumps({"pid": server.server_process.pid, "health": health,
                          "answer": answer}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240, start_new_session=True,
                       preexec_fn=_default_sigint)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["health"] == 200 and out["answer"] == 42, out
    deadline = time.monotonic() + 10  # stopped by the exit handler, as Prefect stops it
    while os.path.exists(f"/proc/{out['pid']}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{out['pid']}"), "the server outlived its command"
    # ... quietly: Prefect's "Stopping temporary server" came after the command's last line.
    assert "| INFO    | Flow run" in r.stderr, r.stderr[-3000:]  # Prefect's INFO lines show
    assert "Stopping temporary server" not in r.stderr, r.stderr[-3000:]


ENTRY = textwrap.dedent("""
    import sys, time
    import flows.cli as cli

    def main():  # a command that works for a while
        try:
            print("working", flush=True)
            time.sleep(30)
            return 0
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            return 130

    cli.main = main
    cli.entry()
""")


@pytest.mark.parametrize("nohup", [False, True])
def test_a_hangup_ends_a_command_as_ctrl_c_does_unless_it_is_ignored(nohup):
    """The terminal closed (SIGHUP): the command's cleanup runs as for Ctrl-C (it would
    otherwise die at once, and Prefect's temporary server, in a session of its own, would
    outlive it); under nohup (SIGHUP ignored) it goes on."""
    def hangup_as_in_a_terminal() -> None:  # whatever the test run's own (under nohup: ignored)
        signal.signal(signal.SIGHUP, signal.SIG_IGN if nohup else signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-c", ENTRY], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, preexec_fn=hangup_as_in_a_terminal)
    try:
        assert proc.stdout.readline().strip() == "working"
        proc.send_signal(signal.SIGHUP)
        if nohup:
            time.sleep(1.0)
            assert proc.poll() is None
            return
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 130 and out.strip() == "interrupted", (proc.returncode, out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
