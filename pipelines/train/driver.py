"""The driver: one TorchTrainer (one worker group) for consecutive stages, 32s -> 16s -> 8s,
each from the previous stage's final net, and the MLflow runs (a parent per pipeline run, a
nested run per stage)."""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import storage
from pipelines.config import StageConfig, StageResult, TrainConfig
from pipelines.errors import UserError
from pipelines.shards import read_manifest
from pipelines.train.checkpoint import (
    checkpoint_file,
)
from pipelines.train.sampling import IN_MEMORY
from pipelines.train.worker import DIVERGED_FILE, DONE_FILE, Log, train_loop_per_worker


class StageFailed(RuntimeError):
    """A stage ended in failure after its retries; the message says how to resume."""


class Diverged(UserError):
    """A stage's training loss stopped being finite: its config (the learning rate) is the
    thing to change; resuming would diverge again."""


@dataclass(frozen=True)
class PipelineRun:
    run_id: str  # names the Ray Train runs (resume with the same id)
    storage: str  # location; <storage>/<run_id>/<stage>/ holds Ray Train's checkpoints
    mlflow_parent: str | None = None


def scaling_config(cfg: TrainConfig) -> Any:
    """Ray Train's ScalingConfig: ``workers`` workers of ``cpus_per_worker`` CPUs each, and one
    GPU each with ``use_gpu`` (Ray Train then picks NCCL and sets each worker's device)."""
    import ray.train

    per_worker = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    return ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                   resources_per_worker=per_worker,
                                   placement_strategy=cfg.placement_strategy)


def train_stages(cfg: TrainConfig, stages: list[StageConfig], data: str, run: PipelineRun,
                 init_checkpoint: str | None, mlflow_run_ids: dict[str, str | None],
                 log: Log = print) -> None:
    """Fit consecutive stages in one TorchTrainer (one worker group: no new workers, model
    build from storage or data pass between stages). Each stage writes its final checkpoint
    and done file to ``<storage>/<run_id>/<stage>/`` as it ends; a stage done there is
    skipped, and Ray Train's latest checkpoint of the run resumes an unfinished one."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.ray_env import init_ray, set_train_env, train_log_level
    from pipelines.shards import open_split
    from pipelines.tracking import tracking_uri
    from pipelines.train.callbacks import CheckpointLog
    from pipelines.train.data_config import WholeValidation

    log(init_ray())
    manifest = read_manifest(data)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress lines
    shards: dict[str, list[tuple[str, int]]] | None = None
    datasets: dict[str, Any] | None = None
    if cfg.sampling in IN_MEMORY:
        # Each worker reads its share of the rows straight from the shards, once per chain:
        # no Ray Data execution, no split coordinator actors to start (the stage starts
        # sooner), and every validation row is some worker's exactly once.
        shards = {"train": manifest.shards(cfg.train_split),
                  "val": manifest.shards(cfg.val_split)}
    else:
        if cfg.cache_dataset:  # streamed epochs read the Parquet once, not once per epoch
            train_ds, val_ds = _materialized(data, manifest.fingerprint, cfg)
        else:
            train_ds, val_ds = open_split(data, cfg.train_split), open_split(data,
                                                                               cfg.val_split)
        datasets = {"train": train_ds.randomize_block_order(), "val": val_ds}
    set_train_env()
    run_dir = storage.join(run.storage, run.run_id)
    run_fs, run_fs_path = storage.resolve(run_dir)
    names = [s.name for s in stages]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg, "stages": names, "init_checkpoint": init_checkpoint,
            "num_classes": manifest.num_classes, "run_dir": str(run_dir),
            "mlflow_run_ids": mlflow_run_ids, "tracking_uri": tracking_uri(),
            "threads_per_worker": cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker)),
            "shards": shards,
            "class_weights": _class_weights(cfg, manifest),
        },
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            # One Ray Train run per pipeline run: a resumed run finds its latest checkpoint.
            # pipelines.storage's filesystem: the same settings (endpoint, region, timeouts,
            # no implicit buckets) as every other access. Credentials: each node's env.
            name=f"{run.run_id}-train", storage_path=run_fs_path,
            storage_filesystem=run_fs if storage.is_remote(run.storage) else None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[CheckpointLog(run.storage)],
            logging_config=ray.train.LoggingConfig(log_level=train_log_level())),
        datasets=datasets,
        dataset_config=WholeValidation() if datasets else None,  # every val row once
    )
    steps = " + ".join(f"{s.steps} ({s.name})" for s in stages)
    log(f"stage{'s' if len(stages) > 1 else ''} {', '.join(names)}: {steps} steps on "
        f"{cfg.workers} worker(s) ({'GPU, nccl' if cfg.use_gpu else 'CPU, gloo'}), from "
        f"{init_checkpoint or (cfg.backbone_weights or 'random init')}")
    from pipelines.ray_env import warm_dir
    from pipelines.warm import fit_started

    for s in stages:  # an earlier attempt's (the run resumed)
        storage.delete_file(_diverged_file(run, s.name))
    fit_started(warm_dir())  # a process started ahead for the controller stops waiting
    try:
        result = trainer.fit()
    except Exception as e:  # Ray raises its own error types for failed worker groups
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StageFailed(f"stage {_current(stages, run)} failed ({first}); continue it with "
                          f"`fcn train --resume {run.run_id}`") from e
    if result.error is not None:
        raise StageFailed(f"stage {_current(stages, run)} failed: {result.error}; continue it "
                          f"with `fcn train --resume {run.run_id}`") from result.error
    for s in stages:
        if storage.is_file(_diverged_file(run, s.name)):
            raise diverged(cfg, storage.read_json(_diverged_file(run, s.name)))


# The reference's learning rates for its summed (unnormalized) loss, per stage (DESIGN.md).
PAPER_LR = {"32s": "1e-10", "16s": "1e-12", "8s": "1e-14"}


def diverged(cfg: TrainConfig, info: dict[str, Any]) -> Diverged:
    """What the workers wrote when the loss stopped being finite, as the error to show."""
    stage = info["stage"] if info["stage"] in PAPER_LR else "32s"
    how = ("; normalize_loss: false sums the loss over every pixel, as the paper does with lr "
           f"{PAPER_LR[stage]} for FCN-{stage}" if not cfg.normalize_loss else "")
    alt = " or set normalize_loss: true" if not cfg.normalize_loss else ""
    return Diverged(f"stage {info['stage']} diverged: the training loss is {info['loss']} at "
                    f"step {info['step']} (lr {info['lr']:g}{how}); lower the stage's lr{alt} "
                    f"and train again")


def _diverged_file(run: PipelineRun, stage: str) -> str:
    return storage.join(run.storage, run.run_id, stage, DIVERGED_FILE)


def _class_weights(cfg: TrainConfig, manifest: Any) -> list[float] | None:
    """``class_weights`` from the training split's class pixel counts (the manifest's)."""
    from fcn_core.losses import class_weights

    w = class_weights(manifest.data["splits"][cfg.train_split]["class_pixels"],
                      cfg.class_weights)
    return None if w is None else [float(v) for v in w]


def _done_file(run: PipelineRun, stage: str) -> str:
    return storage.join(run.storage, run.run_id, stage, DONE_FILE)


def _current(stages: list[StageConfig], run: PipelineRun) -> str:
    """The first stage of ``stages`` without its done file (where a chain stopped)."""
    return next((s.name for s in stages if not storage.is_file(_done_file(run, s.name))),
                stages[-1].name)


def _stage_result(run: PipelineRun, stage: str, run_id: str | None, seconds: float
                  ) -> StageResult:
    info = storage.read_json(_done_file(run, stage))
    return StageResult(stage, info["checkpoint"], int(info["steps"]),
                       {k: float(v) for k, v in info["metrics"].items()},
                       run_id or info.get("mlflow_run"), seconds)


class StageChain:
    """Consecutive stages run by ``target`` in a thread (``train_stages`` here, or one Ray job
    for them), so that each stage returns (its own MLflow run, its own Prefect task) as soon
    as its done file is written while the workers go on with the next."""

    def __init__(self, run: PipelineRun, stages: list[str], init: str | None,
                 target: Callable[[], Any], last_waits_for_end: bool = True) -> None:
        import threading

        self.run, self.stages, self.init = run, list(stages), init
        # False: the last stage also returns on its done file, while the worker group shuts
        # down in the background (~2 s on 2 cores); ``join`` waits for that.
        self.last_waits_for_end = last_waits_for_end
        self.returned: list[StageResult] = []
        self.error: BaseException | None = None

        def body() -> None:
            try:
                target()
            except BaseException as e:  # noqa: BLE001  (handed to the waiting stage)
                self.error = e

        self.thread = threading.Thread(target=body, name=f"fcn-train-{run.run_id}",
                                       daemon=True)
        self.thread.start()

    @classmethod
    def get(cls, registry: dict[str, StageChain], run: PipelineRun, stage: str,
            init: str | None, start: Callable[[], StageChain]) -> StageChain:
        """The run's chain that ``stage`` (from ``init``) continues, or a new one from
        ``start()`` once the run's previous chain (if any) has ended: never two worker groups
        of one run at once."""
        current = registry.get(run.run_id)
        if current is not None and current.expects(stage, init):
            return current
        if current is not None:
            current.thread.join()
        registry[run.run_id] = start()
        return registry[run.run_id]

    def expects(self, stage: str, init: str | None) -> bool:
        """``stage`` is the chain's next one and starts where the chain would start it."""
        k = len(self.returned)
        if self.error is not None or k >= len(self.stages) or self.stages[k] != stage:
            return False
        return init == (self.returned[-1].checkpoint if self.returned else self.init)

    def wait(self, stage: str, run_id: str | None) -> StageResult:
        t0 = time.perf_counter()
        done = _done_file(self.run, stage)
        # The last stage: wait for the run itself (its workers let go of their resources),
        # unless ``last_waits_for_end`` is off. An earlier one: look for its done file now and
        # then (a HEAD request in a bucket).
        last = stage == self.stages[-1] and self.last_waits_for_end
        if last:
            self.thread.join()
        else:
            every = 2.0 if storage.is_remote(self.run.storage) else 0.5
            while self.thread.is_alive() and not storage.is_file(done):
                self.thread.join(timeout=every)
        finished = storage.is_file(done)
        if self.error is not None and (last or not finished):
            raise self.error
        if not finished:
            raise RuntimeError(f"stage {stage}: the training run ended without finishing it")
        res = _stage_result(self.run, stage, run_id, time.perf_counter() - t0)
        self.returned.append(res)
        return res

    def join(self) -> None:
        """Wait until the chain's training run has ended (its worker group gone)."""
        self.thread.join()


_CHAINS: dict[str, StageChain] = {}  # pipeline run id -> its chain in this process


# The last stage's materialized splits, for the next stage of the same process (the flow runs
# the stages one after the other here): (data, fingerprint, splits, Ray job) -> datasets.
_MATERIALIZED: dict[tuple[str, ...], tuple[Any, Any]] = {}


def _materialized(data: str, fingerprint: str, cfg: TrainConfig) -> tuple[Any, Any]:
    """The train and validation splits materialized in Ray's object store, reused by the next
    stage on the same data (one entry: a new dataset releases the previous one's blocks)."""
    import ray

    from pipelines.shards import open_split

    # The Ray job is part of the key: blocks of an earlier connection are gone after a restart.
    key = (str(data), fingerprint, cfg.train_split, cfg.val_split,
           ray.get_runtime_context().get_job_id())
    hit = _MATERIALIZED.get(key)
    if hit is not None:
        return hit
    _MATERIALIZED.clear()
    pair = (open_split(data, cfg.train_split).materialize(),
            open_split(data, cfg.val_split).materialize())
    _MATERIALIZED[key] = pair
    return pair


def new_run_id(cfg: TrainConfig) -> str:
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def start_pipeline_run(cfg: TrainConfig, data: str | Path, where: str | Path | None = None,
                       resume: str | None = None, experiment: str | None = None,
                       log: Log = print, run_id: str | None = None) -> PipelineRun:
    """The MLflow parent run (created, or found again when resuming) and the run folder.

    ``run_id`` names a new run (a scheduler's retry passes the same id, so a retried start
    finds the parent run it created instead of making another)."""
    from mlflow.tracking import MlflowClient

    from pipelines import preflight
    from pipelines.tracking import data_dir, experiment_id, flatten, tracking_uri

    manifest = preflight.check_data(cfg, data)  # its dataset and splits, in one line
    where = storage.as_location(where or data_dir() / "runs")
    storage.check_writable(where)
    run_id = resume or run_id or new_run_id(cfg)
    client = MlflowClient(tracking_uri())
    experiment = experiment or f"fcn-{manifest.data['dataset']}"
    exp = experiment_id(client, experiment)
    if resume:  # an unknown id is an error, not a new run (check_resume vets its characters)
        preflight.check_resume(resume, where, lambda: bool(client.search_runs(
            [exp], f"tags.pipeline_run = '{resume}' and tags.stage = 'pipeline'",
            max_results=1)), f"MLflow experiment {experiment!r}")
    parent = _find_or_create_run(client, exp, run_id, None, "pipeline", cfg.name)
    if resume:  # FAILED or KILLED when it stopped: running again
        running_again(client, parent)
    else:
        for k, v in flatten(cfg.to_dict()).items():
            client.log_param(parent, k, v[:6000])
        from pipelines.registry import log_dataset_input

        log_dataset_input(client, parent, manifest.location, manifest.data)
        for k, v in (("manifest_fingerprint", manifest.fingerprint),
                     ("dataset", manifest.data["dataset"]),
                     ("dataset_version", manifest.data["version"]),
                     ("config_digest", cfg.digest())):
            client.set_tag(parent, k, v)
    log(f"pipeline run {run_id}: MLflow {tracking_uri()} experiment {exp} run {parent}")
    return PipelineRun(run_id, where, parent)


def run_stage(cfg: TrainConfig, stage: StageConfig, data: str | Path, run: PipelineRun,
              init_checkpoint: str | None, log: Log = print, chain: bool = True
              ) -> StageResult:
    """One stage as a nested MLflow run of the pipeline run: train, then log its final
    metrics, checkpoint and config. With ``chain``, the first call also starts the config's
    later stages in the same worker group, and the next call (the next stage, from this
    one's checkpoint) waits for it instead of starting new workers."""
    from mlflow.tracking import MlflowClient

    from pipelines import preflight
    from pipelines.tracking import tracking_uri

    manifest = preflight.check_training(cfg, data, init_checkpoint)  # before MLflow and Ray
    client = MlflowClient(tracking_uri())
    exp = client.get_run(run.mlflow_parent).info.experiment_id
    idx = [s.name for s in cfg.stages].index(stage.name)
    following = cfg.stages[idx:] if chain else (stage,)
    children = {s.name: _find_or_create_run(client, exp, run.run_id, run.mlflow_parent, s.name,
                                            f"{cfg.name}-{s.name}") for s in following}
    child = children[stage.name]
    client.set_tag(child, "manifest_fingerprint", manifest.fingerprint)
    if storage.is_file(_done_file(run, stage.name)):  # finished in an earlier attempt
        log(f"stage {stage.name}: already finished in run {run.run_id}, reusing its checkpoint")
        res = _stage_result(run, stage.name, child, 0.0)
    else:
        from pipelines.ray_env import init_ray

        if client.get_run(child).info.status != "RUNNING":  # resumed: running again
            running_again(client, child)
        # Here, not in the chain's thread: Ray's local processes die with the thread that
        # started them (and the driver's exit then waits ~15 s for timeouts).
        init_ray()
        if cfg.use_gpu:  # too few on a local Ray: one line now, not a wait for ever
            from pipelines.ray_env import check_gpus

            note = check_gpus(cfg.workers, "training worker", "lower workers (--workers)")
            if note:
                log(note)
        where = storage.as_location(data)
        current = StageChain.get(_CHAINS, run, stage.name, init_checkpoint, lambda: StageChain(
            run, [s.name for s in following], init_checkpoint,
            lambda: train_stages(cfg, list(following), where, run, init_checkpoint,
                                 dict(children), log), last_waits_for_end=False))
        if current.returned:
            log(f"stage {stage.name}: in the same worker group, from {init_checkpoint}")
        try:
            res = current.wait(stage.name, child)
        except BaseException as exc:
            reason = failure(exc)
            if reason:
                client.set_tag(child, FAILURE_TAG, reason)
            for later in children.values():  # this stage's run and those of the stages after
                client.set_terminated(later, end_status(exc))  # it (made for the chain)
            raise
    _log_stage_artifacts(client, child, res, cfg)
    client.set_terminated(child, "FINISHED")
    return res


def end_status(exc: BaseException) -> str:
    """The MLflow status of a run that ``exc`` ended: KILLED for Ctrl-C (as MLflow marks a
    cancelled run), FAILED otherwise."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


# The tag on a FAILED run (the stage's and its pipeline's) that says why, as the command did.
FAILURE_TAG = "failure"


def failure(exc: BaseException) -> str | None:
    """What ended a run, for its ``failure`` tag (secrets masked); None for Ctrl-C."""
    if isinstance(exc, KeyboardInterrupt):
        return None
    first = (str(exc).strip().splitlines() or [""])[0]
    return storage.redact(f"{type(exc).__name__}: {first}" if first else
                          type(exc).__name__)[:5000]


def running_again(client: Any, run_id: str) -> None:
    """A resumed run: RUNNING, and no longer saying why it failed."""
    client.update_run(run_id, status="RUNNING")
    if FAILURE_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, FAILURE_TAG)


def finish_pipeline_run(run: PipelineRun, ok: bool, status: str | None = None,
                        reason: str | None = None, note: str | None = None) -> None:
    """End the parent run; ``reason`` (a failure) and ``note`` (its description in the
    MLflow UI) are set on it first."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    if reason:
        client.set_tag(run.mlflow_parent, FAILURE_TAG, reason)
    if note:
        client.set_tag(run.mlflow_parent, "mlflow.note.content", note)
    client.set_terminated(run.mlflow_parent, status or ("FINISHED" if ok else "FAILED"))


def train_pipeline(cfg: TrainConfig, data: str | Path, storage: str | Path | None = None,
                   resume: str | None = None, log: Log = print,
                   experiment: str | None = None, init_checkpoint: str | None = None,
                   finish: bool = True) -> tuple[PipelineRun, list[StageResult]]:
    """Every stage of ``cfg`` in order, each from the previous one's final checkpoint, all
    under one MLflow parent run with a nested run per stage. ``init_checkpoint`` starts the
    first stage from a checkpoint (a later stage run on its own); ``finish=False`` leaves
    the parent run open for the stages a scheduler runs next. A user's mistake (wrong
    dataset, a split too small for the workers, missing weights, an unknown resume id) is a
    ``preflight.PreflightError`` raised before any MLflow run or Ray work starts;
    ``StageFailed`` is only for a stage that started and failed."""
    from pipelines import preflight

    preflight.check_training(cfg, data, init_checkpoint)
    run = start_pipeline_run(cfg, data, storage, resume, experiment, log)
    results: list[StageResult] = []
    init = init_checkpoint
    try:
        for stage in cfg.stages:
            results.append(run_stage(cfg, stage, data, run, init, log))
            init = results[-1].checkpoint
    except BaseException as exc:
        finish_pipeline_run(run, ok=False, status=end_status(exc), reason=failure(exc))
        if isinstance(exc, KeyboardInterrupt):
            exc.add_note(f"MLflow runs marked KILLED; resume with --resume {run.run_id}")
        raise
    if run.run_id in _CHAINS:  # the last stage returned on its done file: the workers let
        _CHAINS[run.run_id].join()  # go before `fcn train` (or the Ray job running it) ends
    if finish:
        finish_pipeline_run(run, ok=True)
    return run, results


def _find_or_create_run(client: Any, exp: str, run_id: str, parent: str | None, stage: str,
                        name: str) -> str:
    """The MLflow run of this pipeline run's ``stage`` ("pipeline" for the parent), reused
    when the pipeline run is resumed."""
    query = f"tags.pipeline_run = '{run_id}' and tags.stage = '{stage}'"
    found = client.search_runs([exp], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"pipeline_run": run_id, "stage": stage}
    if parent:
        tags["mlflow.parentRunId"] = parent
    return client.create_run(exp, tags=tags, run_name=name).info.run_id


def _log_stage_artifacts(client: Any, run_id: str, res: StageResult, cfg: TrainConfig) -> None:
    for k, v in res.metrics.items():
        if k not in ("step", "resumed_from") and np.isfinite(v):
            client.log_metric(run_id, f"final_{k}", v, step=res.steps)
    with tempfile.TemporaryDirectory() as d:
        import yaml

        ckpt = checkpoint_file(res.checkpoint)
        if storage.is_file(ckpt):
            client.log_artifact(run_id, storage.local_copy(ckpt, d), artifact_path="checkpoint")

        p = Path(d) / "config.yaml"
        p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        client.log_artifact(run_id, str(p))
    client.set_tag(run_id, "checkpoint", res.checkpoint)
