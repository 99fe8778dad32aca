"""Prefect tasks: thin wrappers around pipelines functions (no business logic here).

Tasks pass paths, URIs and small dicts (hashable, persistable), never Ray datasets or models.
Cache keys make reruns cheap: an unchanged dataset skips ingest, a stage whose manifest
fingerprint, config digest and upstream checkpoint are unchanged is not trained again, and a
checkpoint already scored on that dataset version and split is not scored again.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from flows import reports


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry what can pass (a lost node, a server that did not
    answer, a network error), never a user's mistake (a bad root, config or location: the
    same inputs fail the same way) and never a bug."""
    from pipelines.errors import UserError
    from pipelines.jobs import JobFailed
    from pipelines.train import StageFailed

    try:
        state.result()
    except JobFailed as exc:
        return not exc.usage
    except UserError as exc:
        return exc.transient
    except (StageFailed, ConnectionError, TimeoutError, OSError):
        return True  # a worker, node or connection that failed: may pass on a retry
    except Exception:  # a bug fails the same way again
        return False
    return True


# Every task has a time limit: a hung server or cluster fails the run instead of holding it.
# Long ones are generous (a VGG16 stage on a real dataset takes hours); users who need more
# set FCN_TASK_TIMEOUT_HOURS.
def _hours(default: float) -> float:
    import os

    return 3600 * float(os.environ.get("FCN_TASK_TIMEOUT_HOURS", default))


SHORT = 600.0  # starting or finishing a run: a few MLflow calls


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _ingest_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    """The source fingerprint (a stat of every listed file): unchanged files, same key."""
    from pipelines.ingest import IngestConfig, list_sources, source_fingerprint

    cfg = IngestConfig(**params["cfg"])
    if cfg.dataset == "synthetic":  # generated from a seed: its parameters are its content
        return _digest("ingest", params["cfg"])
    listing = list_sources(cfg, log=lambda m: None)
    # The output is not part of the key: after deleting shards, run with --force.
    return _digest("ingest", params["cfg"], source_fingerprint(cfg, listing))


def _on_cluster() -> bool:
    """RAY_ADDRESS is a dashboard address: cluster steps run as Ray jobs."""
    from pipelines.jobs import jobs_address

    return jobs_address() is not None


def _job(args: list[str], result_dir: str) -> dict[str, Any]:
    """Run ``fcn ARGS`` as a Ray job, its logs in this task's log; its JSON result."""
    from pipelines.jobs import run_job

    return run_job(args, result_dir, log=get_run_logger().info)


@task(name="ingest", retries=2, retry_delay_seconds=[5, 30], cache_key_fn=_ingest_key,
      persist_result=True, retry_condition_fn=retry_transient, timeout_seconds=_hours(12))
def ingest_task(cfg: dict[str, Any]) -> dict[str, Any]:
    from pipelines import storage
    from pipelines.ingest import IngestConfig, ingest
    from pipelines.shards import read_manifest

    logger = get_run_logger()
    c = IngestConfig(**cfg)
    if _on_cluster():
        from flows.cli.data import ingest_args

        args = ingest_args(c)
        dataset_dir = _job(args, storage.join(c.out, "_jobs"))["dataset_dir"]
    else:
        result = ingest(c, log=logger.info)
        logger.info(result.summary())
        dataset_dir = result.dataset_dir
    m = read_manifest(dataset_dir)
    return {"data": dataset_dir, "fingerprint": m.fingerprint,
            "version": m.data["version"], "rows": {s: v["rows"] for s, v in
                                                   m.data["splits"].items()}}


@task(name="start-pipeline-run", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient, timeout_seconds=SHORT)
def start_run_task(config: dict[str, Any], data: str, storage: str | None,
                   resume: str | None) -> dict[str, Any]:
    from prefect.runtime import task_run

    from pipelines.config import from_dict
    from pipelines.tracking import tracking_uri
    from pipelines.train import start_pipeline_run

    logger = get_run_logger()
    cfg = from_dict(config)
    # The same id on every retry of this task run: a retry finds the parent run it created.
    run_id = f"{cfg.name}-{str(task_run.id)[:18]}" if task_run.id else None
    run = start_pipeline_run(cfg, data, storage, resume, log=logger.info, run_id=run_id)
    logger.info(f"MLflow parent run: {run_link(run.mlflow_parent)}")
    return {"run_id": run.run_id, "storage": str(run.storage), "mlflow_parent": run.mlflow_parent,
            "tracking_uri": tracking_uri()}


def _stage_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    """What decides a stage's weights: the data, the config up to this stage (not its name,
    not the stages after it) and the checkpoint it starts from. Two configs that differ only
    in later stages (an experiment's FCN-32s and FCN-16s rows) share their 32s stage."""
    return _digest("stage", params["fingerprint"], stage_identity(params["config"],
                                                                   params["stage"]),
                   params["init_checkpoint"])


def stage_identity(config: dict[str, Any], stage: str) -> dict[str, Any]:
    """``config`` without its run name and with its stages cut after ``stage``."""
    names = [s["name"] for s in config["stages"]]
    return {**{k: v for k, v in config.items() if k != "name"},
            "stages": config["stages"][:names.index(stage) + 1], "stage": stage}


@task(name="train-stage", retries=1, retry_delay_seconds=10, cache_key_fn=_stage_key,
      persist_result=True, task_run_name="train-{stage}", retry_condition_fn=retry_transient,
      timeout_seconds=_hours(48))
def train_stage_task(config: dict[str, Any], stage: str, data: str, fingerprint: str,
                     run: dict[str, Any], init_checkpoint: str | None) -> dict[str, Any]:
    from pipelines.config import from_dict
    from pipelines.train import PipelineRun, run_stage

    logger = get_run_logger()
    cfg = from_dict(config)
    stage_cfg = next(s for s in cfg.stages if s.name == stage)
    pipeline_run = PipelineRun(run["run_id"], run["storage"], run["mlflow_parent"])
    if _on_cluster():
        res = _stage_job(cfg, stage, data, pipeline_run, init_checkpoint)
    else:
        res = run_stage(cfg, stage_cfg, data, pipeline_run, init_checkpoint, log=logger.info)
    logger.info(f"stage {stage}: {res.steps} steps, validation mean IU "
                f"{res.metrics.get('mean_iu', 0):.4f}, "
                f"checkpoint {res.checkpoint}; MLflow run {run_link(res.run_id)}")
    return {"stage": stage, "checkpoint": res.checkpoint, "steps": res.steps,
            "metrics": res.metrics, "mlflow_run": res.run_id, "seconds": res.seconds}


_JOB_CHAINS: dict[str, Any] = {}  # pipeline run id -> its stages' Ray job (a StageChain)


def _stage_job(cfg: Any, stage: str, data: str, run: Any, init: str | None) -> Any:
    """This stage and the config's later ones as one Ray job (one worker group):
    ``fcn train --stages A,B,C --resume RUN`` with the resolved config saved beside the
    run's checkpoints. The first stage's task submits it; each stage's task returns when its
    done file is in the run's storage, the last one when the job has ended."""
    import yaml

    from pipelines import storage
    from pipelines.jobs import run_job
    from pipelines.train.driver import StageChain

    names = [s.name for s in cfg.stages]
    following = names[names.index(stage):]
    logger = get_run_logger()

    def submit() -> Any:
        base = storage.join(run.storage, run.run_id)
        config = storage.join(base, "config.yaml")
        storage.write_text(config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        args = ["train", "--config", config, "--data", data, "--storage", run.storage,
                "--resume", run.run_id, "--stages", ",".join(following), "--keep-open"]
        args += ["--init-checkpoint", init] if init else []
        # The job's log goes to the task that submitted it (the first stage's).
        return StageChain(run, following, init, lambda: run_job(
            args, storage.join(base, "_jobs"), log=logger.info))

    chain = StageChain.get(_JOB_CHAINS, run, stage, init, submit)
    if chain.returned:
        logger.info(f"stage {stage}: in the same Ray job, from {init}")
    return chain.wait(stage, None)


@task(name="finish-pipeline-run", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient, timeout_seconds=SHORT)
def finish_run_task(run: dict[str, Any], ok: bool, status: str | None = None,
                    reason: str | None = None, note: str | None = None) -> None:
    from pipelines.train import PipelineRun, finish_pipeline_run

    finish_pipeline_run(PipelineRun(run["run_id"], run["storage"], run["mlflow_parent"]),
                        ok, status, reason, note)


def reused_note(reused: list[dict[str, Any]], total: int) -> str | None:
    """The parent run's description when stages were Prefect cache hits: their training runs
    belong to the earlier pipeline run that trained them, so this one shows no child run
    for them (and none at all when every stage was reused)."""
    if not reused:
        return None
    which = "every stage was" if len(reused) == total else \
        f"{len(reused)} of {total} stages were"
    lines = [f"{which} reused from an earlier run (unchanged data, config and starting "
             "checkpoint: Prefect cache hits); their training runs:", ""]
    lines += [f"- {r['stage']}: run {r['mlflow_run']}, checkpoint {r['checkpoint']}"
              for r in reused]
    return "\n".join(lines)


def _evaluate_key(ctx: TaskRunContext, params: dict[str, Any]) -> str | None:
    """A training checkpoint on a dataset version and split scores the same every time: a
    scheduled run on unchanged data and config (every stage a cache hit) reuses the scores
    and their MLflow run instead of adding an identical run per evaluation. An MLflow URI
    (an alias moves) is scored every time. The project's version is in the key: a new
    release scores again."""
    from importlib.metadata import version

    from pipelines.registry import is_mlflow_uri
    from pipelines.shards import read_manifest

    if is_mlflow_uri(params["model"]):
        return None
    return _digest("evaluate", params["model"], read_manifest(params["data"]).fingerprint,
                   params["split"], version("fcn-pipeline"))


@task(name="evaluate", retries=1, retry_delay_seconds=10, cache_key_fn=_evaluate_key,
      persist_result=True, task_run_name="evaluate-{label}", retry_condition_fn=retry_transient,
      timeout_seconds=_hours(6))
def evaluate_task(model: str, data: str, split: str, label: str = "model",
                  actors: int | None = None) -> dict[str, Any]:
    from pipelines import storage
    from pipelines.evaluate import evaluate

    logger = get_run_logger()
    if _on_cluster():
        summary = _job(["evaluate", "--model", model, "--data", data, "--split", split,
                        "--run-name", f"evaluate-{label}",
                        *(["--actors", str(actors)] if actors else [])],
                       storage.join(data, "_jobs"))
    else:
        result = evaluate(model, data, split, actors=actors, run_name=f"evaluate-{label}",
                          log=logger.info)
        logger.info(result.table(compact=True))
        summary = result.summary()
    logger.info(f"MLflow evaluation run: {run_link(summary['mlflow_run'])}")
    reports.publish(f"fcn-evaluation-{label}", reports.evaluation_markdown(
        summary, f"FCN-{label}" if label[:-1].isdigit() else label, md_link),
        f"{label} on {split}: mean IU {summary['metrics'].get('mean_iu', float('nan')):.4f}")
    return summary


@task(name="register", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient, timeout_seconds=_hours(6))
def register_task(checkpoint: str, data: str, split: str, metrics: dict[str, float],
                  name: str, config_digest: str, run_id: str | None,
                  training_run: str | None = None) -> dict[str, Any]:
    """Register the checkpoint (a retry reuses the version it made: registration is keyed
    by the training run and the checkpoint's digest) with its lineage: training run,
    evaluation run, this Prefect flow run, the dataset fingerprint."""
    from prefect.runtime import flow_run

    from pipelines import storage
    from pipelines.evaluate import evaluate
    from pipelines.registry import register
    from pipelines.shards import read_manifest

    logger = get_run_logger()
    flow = str(flow_run.id) if flow_run.id else None
    if _on_cluster():
        args = ["register", "--checkpoint", checkpoint, "--data", data, "--split", split,
                "--name", name, "--config-digest", config_digest]
        args += ["--metrics-from-run", run_id] if run_id else []
        args += ["--training-run", training_run] if training_run else []
        args += ["--flow-run", flow] if flow else []
        return _job(args, storage.join(data, "_jobs"))

    def rescore(uri: str) -> float:
        return evaluate(uri, data, split, log_to_mlflow=False, log=logger.info) \
            .metrics["mean_iu"]

    reg = register(checkpoint, name=name, metrics=metrics, split=split,
                   manifest=read_manifest(data).data, config_digest=config_digest,
                   run_id=run_id, evaluate_champion=rescore, log=logger.info,
                   training_run_id=training_run, flow_run=flow)
    return {"name": reg.name, "version": reg.version, "champion": reg.champion,
            "decision": reg.decision, "reused": reg.reused}


def publish_decision(reg: dict[str, Any], run_id: str | None) -> None:
    """The champion decision as a markdown artifact of the flow run."""
    reports.publish(f"fcn-champion-{reg['name']}", reports.decision_markdown(reg, md_link, run_id),
                    reg["decision"])


def publish_stages(stages: list[dict[str, Any]]) -> None:
    reports.publish("fcn-stages", reports.stages_markdown(stages, md_link),
                    ", ".join(f"{s['stage']} mean IU {s['metrics'].get('mean_iu', 0):.4f}"
                              for s in stages))


def run_link(run_id: str | None) -> str:
    """A link a user can open: the MLflow UI page of a run (or the run id for SQLite)."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri

    if not run_id:
        return "-"
    uri = tracking_uri()
    if uri.startswith("http"):
        exp = MlflowClient(uri).get_run(run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
    return f"{run_id} in {uri}"


def md_link(run_id: str | None) -> str:
    """``run_link`` as markdown: a link to the MLflow UI, or the run id and its store."""
    link = run_link(run_id)
    if link.startswith("http"):
        return f"[{run_id}]({link})"
    return f"`{link}`"
