"""Prefect tasks: thin wrappers around pipelines functions (no business logic here).

Tasks pass paths, URIs and small dicts (hashable, persistable), never Ray datasets or models.
Cache keys make reruns cheap: an unchanged dataset skips ingest, and a stage whose manifest
fingerprint, config digest and upstream checkpoint are unchanged is not trained again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _ingest_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    """The source fingerprint (a stat of every listed file): unchanged files, same key."""
    from pipelines.ingest import IngestConfig, list_sources, source_fingerprint

    cfg = IngestConfig(**params["cfg"])
    if cfg.dataset == "synthetic":  # generated from a seed: its parameters are its content
        return _digest("ingest", params["cfg"])
    _, _, records, problems = list_sources(cfg, log=lambda m: None)
    # The output is not part of the key: after deleting shards, run with --force.
    return _digest("ingest", params["cfg"], source_fingerprint(cfg, records, problems))


@task(name="ingest", retries=2, retry_delay_seconds=[5, 30], cache_key_fn=_ingest_key,
      persist_result=True)
def ingest_task(cfg: dict[str, Any]) -> dict[str, Any]:
    from pipelines.ingest import IngestConfig, ingest
    from pipelines.shards import read_manifest

    logger = get_run_logger()
    result = ingest(IngestConfig(**cfg), log=logger.info)
    logger.info(result.summary())
    m = read_manifest(result.dataset_dir)
    return {"data": str(result.dataset_dir), "fingerprint": m.fingerprint,
            "version": m.data["version"], "rows": result.rows}


@task(name="start-pipeline-run", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def start_run_task(config: dict[str, Any], data: str, storage: str | None,
                   resume: str | None) -> dict[str, Any]:
    from pipelines.config import from_dict
    from pipelines.tracking import tracking_uri
    from pipelines.train import start_pipeline_run

    logger = get_run_logger()
    run = start_pipeline_run(from_dict(config), data, storage, resume, log=logger.info)
    logger.info(f"MLflow parent run: {run_link(run.mlflow_parent)}")
    return {"run_id": run.run_id, "storage": str(run.storage), "mlflow_parent": run.mlflow_parent,
            "tracking_uri": tracking_uri()}


def _stage_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    return _digest("stage", params["fingerprint"], params["config"], params["stage"],
                   params["init_checkpoint"])


@task(name="train-stage", retries=1, retry_delay_seconds=10, cache_key_fn=_stage_key,
      persist_result=True, task_run_name="train-{stage}")
def train_stage_task(config: dict[str, Any], stage: str, data: str, fingerprint: str,
                     run: dict[str, Any], init_checkpoint: str | None) -> dict[str, Any]:
    from pipelines.config import from_dict
    from pipelines.train import PipelineRun, run_stage

    logger = get_run_logger()
    cfg = from_dict(config)
    stage_cfg = next(s for s in cfg.stages if s.name == stage)
    pipeline_run = PipelineRun(run["run_id"], Path(run["storage"]), run["mlflow_parent"])
    res = run_stage(cfg, stage_cfg, data, pipeline_run, init_checkpoint, log=logger.info)
    logger.info(f"stage {stage}: {res.steps} steps, mean IU {res.metrics.get('mean_iu', 0):.4f}, "
                f"checkpoint {res.checkpoint}; MLflow run {run_link(res.run_id)}")
    return {"stage": stage, "checkpoint": res.checkpoint, "steps": res.steps,
            "metrics": res.metrics, "mlflow_run": res.run_id, "seconds": res.seconds}


@task(name="finish-pipeline-run", cache_policy=NO_CACHE)
def finish_run_task(run: dict[str, Any], ok: bool) -> None:
    from pipelines.train import PipelineRun, finish_pipeline_run

    finish_pipeline_run(PipelineRun(run["run_id"], Path(run["storage"]), run["mlflow_parent"]),
                        ok)


@task(name="evaluate", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE,
      task_run_name="evaluate-{label}")
def evaluate_task(model: str, data: str, split: str, label: str = "model",
                  actors: int = 2) -> dict[str, Any]:
    from pipelines.evaluate import evaluate

    logger = get_run_logger()
    result = evaluate(model, data, split, actors=actors, run_name=f"evaluate-{label}",
                      log=logger.info)
    logger.info(result.table())
    logger.info(f"MLflow evaluation run: {run_link(result.run_id)}")
    return {"model": model, "split": split, "metrics": result.metrics,
            "per_class_iu": dict(result.per_class), "mlflow_run": result.run_id}


@task(name="register", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE)
def register_task(checkpoint: str, data: str, split: str, metrics: dict[str, float],
                  name: str, config_digest: str, run_id: str | None) -> dict[str, Any]:
    from pipelines.evaluate import evaluate
    from pipelines.registry import register
    from pipelines.shards import read_manifest

    logger = get_run_logger()

    def rescore(uri: str) -> float:
        return evaluate(uri, data, split, log_to_mlflow=False, log=logger.info) \
            .metrics["mean_iu"]

    reg = register(checkpoint, name=name, metrics=metrics, split=split,
                   manifest=read_manifest(data).data, config_digest=config_digest,
                   run_id=run_id, evaluate_champion=rescore, log=logger.info)
    return {"name": reg.name, "version": reg.version, "champion": reg.champion,
            "decision": reg.decision}


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
