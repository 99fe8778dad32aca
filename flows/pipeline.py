"""Prefect flows: ingest -> train 32s -> 16s -> 8s -> evaluate -> register, as one DAG.

Flows only call tasks. Parameters are typed (Prefect validates them) and are paths and
names, so a flow run can be scheduled, retried and cached.
"""

# No ``from __future__ import annotations`` here: a served deployment runs its flow in a
# subprocess from a cloudpickled copy whose globals hold only the names the code uses, so a
# string annotation (``Dataset``) could not be resolved there and every scheduled run failed
# parameter validation. Evaluated annotations travel with the function.
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger

from flows.results import result_storage
from flows.tasks import (
    evaluate_task,
    finish_run_task,
    ingest_task,
    publish_decision,
    publish_stages,
    register_task,
    reused_note,
    start_run_task,
    train_stage_task,
)
from pipelines.sources.datasets import NAMES

Dataset = Literal[NAMES]  # type: ignore[valid-type]  # the one table: pipelines.sources.datasets


def _data_dir() -> Path:
    from pipelines.tracking import data_dir

    return data_dir()


@flow(name="ingest", log_prints=True)
def ingest_flow(dataset: Dataset, root: str, out: str | None = None,
                splits: list[str] | None = None, split_file: str | None = None,
                synthetic_size: int = 128, force: bool = False, sbd_root: str | None = None,
                context_root: str | None = None, protocol: str | None = None,
                allow_missing: bool = False, compute_hha: bool = False) -> dict[str, Any]:
    """A dataset as downloaded -> validated Parquet shards (skipped when unchanged)."""
    cfg = {"dataset": dataset, "root": root, "out": out or str(_data_dir() / "shards"),
           "splits": tuple(splits) if splits else None, "split_file": split_file,
           "synthetic_size": (synthetic_size, synthetic_size), "sbd_root": sbd_root,
           "context_root": context_root, "protocol": protocol, "allow_missing": allow_missing,
           "compute_hha": compute_hha}
    shards = ingest_task.with_options(refresh_cache=force)(cfg)
    if not force and not _shards_intact(shards):  # a cache hit whose shards were deleted
        get_run_logger().warning(f"the cached ingest's shards at {shards['data']} (version "
                                 f"{shards['version']}) are gone: ingesting again")
        shards = ingest_task.with_options(refresh_cache=True)(cfg)
    return shards


def _shards_intact(shards: dict[str, Any]) -> bool:
    """The ingest result's manifest still exists at the version it names (a cached result
    outlives the files it points at: deleted by hand, or by a bucket's lifecycle rule)."""
    from pipelines.shards import ManifestError, read_manifest

    try:
        return bool(read_manifest(shards["data"]).data["version"] == shards["version"])
    except (ManifestError, FileNotFoundError):
        return False


@flow(name="train", log_prints=True)
def train_flow(config: str, data: str, fingerprint: str, storage: str | None = None,
               resume: str | None = None, force: bool = False,
               overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The config's stages in order, each from the previous one's final checkpoint."""
    from pipelines.config import load_config

    return train_stages(load_config(config, **(overrides or {})).to_dict(), data, fingerprint,
                        storage, resume, force)


def train_stages(config: dict[str, Any], data: str, fingerprint: str, storage: str | None,
                 resume: str | None = None, force: bool = False) -> list[dict[str, Any]]:
    """The tasks of ``train_flow`` for a config dict, in the calling flow: one pipeline run
    (an MLflow parent), each stage a cached task that starts from the one before; a cached
    stage whose checkpoint is gone is trained again (and so are the stages after it)."""
    from pipelines import storage as store

    run = start_run_task(config, data, storage, resume)
    results: list[dict[str, Any]] = []
    reused: list[dict[str, Any]] = []
    init = None
    try:
        for stage in config["stages"]:
            state = train_stage_task.with_options(refresh_cache=force)(
                config, stage["name"], data, fingerprint, run, init, return_state=True)
            res = state.result()  # raises what the task raised
            if not force and not store.exists(res["checkpoint"]):  # a hit whose files went
                get_run_logger().warning(f"stage {stage['name']}: the cached checkpoint "
                                         f"{res['checkpoint']} is gone: training it again")
                state = train_stage_task.with_options(refresh_cache=True)(
                    config, stage["name"], data, fingerprint, run, init, return_state=True)
                res = state.result()
            if state.name == "Cached":
                reused.append(res)
            results.append(res)
            init = res["checkpoint"]
    except BaseException as exc:
        from pipelines.train.driver import end_status, failure

        finish_run_task(run, ok=False, status=end_status(exc),  # KILLED for Ctrl-C
                        reason=failure(exc))
        raise
    finish_run_task(run, ok=True, note=reused_note(reused, len(results)))
    publish_stages(results)
    return results


@flow(name="evaluate", log_prints=True)
def evaluate_flow(models: list[str], data: str, split: str = "val",
                  labels: list[str] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Score each model (URI or checkpoint) on the split (a checkpoint scored before on this
    dataset version and split: its cached scores, unless ``force``)."""
    labels = labels or [f"model{i}" for i in range(len(models))]
    score = evaluate_task.with_options(refresh_cache=force)
    return [score(m, data, split, label) for m, label in zip(models, labels, strict=True)]


@flow(name="fcn-pipeline", log_prints=True)
def fcn_pipeline(dataset: Dataset, root: str, config: str, out: str | None = None,
                 split: str | None = None, model_name: str | None = None,
                 splits: list[str] | None = None, split_file: str | None = None,
                 storage: str | None = None, force: bool = False,
                 overrides: dict[str, Any] | None = None,
                 evaluate_every_stage: bool = True, sbd_root: str | None = None,
                 context_root: str | None = None, protocol: str | None = None,
                 allow_missing: bool = False, compute_hha: bool = False,
                 synthetic_size: int = 128) -> dict[str, Any]:
    """ingest -> train (32s -> 16s -> 8s) -> evaluate -> register (candidate; the champion
    alias moves only when the new mean IU is at least the champion's)."""
    from pipelines.config import load_config

    logger = get_run_logger()
    cfg = load_config(config, **(overrides or {}))
    # Cached results (ingest, stages, scores) live beside the run's data when that is a
    # bucket, so a run scheduled on another machine finds them.
    results = result_storage(storage, out)
    shards = ingest_flow.with_options(result_storage=results)(
        dataset, root, out, splits, split_file, force=force, sbd_root=sbd_root,
        context_root=context_root, protocol=protocol, allow_missing=allow_missing,
        compute_hha=compute_hha, synthetic_size=synthetic_size)
    split = split or cfg.val_split
    stages = train_flow.with_options(result_storage=results)(
        config, shards["data"], shards["fingerprint"], storage, None, force, overrides)
    to_score = stages if evaluate_every_stage else stages[-1:]
    evals = evaluate_flow.with_options(result_storage=results)(
        [s["checkpoint"] for s in to_score], shards["data"], split,
        [s["stage"] for s in to_score], force=force)
    final = evals[-1]
    reg = register_task(stages[-1]["checkpoint"], shards["data"], split, final["metrics"],
                        model_name or f"fcn-{dataset}", cfg.digest(), final["mlflow_run"],
                        stages[-1]["mlflow_run"])
    publish_decision(reg, final["mlflow_run"])
    summary = {"dataset": shards, "stages": stages, "evaluations": evals, "registration": reg}
    if reg.get("reused"):  # a scheduled run on unchanged data and config
        logger.info(f"{reg['name']} version {reg['version']} was registered from this "
                    f"checkpoint before: {reg['decision']}")
    else:
        logger.info(f"registered {reg['name']} version {reg['version']}: {reg['decision']}")
    return summary
