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


def test_project_dir_wins_over_fcn_data_dir_for_every_command_with_local_state(
        tmp_path, monkeypatch, capsys):
    """`fcn models --project-dir B` reads B's MLflow store although FCN_DATA_DIR names A (the
    pipeline commands kept A's for MLflow and put Prefect's database in B), and the commands
    that keep local state all take the flag."""
    import os

    from flows.cli import build_parser, main
    from flows.cli.pipeline import prefect_env

    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("FCN_DATA_DIR", str(a))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["models", "--project-dir", str(b)]) == 0
    assert capsys.readouterr().out.strip() == "no registered models"
    assert (b / "mlflow" / "mlflow.db").exists() and not a.exists()
    assert os.environ["FCN_DATA_DIR"] == str(b.resolve())

    # A server in PREFECT_API_URL (no local home to seed); prefect_env checks that it answers:
    # an HTTP server that answers every GET with 501 does.
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    server = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("FCN_DATA_DIR", str(a))
        monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{server.server_port}/api")
        prefect_env(b)  # `fcn run|deploy|demo|experiment --project-dir B`
    finally:
        server.shutdown()
        server.server_close()
    assert os.environ["FCN_DATA_DIR"] == str(b.resolve())

    parser = build_parser()
    for argv in (["train", "--config", "c", "--data", "d"], ["evaluate", "--model", "m",
                 "--data", "d"], ["register", "--checkpoint", "c", "--data", "d"],
                 ["models"], ["predict", "--model", "m", "--out", "o", "x.png"],
                 ["run", "--config", "c", "--dataset", "voc", "--root", "r"], ["demo"],
                 ["experiment", "e.yaml"]):
        assert parser.parse_args([*argv, "--project-dir", "p"]).project_dir == "p", argv
