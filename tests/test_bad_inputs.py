"""Bad command lines, roots, locations, configs, model URIs and servers: each gets one line
naming the thing and the fix, exit 2; a bug gets its traceback and exit 1.

Each case is a row of the README's bad-input table (``test_readme_lists_every_case`` keeps
the two in step). Commands run in-process (``flows.cli.main``) so the table costs seconds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect.logging.configuration import ensure_logging_setup

from flows.cli import main
from pipelines.ingest import IngestConfig, ingest
from pipelines.sources import synthetic as synth

ROOT = Path(__file__).resolve().parents[1]
# Prefect binds its console log handler to the sys.stderr of the moment it configures logging.
# Do that now, at collection, not inside a case's capsys capture: a later test's Prefect logs
# would go to that capture's stream after it is closed ("I/O operation on closed file").
ensure_logging_setup()
pytestmark = pytest.mark.usefixtures("ray_local")


VOC_CONFIG = "name: v\ndataset: voc\nwidth: 0.0625\nstages:\n  - {name: 32s, steps: 2, lr: 0.001}\n"


@dataclass(frozen=True)
class Case:
    id: str  # the README row's first column
    argv: Callable[[dict[str, Path]], list[str]]
    message: str  # a regular expression the one stderr line must match
    code: int = 2
    env: tuple[tuple[str, str], ...] = ()


def _port() -> str:
    from servers import free_ports

    return str(free_ports(1)[0])


CASES = [
    Case("no command", lambda p: [], r"^usage: fcn \[-h\] COMMAND"),
    Case("unknown command", lambda p: ["fit"], r"invalid choice: 'fit'"),
    Case("an option the command does not have",
         lambda p: ["train", "--config", "c", "--data", "d", "--epochs", "3"],
         r"^fcn train: error: unrecognized arguments: --epochs 3$"),
    Case("unknown dataset name", lambda p: ["ingest", "coco", "--root", "x", "--out", "y"],
         r"argument dataset: invalid choice: 'coco'"),
    Case("--width 0 (describe)", lambda p: ["describe", "--width", "0"], r"must be > 0, got 0"),
    Case("--width 0.5 for a net without a multiplier",
         lambda p: ["describe", "--variant", "deeplabv3_resnet50", "--width", "0.5"],
         r"has no width multiplier: width must be 1\.0, got width=0\.5"),
    Case("--size 10xfoo", lambda p: ["describe", "--size", "10xfoo"],
         r"expected HxW with positive integers, got '10xfoo'"),
    Case("--shard-rows 0", lambda p: ["ingest", "voc", "--root", "x", "--out", "y",
                                      "--shard-rows", "0"], r"must be >= 1, got 0"),
    Case("--workers two", lambda p: ["train", "--config", "c", "--data", "d", "--workers",
                                     "two"], r"expected a whole number, got 'two'"),
    Case("--scales a,b", lambda p: ["evaluate", "--model", "m", "--data", "d", "--scales",
                                    "a,b"], r"expected comma-separated numbers"),
    Case("--window -5", lambda p: ["evaluate", "--model", "m", "--data", "d", "--window", "-5"],
         r"must be >= 1, got -5"),
    Case("--cron that is not a schedule",
         lambda p: ["deploy", "--cron", "every day", "--config", str(ROOT / "configs/demo.yaml"),
                    "--dataset", "synthetic", "--root", str(p["tmp"] / "raw"),
                    "--project-dir", str(p["tmp"] / "proj")],
         r"--cron 'every day' is not a cron schedule"),
    Case("ingest root that does not exist",
         lambda p: ["ingest", "voc", "--root", str(p["tmp"] / "nowhere"), "--out",
                    str(p["tmp"] / "o")], r"nowhere"),
    Case("ingest root of another layout (SBD tree given as VOC)",
         lambda p: ["ingest", "voc", "--root", str(p["sbd"]), "--out", str(p["tmp"] / "o")],
         r"(?i)voc"),
    Case("location with an unknown scheme",
         lambda p: ["ingest", "voc", "--root", "ftp://host/voc", "--out", str(p["tmp"] / "o")],
         r"ftp://host/voc"),
    Case("--out that is a file",
         lambda p: ["ingest", "voc", "--root", str(p["voc"]), "--out", str(p["file"])],
         r"cannot write to .*a_file: .*a_file is a file, not a folder"),
    Case("--split-file that does not exist",
         lambda p: ["ingest", "voc", "--root", str(p["voc"]), "--out", str(p["tmp"] / "o"),
                    "--split-file", str(p["tmp"] / "missing.txt")], r"missing\.txt"),
    Case("config file that does not exist",
         lambda p: ["train", "--config", str(p["tmp"] / "nope.yaml"), "--data", str(p["data"])],
         r"nope\.yaml"),
    Case("--data that is not an ingested dataset",
         lambda p: ["train", "--config", str(ROOT / "configs/demo.yaml"), "--data",
                    str(p["tmp"])], r"manifest"),
    Case("--stages naming a stage the config lacks",
         lambda p: ["train", "--config", str(ROOT / "configs/demo.yaml"), "--data",
                    str(p["data"]), "--stages", "4s"], r"4s"),
    Case("evaluate on a split the dataset lacks",
         lambda p: ["evaluate", "--model", str(p["tmp"] / "ckpt"), "--data", str(p["data"]),
                    "--split", "nosuch"], r"split 'nosuch' is not in .* \(splits: train, val\)"),
    Case("model checkpoint that does not exist",
         lambda p: ["evaluate", "--model", str(p["tmp"] / "ckpt"), "--data", str(p["data"])],
         r"ckpt"),
    Case("model URI with a registered name that does not exist",
         lambda p: ["evaluate", "--model", "models:/no-such-model@champion", "--data",
                    str(p["data"])], r"no-such-model"),
    Case("fcn models NAME that is not registered", lambda p: ["models", "no-such-model"],
         r"no registered model named 'no-such-model'"),
    Case("register a checkpoint that does not exist",
         lambda p: ["register", "--checkpoint", str(p["tmp"] / "ckpt"), "--data",
                    str(p["data"])], r"ckpt"),
    Case("--metrics-from-run with an unknown run id",
         lambda p: ["register", "--checkpoint", str(p["tmp"] / "ckpt"), "--data",
                    str(p["data"]), "--metrics-from-run", "0" * 32],
         r"--metrics-from-run 0{32}: no such MLflow run"),
    Case("MLflow server that does not answer", lambda p: ["models"],
         r"MLflow tracking server at MLFLOW_TRACKING_URI=http://127\.0\.0\.1:\d+ does not "
         r"answer", env=(("MLFLOW_TRACKING_URI", "http://127.0.0.1:{port}"),)),
    Case("experiment row with a misspelt config key",
         lambda p: ["experiment", str(p["tmp"] / "exp.yaml")],
         r"rows\[1\] \(FCN-16s\): unknown key 'widht' \(did you mean 'width'\?\)"),
    Case("fcn run --dataset voc with a config for another dataset",
         lambda p: ["run", "--config", str(ROOT / "configs/demo.yaml"), "--dataset", "voc",
                    "--root", str(p["voc"]), "--project-dir", str(p["tmp"] / "proj")],
         r"config 'demo' is for dataset 'synthetic' but the run ingests 'voc'"),
    Case("fcn run with a --root that does not exist",
         lambda p: ["run", "--config", str(p["voc.yaml"]), "--dataset", "voc", "--root",
                    str(p["tmp"] / "nowhere"), "--project-dir", str(p["tmp"] / "proj")],
         r"no VOC layout under .*nowhere: the folder does not exist$"),
    Case("fcn run with a --root of another layout (SBD tree given as VOC)",
         lambda p: ["run", "--config", str(p["voc.yaml"]), "--dataset", "voc", "--root",
                    str(p["sbd"]), "--project-dir", str(p["tmp"] / "proj")],
         r"no VOC layout under .*: expected JPEGImages/"),
    Case("fcn run with --sbd-root for a dataset that takes none",
         lambda p: ["run", "--config", str(p["voc.yaml"]), "--dataset", "voc", "--root",
                    str(p["voc"]), "--sbd-root", str(p["sbd"]),
                    "--project-dir", str(p["tmp"] / "proj")],
         r"--sbd-root is not used by voc$"),
    Case("fcn run pascal with an --sbd-root that is not SBD",
         lambda p: ["run", "--config", str(p["pascal.yaml"]), "--dataset", "pascal", "--root",
                    str(p["voc"]), "--sbd-root", str(p["voc"]),
                    "--project-dir", str(p["tmp"] / "proj")],
         r"no SBD layout under .*: expected "),
    Case("fcn experiment with a --root that does not exist",
         lambda p: ["experiment", str(p["voc-exp.yaml"]), "--root", str(p["tmp"] / "nowhere"),
                    "--project-dir", str(p["tmp"] / "proj")],
         r"no VOC layout under .*nowhere: the folder does not exist$"),
    Case("--project-dir that cannot be created",
         lambda p: ["models", "--project-dir", str(p["file"] / "proj")],
         r"cannot create .*a_file/proj/mlflow, the MLflow store of FCN_DATA_DIR \(or "
         r"--project-dir\): Not a directory; or set MLFLOW_TRACKING_URI$"),
    Case("--gpu where this machine's Ray has no GPU",
         lambda p: ["train", "--config", str(p["voc.yaml"]), "--data", str(p["data"]), "--gpu"],
         r"--gpu needs 2 GPU\(s\), one per training worker, and this machine's Ray has 0: "
         r"leave --gpu out, or set RAY_ADDRESS to a cluster with GPUs$"),
    Case("fcn run --gpu on a machine without one",
         lambda p: ["run", "--config", str(p["voc.yaml"]), "--dataset", "voc", "--root",
                    str(p["voc"]), "--gpu", "--project-dir", str(p["tmp"] / "proj")],
         r"--gpu needs 2 GPU\(s\), one per training worker, and this machine has 0 that torch "
         r"can use: leave --gpu out, or set RAY_ADDRESS to a cluster with GPUs$"),
    Case("Prefect server that does not answer",
         lambda p: ["run", "--config", str(ROOT / "configs/demo.yaml"), "--dataset", "synthetic",
                    "--root", str(p["tmp"] / "raw"), "--project-dir", str(p["tmp"] / "proj")],
         r"the Prefect server at PREFECT_API_URL=http://127\.0\.0\.1:\d+/api does not answer",
         env=(("PREFECT_API_URL", "http://127.0.0.1:{port}/api"),)),
    Case("fcn deploy without a Prefect server",
         lambda p: ["deploy", "--cron", "0 3 * * *", "--config", str(ROOT / "configs/demo.yaml"),
                    "--dataset", "synthetic", "--root", str(p["tmp"] / "raw"),
                    "--project-dir", str(p["tmp"] / "proj")],
         r"^fcn deploy: error: no PREFECT_API_URL: a deployment's runs are started by a "
         r"Prefect server's scheduler", env=(("PREFECT_API_URL", ""),)),
    Case("fcn run on Ray Jobs with a local --root",
         lambda p: ["run", "--config", str(ROOT / "configs/demo.yaml"), "--dataset", "synthetic",
                    "--root", str(p["voc"]), "--project-dir", str(p["tmp"] / "proj")],
         r"give --root as a URI they reach", env=(("RAY_ADDRESS", "http://127.0.0.1:{port}"),)),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    voc = synth.write_voc(tmp / "raw", n_train=2, n_val=2, size=(32, 32))
    sbd = synth.write_sbd(tmp / "raw", n_train=2, n_val=2, size=(32, 32))
    data = ingest(IngestConfig(dataset="voc", root=voc, out=tmp / "shards"),
                  log=lambda m: None).dataset_dir
    (tmp / "a_file").write_text("not a folder")
    (tmp / "voc.yaml").write_text(VOC_CONFIG)
    (tmp / "pascal.yaml").write_text(VOC_CONFIG.replace("dataset: voc", "dataset: pascal"))
    (tmp / "voc-exp.yaml").write_text(f"name: v\nbase: {tmp / 'voc.yaml'}\nrows:\n"
                                      "  - {label: FCN-32s}\n")
    (tmp / "exp.yaml").write_text(f"name: e\nbase: {ROOT / 'configs/demo.yaml'}\nrows:\n"
                                  "  - {label: FCN-32s}\n  - {label: FCN-16s, set: {widht: 1}}\n")
    return {"tmp": tmp, "voc": voc, "sbd": sbd, "data": Path(data), "file": tmp / "a_file",
            **{name: tmp / name for name in ("voc.yaml", "pascal.yaml", "voc-exp.yaml")}}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, places, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FCN_DATA_DIR", str(tmp_path / "project"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = _port()
    for k, v in case.env:
        monkeypatch.setenv(k, v.format(port=port))
    monkeypatch.chdir(tmp_path)
    try:
        code = main(case.argv(places))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == case.code, err
    assert "Traceback" not in err, err
    # `fcn` alone prints its help (the commands) on stdout, nothing on stderr.
    last = err.splitlines()[-1] if err else captured.out.splitlines()[0]
    where = "" if err else " and the commands, on stdout"
    assert re.search(case.message, last), last
    if case.id != "no command" and not last.startswith("usage:"):
        assert last.startswith("fcn"), last
    assert not (tmp_path / "mlflow.db").exists()  # nothing stray in the working folder
    # found before anything starts (a mistake found in the flow: the test below)
    assert "starting Prefect's temporary API" not in captured.out, captured.out
    # The README shows what the user really gets (temporary folders as "…", ports as PORT).
    shown = (last.replace(str(tmp_path), "…").replace(str(places["tmp"]), "…")
             .replace(port, "PORT").replace("|", "\\|"))
    row = f"`{shown}`{where} (exit {case.code})"
    assert readme_row(case.id) == row, (
        f"README row for {case.id!r} should read: | {case.id} | {row} |")


def readme_row(case_id: str) -> str:
    prefix = f"| {case_id} | "
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].removesuffix(" |")
    return ""


def test_a_bug_shows_its_traceback_and_exit_1(monkeypatch, capsys, tmp_path):
    """A ValueError from inside (a shape bug, say) is not a user's mistake."""
    from flows.cli import nets

    def broken(args):
        raise ValueError("shapes (3, 4) and (5,) do not match")

    monkeypatch.setattr(nets, "cmd_describe", broken)
    code = main(["describe"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "shapes (3, 4)" in err
    assert err.strip().splitlines()[-1] == (
        "fcn describe: this is a bug in fcn, not a problem with your input: please report it "
        "with the command line and the traceback above")


def test_prefect_logs_a_mistake_without_its_tracebacks_and_a_bug_with_them(monkeypatch):
    """The filter `fcn run/demo/deploy/experiment` put on Prefect's run loggers: a record
    carrying a UserError (or a failed job or stage) is dropped, any other exception's stays,
    and -v (FCN_VERBOSE) keeps them all."""
    import logging
    import sys

    from flows.cli.errors import quiet_prefect_tracebacks
    from pipelines.errors import UsageError

    quiet_prefect_tracebacks()
    quiet_prefect_tracebacks()  # once is enough
    logger = logging.getLogger("prefect.flow_runs")
    (one,) = [f for f in logger.filters if type(f).__name__ == "_OneLineFailures"]

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            return logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "Encountered "
                                     "exception during execution", None, sys.exc_info())

    monkeypatch.delenv("FCN_VERBOSE", raising=False)
    assert not one.filter(record(UsageError("no VOC layout under /x")))
    assert one.filter(record(ValueError("a bug")))
    assert one.filter(logger.makeRecord(logger.name, logging.INFO, __file__, 1, "Finished in "
                                        "state Failed('…')", None, None))
    monkeypatch.setenv("FCN_VERBOSE", "1")
    assert one.filter(record(UsageError("no VOC layout under /x")))


def test_fcn_run_with_a_mistake_found_in_the_flow_is_one_line_not_prefects_tracebacks(
        tmp_path, ray_address):
    """A VOC layout without its split lists passes the check before Prefect starts (its
    folders are there) and is found inside the flow (the ingest task and its cache key):
    Prefect logged its traceback three times, 221 lines on stderr before the command's own.
    (The command joins the session's Ray, as it would a cluster's.)"""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "voc.yaml"
    cfg.write_text(VOC_CONFIG)
    root = tmp_path / "voc"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["RAY_ADDRESS"] = ray_address
    r = subprocess.run([str(Path(sys.executable).parent / "fcn"), "run", "--config", str(cfg),
                        "--dataset", "voc", "--root", str(root),
                        "--project-dir", str(tmp_path / "p")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert "starting Prefect's temporary API" in r.stdout, r.stdout  # found in the flow
    assert r.stderr.strip().splitlines()[-1] == (
        f"fcn run: error: no split files (*.txt) in {root / 'ImageSets/Segmentation'}: the "
        "layout lists each split's ids there (e.g. train.txt, val.txt); add them, or name a "
        "list with fcn ingest --split-file")
    assert len(r.stderr.splitlines()) <= 8, r.stderr


def test_a_prefect_folder_that_cannot_be_created_is_one_line_naming_where_it_came_from(
        tmp_path, monkeypatch):
    from flows.cli.pipeline import prefect_env
    from pipelines.errors import UsageError

    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.setenv("FCN_DATA_DIR", str(tmp_path / "before"))
    with pytest.raises(UsageError) as info:
        prefect_env(tmp_path / "a_file" / "proj")
    assert str(info.value) == (f"cannot create {tmp_path}/a_file/proj/prefect, the Prefect "
                               "folder of --project-dir (or FCN_DATA_DIR): Not a directory")
    assert os.environ["FCN_DATA_DIR"] == str(tmp_path / "before")  # nothing half-set
    assert "PREFECT_HOME" not in os.environ
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "a_file" / "ph"))
    with pytest.raises(UsageError, match=r"cannot create .*/a_file/ph, the Prefect folder of "
                                         r"PREFECT_HOME: Not a directory$"):
        prefect_env(tmp_path / "proj")


def test_too_few_gpus_fail_on_a_local_ray_and_are_awaited_on_a_cluster(monkeypatch):
    """A local Ray cannot grow: one line now. A cluster's autoscaler may add GPU nodes when
    asked (the KubeRay GPU worker group starts at 0): a line to show, and Ray waits."""
    from pipelines.errors import UsageError
    from pipelines.ray_env import check_gpus

    assert check_gpus(0, "actor", "lower --actors") is None
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UsageError, match=r"^--gpu needs 3 GPU\(s\), one per actor, and this "
                                         r"machine's Ray has 0: leave --gpu out, or set "):
        check_gpus(3, "actor", "lower --actors")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what a Ray job's driver sees
    assert check_gpus(1, "training worker", "lower workers") == (
        "--gpu needs 1 GPU(s), one per training worker, and the cluster has 0 now: waiting "
        "for its autoscaler to add GPU nodes (Ray waits until they come)")


def test_readme_lists_every_case():
    readme = (ROOT / "README.md").read_text()
    missing = [c.id for c in CASES if f"| {c.id} |" not in readme]
    assert not missing, missing


def test_the_console_script_ends_like_python_without_its_teardown(tmp_path):
    """``fcn`` (``flows.cli.entry``) exits with main's code once threads have finished and
    every exit handler has run, in Python's order (the last registered first), and then
    skips only the teardown of the loaded modules."""
    import subprocess
    import sys

    done = tmp_path / "done.txt"
    code = f"""
import atexit, concurrent.futures, threading, time
import flows.cli as cli
out = open({str(done)!r}, "a")
def last():
    out.write("first registered, last run\\n")
    out.close()
atexit.register(last)
atexit.register(lambda: out.write("handler\\n"))
def slow():
    time.sleep(0.5)
    out.write("thread\\n")
pool = concurrent.futures.ThreadPoolExecutor(1)
pool.submit(slow)
class Teardown:
    def __del__(self):
        print("module teardown ran", flush=True)
keep = Teardown()
def fake_main():
    print("main", flush=True)
    return 3
cli.main = fake_main
cli.entry()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 3, r.stderr
    assert r.stdout == "main\n", r.stdout  # no teardown: the module's objects are not freed
    assert done.read_text().splitlines() == ["thread", "handler",
                                             "first registered, last run"]


def test_a_cached_demo_starts_no_training_processes_ahead(tmp_path):
    """`fcn demo` starts Ray Train's processes ahead only when it will train: a fresh
    project, or --force; a second demo finds ingest and stages cached."""
    from flows.cli.pipeline import demo_trains

    assert demo_trains(tmp_path, force=False)
    (tmp_path / "shards" / "synthetic").mkdir(parents=True)
    assert not demo_trains(tmp_path, force=False)
    assert demo_trains(tmp_path, force=True)
