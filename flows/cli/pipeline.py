"""``fcn run``, ``fcn deploy``, ``fcn demo``: the whole pipeline as a Prefect flow.

These commands keep all local state (Prefect's database, MLflow's SQLite store, default shard
and checkpoint folders) in one project folder, ``--project-dir`` (default ``./data``, or
``FCN_DATA_DIR``). ``--data`` means one thing everywhere: an ingested dataset.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

from flows.cli.common import AMP_HELP, add_project_dir, add_verbose, positive_int, quiet_ray_logs
from pipelines.errors import UsageError


def prefect_env(project: Path) -> None:
    """Before Prefect is imported: keep its database in the project folder (so the Prefect
    UI can show the runs later) unless PREFECT_API_URL names a server."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
    # The temporary local API can take longer than Prefect's default to start on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if os.environ.get("PREFECT_API_URL"):
        check_prefect_server(os.environ["PREFECT_API_URL"])
    else:
        given = os.environ.get("PREFECT_HOME")
        home = Path(given or (project / "prefect").resolve())
        try:
            home.mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level
        except OSError as exc:
            where = "PREFECT_HOME" if given else "--project-dir (or FCN_DATA_DIR)"
            raise UsageError(f"cannot create {home}, the Prefect folder of {where}: "
                             f"{exc.strerror or exc}") from None
        os.environ["PREFECT_HOME"] = str(home)
        from flows.prefect_home import seed

        seed(home)  # a new project's database from a migrated copy: ~11 s sooner to start
    os.environ["FCN_DATA_DIR"] = str(project.resolve())  # --project-dir wins
    from flows.cli.errors import quiet_prefect_tracebacks

    quiet_prefect_tracebacks()


def check_prefect_server(url: str, timeout: float = 5.0) -> None:
    """A Prefect server that does not answer is one line, not Prefect's "Failed to reach
    API" traceback. Only a failed connection counts: a server that answers with an HTTP error
    (a locked SQLite database's 503, a cloud workspace's own paths) is left to Prefect."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    from pipelines.errors import ServiceUnavailable
    from pipelines.storage import redact

    parts = urlsplit(url)  # credentials in the URL are Prefect's business, not the probe's
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    try:
        with urllib.request.urlopen(f"{bare.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as e:
        cause = str(getattr(e, "reason", e))
    raise ServiceUnavailable(redact(
        f"the Prefect server at PREFECT_API_URL={url} does not answer ({cause}): start it "
        "(prefect server start, or infra/local/up.sh), or unset PREFECT_API_URL for "
        "Prefect's temporary local API"))


def venv_bin(cwd: Path | None = None) -> str:
    """How the commands the demo suggests name this environment's programs: ``.venv/bin/``
    from the checkout (as the README writes them), its absolute folder from anywhere else."""
    import sys

    here = Path(sys.executable).parent
    if (cwd or Path.cwd()).absolute() / ".venv" / "bin" == here.absolute():
        return ".venv/bin/"
    return f"{here}/"


def prefect_api_server() -> Any:
    """Prefect's temporary API server (``SubprocessASGIServer``, the one Prefect's flows
    find), started in a session of its own. A terminal's Ctrl-C signals its whole foreground
    process group: the server died with this process's KeyboardInterrupt, and Prefect then
    retried every state and log it sent for minutes (measured: 217 s to exit after
    `fcn demo`'s Ctrl-C, then a ConnectError traceback). This process stops it at exit, as
    Prefect does, and on a hangup (``flows.cli.entry``)."""
    import logging
    import subprocess
    import sys

    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class OwnSession(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect 3.8's command and environment, with start_new_session
            return subprocess.Popen(
                args=[sys.executable, "-m", "uvicorn", "--app-dir",
                      str(prefect.__module_path__.parent), "--factory",
                      "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                      "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                     "PREFECT__SERVER_FINAL": "1",
                     **get_current_settings().to_environment_variables(exclude_unset=True)},
                start_new_session=True)

        def stop(self) -> None:
            # Prefect says "Stopping temporary server on ..." at exit, after the command's
            # own last line (its summary, or "interrupted"); -v keeps it.
            logger = logging.getLogger("prefect")
            level = logger.level
            if not os.environ.get("FCN_VERBOSE"):
                logger.setLevel(logging.WARNING)
            try:
                super().stop()
            finally:
                logger.setLevel(level)

    return OwnSession()


def start_services(train_workers: int = 0, prefect: bool = True) -> None:
    """Start what the flow's first steps wait for, side by side: Prefect's temporary API
    (without PREFECT_API_URL; ~15 s on 2 cores, a subprocess) in a thread, while this thread
    starts the local Ray (or connects to RAY_ADDRESS's GCS) and opens the MLflow store
    (a fresh SQLite store runs its migrations). The flow then finds them ready. With Ray
    Jobs (a dashboard address) Ray is left to the jobs. ``train_workers``: the flow trains
    with that many Ray Train workers; a local Ray starts their processes now
    (``pipelines.prestart``), so that the first stage does not wait for them. ``prefect``:
    False for a command that runs no flow (``fcn train``).

    Ray is started in this (the main) thread: Ray ties its local processes to the thread
    that started them (they get SIGKILL when it ends), and a driver whose raylet and GCS
    died that way waits ~15 s for timeouts when it shuts down at exit."""
    import threading

    from pipelines.ray_env import address_kind

    failed: list[BaseException] = []
    thread = None
    kind = address_kind(os.environ.get("RAY_ADDRESS"))
    prefect = prefect and not os.environ.get("PREFECT_API_URL")
    parts = ["Prefect's temporary API"] if prefect else []
    parts += {"local": ["a local Ray"], "gcs": ["the Ray driver"]}.get(kind, [])
    print(f"starting {', '.join([*parts, 'the MLflow store'])} ...", flush=True)
    def in_thread(name: str, fn: Any) -> threading.Thread:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001  (raised below, in this thread)
                failed.append(e)

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        return t

    if prefect:
        # made here: its imports (sqlalchemy among them) in another thread while the MLflow
        # store's thread imports the same modules failed as a circular import
        thread = in_thread("prefect-api", prefect_api_server().start)

    def open_mlflow() -> None:  # a new SQLite store runs its migrations (~2.5 s)
        from mlflow.tracking import MlflowClient

        from pipelines.tracking import tracking_uri

        MlflowClient(tracking_uri()).search_experiments(max_results=1)

    store = in_thread("mlflow-store", open_mlflow)
    if kind in ("local", "gcs"):
        from pipelines.ray_env import init_ray

        init_ray()
        if train_workers:
            from pipelines.prestart import prestart_train_processes

            prestart_train_processes(train_workers)
    store.join()
    if thread is not None:
        thread.join()
    if failed:
        raise failed[0]
    if thread is not None and os.environ.get("PREFECT_HOME"):
        from flows.prefect_home import remember

        remember(Path(os.environ["PREFECT_HOME"]))  # the next new project starts from it


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config keys the command line sets over the preset's (what the flow's train step gets)."""
    out: dict[str, Any] = {}
    if getattr(args, "backbone_weights", None):
        from pipelines.storage import as_location

        out["backbone_weights"] = as_location(args.backbone_weights)
    if getattr(args, "gpu", False):
        out["use_gpu"] = True
    if getattr(args, "amp", None):
        out["amp"] = args.amp
    return out


def _pipeline_params(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.config import preset_path
    from pipelines.storage import as_location

    params: dict[str, Any] = {"dataset": args.dataset, "root": as_location(args.root),
                              "config": str(Path(preset_path(args.config)).resolve()),
                              "split": args.split, "force": args.force}
    for key in ("sbd_root", "context_root"):
        if getattr(args, key):
            params[key] = as_location(getattr(args, key))
    if args.protocol:
        params["protocol"] = args.protocol
    if args.allow_missing:
        params["allow_missing"] = True
    if args.compute_hha:
        params["compute_hha"] = True
    if getattr(args, "synthetic_size", None):
        params["synthetic_size"] = args.synthetic_size
    if args.out:
        params["out"] = as_location(args.out)
    if args.storage:
        params["storage"] = as_location(args.storage)
    if getattr(args, "evaluate", "every") == "final":
        params["evaluate_every_stage"] = False
    if args.name:
        params["model_name"] = args.name
    if _overrides(args):
        params["overrides"] = _overrides(args)
    return params


def _check_cluster_locations(args: argparse.Namespace) -> None:
    """With Ray Jobs the steps run on cluster nodes that share no disk with this machine:
    every location they read or write must be a URI they reach."""
    from pipelines.jobs import check_jobs_api, jobs_address
    from pipelines.storage import is_remote

    address = jobs_address()
    if not address:
        return
    extra = [(f"--{k.replace('_', '-')}", getattr(args, k)) for k in ("sbd_root", "context_root")
             if getattr(args, k)]
    for flag, value in (("--root", args.root), ("--out", args.out),
                        ("--storage", args.storage), *extra):
        if value is None or not is_remote(value):
            raise UsageError(f"RAY_ADDRESS={address} runs each step as a Ray job on the "
                             f"cluster, whose nodes cannot read this machine's disk: give "
                             f"{flag} as a URI they reach (e.g. s3://bucket/...), got "
                             f"{value or 'the local default'}")
    check_jobs_api(address)  # a dashboard that does not answer fails now, in one line


def check_sources(args: argparse.Namespace, dataset: str, layouts: bool = True) -> None:
    """A root without its layout (``layouts``), or a --*-root or --protocol the dataset does
    not take, fails here in one line: found by the flow's ingest task, it took ~15 s of
    starting Prefect and Ray and came under Prefect's own error lines. With Ray Jobs the
    cluster reads the roots (through its own endpoints), so only the options are checked."""
    from pipelines.ingest import IngestConfig
    from pipelines.ingest import check_sources as check
    from pipelines.jobs import jobs_address

    out = args.out or str(Path(args.project_dir) / "shards")
    cfg = IngestConfig(dataset=dataset, root=args.root, out=out, sbd_root=args.sbd_root,
                       context_root=args.context_root, protocol=args.protocol,
                       compute_hha=getattr(args, "compute_hha", False))
    check(cfg, layouts=layouts and not jobs_address())


def _preflight(args: argparse.Namespace) -> Any:
    """A bad config, a config for another dataset or missing weights fail here, in one line,
    before Prefect starts and the data is ingested."""
    from pipelines import preflight
    from pipelines.config import load_config

    cfg = load_config(args.config, **_overrides(args))
    preflight.check_dataset_name(cfg, args.dataset)
    preflight.check_start(cfg)
    preflight.check_local_gpus(cfg)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    prefect_env(Path(args.project_dir))
    quiet_ray_logs(args.verbose)
    cfg = _preflight(args)
    _check_cluster_locations(args)
    check_sources(args, args.dataset)
    start_services(cfg.workers)
    from flows.pipeline import fcn_pipeline

    summary = fcn_pipeline(**_pipeline_params(args))
    print_summary(summary)
    return 0


class SkippedRuns(logging.Filter):
    """Says what Prefect's runner means by "Aborted submission of flow run '…': Server returned
    a non-pending state 'CANCELLED'" under ``--when-running skip``: the run came due while the
    last one still went, and the deployment's limit cancelled it. (The runner proposes a run
    ~10 s before it is due, so one due just after the last run ends may be skipped too.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if str(record.msg).startswith("Aborted submission of flow run '%s': Server returned "
                                      "a non-pending") and args[1:2] == ("CANCELLED",):
            record.msg = ("skipped flow run '%s': it came due while the last run still went "
                          "(--when-running skip; queue runs it after)")
            record.args = args[:1]
        return True


def cmd_deploy(args: argparse.Namespace) -> int:
    prefect_env(Path(args.project_dir))
    from prefect.schedules import Cron

    from flows.pipeline import fcn_pipeline

    _preflight(args)
    try:
        Cron(args.cron)
    except ValueError as exc:
        raise UsageError(f"--cron {args.cron!r} is not a cron schedule: {exc}") from None
    _check_cluster_locations(args)
    # the options only: a scheduled run may read data that is written after the deployment
    check_sources(args, args.dataset, layouts=False)
    if not os.environ.get("PREFECT_API_URL"):
        raise UsageError("no PREFECT_API_URL: a deployment's runs are started by a Prefect "
                         "server's scheduler, which Prefect's temporary local API has not (no "
                         "run would ever start): start one (prefect server start, or "
                         "infra/local/up.sh) and set PREFECT_API_URL, e.g. "
                         "http://127.0.0.1:4200/api")
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    strategy = {"skip": ConcurrencyLimitStrategy.CANCEL_NEW,
                "queue": ConcurrencyLimitStrategy.ENQUEUE}[args.when_running]
    then = "skipped" if args.when_running == "skip" else "queued"
    proposer = logging.getLogger("prefect.runner.state_proposer")
    if args.when_running == "skip" and not any(isinstance(f, SkippedRuns)
                                                for f in proposer.filters):
        proposer.addFilter(SkippedRuns())
    print(f"serving deployment fcn-pipeline/{args.deployment} on cron {args.cron!r}, one run "
          f"at a time (a run due while one goes is {then}); Ctrl-C stops it (runs stay "
          "scheduled in the Prefect API)", flush=True)
    fcn_pipeline.serve(name=args.deployment, cron=args.cron, parameters=_pipeline_params(args),
                       global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=strategy))
    return 0


def print_summary(summary: dict[str, Any]) -> None:
    from pipelines.tracking import tracking_uri

    print("\nper-stage results on the validation split (whole images, reference metrics):")
    print(f"{'stage':<8}{'pixel acc':>11}{'mean acc':>10}{'mean IU':>9}{'f.w. IU':>9}")
    for ev in summary["evaluations"]:
        m = ev["metrics"]
        label = next((s["stage"] for s in summary["stages"] if s["checkpoint"] == ev["model"]),
                     ev["model"])
        print(f"FCN-{label:<4}{m['pixel_acc']:>11.3f}{m['mean_acc']:>10.3f}"
              f"{m['mean_iu']:>9.3f}{m['fw_iu']:>9.3f}")
    reg = summary["registration"]
    if reg.get("reused"):
        print(f"\n{reg['name']} version {reg['version']} was registered from this checkpoint "
              f"before: {reg['decision']}")
    else:
        print(f"\nregistered {reg['name']} version {reg['version']}: {reg['decision']}")
    print(f"look it up:   models:/{reg['name']}@champion   (or @candidate, or /"
          f"{reg['version']})")
    print(f"MLflow:       {tracking_uri()}")


def demo_trains(home: Path, force: bool) -> bool:
    """Whether this demo will train: a second one finds its ingest and stages cached, and
    Ray Train processes started for it would only slow it (+1.0 s on a 14.4 s cached demo,
    measured)."""
    return force or not (home / "shards" / "synthetic").is_dir()


def cmd_demo(args: argparse.Namespace) -> int:
    project = Path(args.project_dir)
    prefect_env(project)
    quiet_ray_logs(args.verbose)
    t0 = time.perf_counter()
    home = project.resolve()
    print(f"fcn demo: the whole pipeline through Prefect on a generated dataset, all state in "
          f"{home}/\n  ingest (128 images: in this process; Ray Data above 256) -> FCN-32s "
          "-> 16s -> 8s (Ray Train, 2 workers) -> evaluate -> register (MLflow)\n",
          flush=True)
    from pipelines.config import load_config, preset_path

    start_services(load_config(args.config).workers if demo_trains(home, args.force) else 0)
    from flows.pipeline import fcn_pipeline

    summary = fcn_pipeline(dataset="synthetic", root=str(home / "raw" / "synthetic"),
                           config=str(Path(preset_path(args.config)).resolve()),
                           out=str(home / "shards"), force=args.force)
    print_summary(summary)
    ious = [ev["metrics"]["mean_iu"] for ev in summary["evaluations"]]
    if len(ious) == 3:
        verdict = "holds" if ious[2] >= ious[1] >= ious[0] else "does NOT hold this time"
        print(f"\nthe paper's point, finer strides help (8s >= 16s >= 32s mean IU): {verdict} "
              f"({ious[0]:.3f} -> {ious[1]:.3f} -> {ious[2]:.3f})")
    here = "" if str(home) == str(Path("data").resolve()) else f" --project-dir {home}"
    bin_ = venv_bin()
    print("\nexplore it:")
    print(f"  MLflow UI:   {bin_}mlflow ui --backend-store-uri "
          f"sqlite:///{home}/mlflow/mlflow.db --port 5000   # http://127.0.0.1:5000")
    print(f"  Prefect UI:  PREFECT_HOME={home}/prefect {bin_}prefect server start"
          "   # http://127.0.0.1:4200")
    print(f"  predict:     {bin_}fcn predict --model models:/"
          f"{summary['registration']['name']}@champion {home}/raw/synthetic/VOCdevkit"
          f"/VOC2012/JPEGImages --out {home}/predictions{here}")
    print(f"  models:      {bin_}fcn models {summary['registration']['name']}{here}")
    print(f"  the paper:   {bin_}fcn experiment configs/paper/table2.yaml{here}   # Table 2; "
          "reuses these stages")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s (a second `make demo` reuses the cached "
          "ingest and stages; `fcn demo --force` retrains)")
    return 0


def _add_project_dir(p: argparse.ArgumentParser) -> None:
    add_project_dir(p, "Prefect's and MLflow's databases and the default shard and checkpoint "
                       "folders", default=os.environ.get("FCN_DATA_DIR", "data"))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from pipelines.sources.datasets import NAMES

    def pipeline_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="a YAML preset, e.g. configs/demo.yaml")
        p.add_argument("--dataset", required=True, choices=NAMES)
        p.add_argument("--root", "--voc-root", dest="root", required=True,
                       help="the dataset folder as downloaded: a path or a URI (pascal, "
                            "context: the VOC devkit)")
        p.add_argument("--sbd-root", default=None, help="pascal: SBD's benchmark_RELEASE/dataset")
        p.add_argument("--context-root", default=None,
                       help="context: the PASCAL-Context annotations")
        p.add_argument("--protocol", default=None,
                       help="pascal: seg11valid (default) or trainaug (see fcn ingest --help)")
        p.add_argument("--allow-missing", action="store_true",
                       help="pascal: go on when validation ids are missing or leak")
        p.add_argument("--compute-hha", action="store_true",
                       help="nyud: compute HHA from depth at ingest (see fcn ingest --help)")
        p.add_argument("--synthetic-size", type=positive_int, default=None, metavar="N",
                       help="synthetic: generate NxN images when ROOT is empty (default 128)")
        p.add_argument("--backbone-weights", default=None, metavar="LOC",
                       help="torchvision vgg16 state dict to start FCN-32s from: a path every "
                            "node has, or a URI (s3://bucket/vgg16-397923af.pth)")
        p.add_argument("--gpu", action="store_true",
                       help="one GPU per training worker (nccl), as use_gpu: true")
        p.add_argument("--amp", choices=["off", "bf16", "fp16", "auto"], default=None,
                       help=AMP_HELP)
        p.add_argument("--out", default=None,
                       help="shards folder or URI (default PROJECT_DIR/shards)")
        p.add_argument("--storage", default=None,
                       help="checkpoints folder or URI (default PROJECT_DIR/runs)")
        p.add_argument("--evaluate", choices=["every", "final"], default="every",
                       help="score every stage's checkpoint (default) or only the final one")
        p.add_argument("--split", default=None,
                       help="split to evaluate on (default: the config's val_split)")
        p.add_argument("--name", default=None, help="registered model (default fcn-DATASET)")
        _add_project_dir(p)
        p.add_argument("--force", action="store_true", help="ignore cached ingest and stages")

    p = sub.add_parser(
        "run", help="run the whole pipeline once through Prefect",
        description="ingest -> train 32s/16s/8s -> evaluate -> register, as a Prefect flow "
                    "run (PREFECT_API_URL selects a server; without it Prefect's local API). "
                    "With RAY_ADDRESS=http://head:8265 each step runs as a Ray job on that "
                    "cluster, and --root, --out and --storage must be URIs its nodes reach "
                    "(s3://bucket/...); with RAY_ADDRESS=head:6379 this process is the driver.")
    pipeline_args(p)
    add_verbose(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "deploy", help="serve the pipeline as a scheduled Prefect deployment",
        description="Serve fcn-pipeline as a Prefect deployment with a cron schedule from this "
                    "process (it runs the scheduled flow runs until stopped). It needs the "
                    "Prefect server in PREFECT_API_URL, whose scheduler starts the runs "
                    "(prefect server start, or infra/local/up.sh). For a Prefect "
                    "server with work pools, see the README's `prefect deploy` route.")
    pipeline_args(p)
    p.add_argument("--cron", required=True, help='e.g. "0 3 * * *" (every day at 03:00)')
    p.add_argument("--deployment", default="scheduled", help="deployment name")
    p.add_argument("--when-running", choices=("skip", "queue"), default="skip",
                   help="a run that comes due while the last one still runs: skip it "
                        "(default; Prefect marks it Cancelled) or queue it to start after")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser(
        "demo", help="the whole pipeline on a generated dataset (what `make demo` runs)",
        description="Generate a small dataset in VOC layout and run ingest -> FCN-32s -> 16s "
                    "-> 8s -> evaluate -> register through Prefect on a local Ray, an MLflow "
                    "SQLite store and Prefect's local API, all under --project-dir.")
    _add_project_dir(p)
    p.add_argument("--config", default="configs/demo.yaml", help="training preset")
    p.add_argument("--force", action="store_true", help="ignore cached ingest and stages")
    add_verbose(p)
    p.set_defaults(func=cmd_demo)



