"""``fcn experiment``: a grid of configs (the paper's tables) through the pipeline, one table.

The experiment flow ingests the data once, then runs each row as its own subflow (train its
stages, evaluate the final net, measure it), so a failed row fails alone and the table is
still written. Everything a row computes is a cached task (stages by data, config and start
checkpoint; measurements by checkpoint): a second run of the same file trains nothing, and a
rerun after a failure runs only the rows that failed. Each row is an MLflow run under one
parent run, which holds the table (markdown, JSON table, bar chart).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from flows.pipeline import ingest_flow, train_stages
from flows.results import result_storage
from flows.tasks import SHORT, _digest, _hours, _job, _on_cluster, retry_transient, run_link
from pipelines.experiment import GMAC_SIZE

if TYPE_CHECKING:
    from pipelines.experiment import Experiment


def _measure_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    size = params.get("size", GMAC_SIZE)  # the key before sizes other than 500 existed
    # "params-v2": parameters counted without the fixed upsampling (rows measured before
    # counted it) are measured again once.
    return _digest("measure", params["checkpoint"], params["fingerprint"], params["split"],
                   *([] if size == GMAC_SIZE else [str(size)]), "params-v2")


@task(name="measure", retries=1, retry_delay_seconds=10, cache_key_fn=_measure_key,
      persist_result=True, task_run_name="measure-{label}", retry_condition_fn=retry_transient,
      timeout_seconds=_hours(6))
def measure_task(checkpoint: str, data: str, fingerprint: str, split: str,
                 label: str, size: int = GMAC_SIZE) -> dict[str, Any]:
    """The row's final net: scored on the split (an MLflow evaluation run), its size and
    GMAC (its inference speed: ``speed_task``, with the other rows')."""
    from pipelines import storage
    from pipelines.evaluate import evaluate
    from pipelines.experiment import measure_net

    logger = get_run_logger()
    if _on_cluster():
        summary = _job(["evaluate", "--model", checkpoint, "--data", data, "--split", split,
                        "--run-name", f"evaluate-{label}"], storage.join(data, "_jobs"))
    else:
        summary = evaluate(checkpoint, data, split, run_name=f"evaluate-{label}",
                           log=logger.info).summary()
    return {"metrics": summary["metrics"], "evaluation_run": summary["mlflow_run"],
            "net": measure_net(checkpoint, size=size, log=logger.info)}


@task(name="inference-speed", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient, timeout_seconds=_hours(6))
def speed_task(checkpoints: dict[str, str], data: str, split: str) -> dict[str, float]:
    """Every finished row's inference images/s, the nets measured together and interleaved
    once all have trained (never cached: one table, one machine, one hour)."""
    from pipelines.experiment import inference_speeds

    return inference_speeds(checkpoints, data, split, log=get_run_logger().info)


@task(name="start-experiment-run", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient, timeout_seconds=SHORT)
def start_experiment_task(name: str, dataset: str, source: str, fingerprint: str) -> str:
    from mlflow.tracking import MlflowClient
    from prefect.runtime import flow_run

    from pipelines.tracking import experiment_id, tracking_uri

    client = MlflowClient(tracking_uri())
    exp = experiment_id(client, f"fcn-{dataset}")
    tags = {"fcn_experiment": name, "experiment_file": source,
            "manifest_fingerprint": fingerprint}
    if flow_run.id:
        tags["prefect_flow_run_id"] = str(flow_run.id)
    run_id = client.create_run(exp, run_name=f"experiment-{name}", tags=tags).info.run_id
    get_run_logger().info(f"MLflow parent run: {run_link(run_id)}")
    return run_id


@task(name="log-row", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient, timeout_seconds=SHORT)
def log_row_task(parent: str, row: dict[str, Any], config: dict[str, Any]) -> str:
    """The row as a child run of the experiment's parent: its config as params, the table's
    numbers as metrics, links to its training and evaluation runs as tags."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from pipelines.experiment import COLUMNS
    from pipelines.tracking import flatten, tracking_uri

    client = MlflowClient(tracking_uri())
    exp = client.get_run(parent).info.experiment_id
    tags = {"mlflow.parentRunId": parent, "fcn_experiment_row": row["label"],
            "checkpoint": row["checkpoint"], "evaluation_run_id": row["evaluation_run"] or "",
            "training_runs": ",".join(s["mlflow_run"] or "" for s in row["stages"])}
    run_id = client.create_run(exp, run_name=row["label"], tags=tags).info.run_id
    params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
    metrics = [Metric(k, float(row[k]), 0, 0) for k, _, _ in COLUMNS
               if isinstance(row.get(k), float) and not math.isnan(row[k])]
    client.log_batch(run_id, metrics=metrics, params=params[:100],
                     tags=[RunTag(k, str(v)) for k, v in {"label": row["label"]}.items()])
    for i in range(100, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    client.set_terminated(run_id, "FINISHED")
    return run_id


@flow(name="experiment-row", log_prints=True)
def experiment_row(config: dict[str, Any], label: str, data: str, fingerprint: str,
                   split: str, storage: str | None = None, force: bool = False,
                   size: int = GMAC_SIZE) -> dict[str, Any]:
    """One row: its stages (cached), then its final net scored and sized (cached). Its
    inference speed and its MLflow run come once every row has trained (``_finish_rows``)."""
    from pipelines.experiment import train_speed

    stages = train_stages(config, data, fingerprint, storage, None, force)
    final = stages[-1]
    m = measure_task.with_options(refresh_cache=force)(final["checkpoint"], data, fingerprint,
                                                       split, label, size)
    row = {"label": label, **m["metrics"], **m["net"], "train_img_s": train_speed(stages),
           "checkpoint": final["checkpoint"], "evaluation_run": m["evaluation_run"],
           "stages": [{"stage": s["stage"], "steps": s["steps"], "mlflow_run": s["mlflow_run"]}
                      for s in stages]}
    row.pop("infer_img_s", None)  # a measurement cached before speed_task existed
    return row


@task(name="experiment-table", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      timeout_seconds=SHORT)
def table_task(spec: str, rows: list[str] | None, results: list[dict[str, Any]],
               folder: str, parent: str, ok: bool) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    from flows import reports
    from pipelines.experiment import load_experiment, markdown
    from pipelines.experiment import log_table as write_table
    from pipelines.tracking import tracking_uri

    exp = load_experiment(spec)
    exp = exp.only(rows) if rows else exp
    out = write_table(exp, results, folder, parent, log=get_run_logger().info)
    reports.publish(f"fcn-experiment-{exp.name}".lower().replace("_", "-"),
                    markdown(exp, results), exp.title)
    MlflowClient(tracking_uri()).set_terminated(parent, "FINISHED" if ok else "FAILED")
    return out


@flow(name="fcn-experiment", log_prints=True)
def experiment_flow(spec: str, root: str, out: str | None = None, storage: str | None = None,
                    rows: list[str] | None = None, force: bool = False,
                    sbd_root: str | None = None, context_root: str | None = None,
                    protocol: str | None = None, synthetic_size: int = 128) -> dict[str, Any]:
    """ingest (cached) -> every row (its own subflow) -> the table. A failed row is reported
    in the table and the result; the others still run."""
    from pipelines import storage as store
    from pipelines.experiment import load_experiment
    from pipelines.tracking import data_dir

    exp = load_experiment(spec)
    exp = exp.only(rows) if rows else exp
    results_at = result_storage(storage, out)
    shards = ingest_flow.with_options(result_storage=results_at)(
        exp.dataset, root, out, None, None, synthetic_size=synthetic_size, force=force,
        sbd_root=sbd_root, context_root=context_root, protocol=protocol)
    parent = start_experiment_task(exp.name, exp.dataset, exp.source, shards["fingerprint"])
    results: list[dict[str, Any]] = []
    try:
        _run_rows(exp, shards, storage, force, results_at, results)
        _finish_rows(exp, shards["data"], parent, results)
    except BaseException as exc:  # Ctrl-C in a row, or the orchestration failing
        from mlflow.tracking import MlflowClient

        from pipelines.tracking import tracking_uri
        from pipelines.train.driver import FAILURE_TAG, end_status, failure

        client = MlflowClient(tracking_uri())
        if failure(exc):
            client.set_tag(parent, FAILURE_TAG, failure(exc))
        client.set_terminated(parent, end_status(exc))
        if isinstance(exc, KeyboardInterrupt):
            exc.add_note("MLflow runs marked KILLED; the same command again takes what "
                         "finished from the cache")
        raise
    failed = [r["label"] for r in results if r.get("error")]
    folder = store.join(str(data_dir()), "experiments", exp.name)
    table = table_task(spec, rows, results, folder, parent, not failed)
    return {"experiment": exp.name, "rows": results, "failed": failed, "table": table,
            "mlflow_parent": parent}


def _run_rows(exp: Experiment, shards: dict[str, Any], storage: str | None, force: bool,
              results_at: Any, results: list[dict[str, Any]]) -> None:
    """Each row as its own subflow, in order; a row that fails is a result with its error."""
    logger = get_run_logger()
    for i, row in enumerate(exp.rows, 1):
        logger.info(f"row {i}/{len(exp.rows)}: {row.label}")
        state = experiment_row.with_options(
            flow_run_name=f"{exp.name}-{row.slug}",
            result_storage=results_at)(
            row.config.to_dict(), row.label, shards["data"], shards["fingerprint"], exp.split,
            storage, force, exp.size, return_state=True)
        if state.is_completed():
            results.append(state.result())
        else:
            exc = state.result(raise_on_failure=False)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            logger.error(f"row {row.label} failed: {first}")
            results.append({"label": row.label, "error": first[:300]})


def _finish_rows(exp: Experiment, data: str, parent: str,
                 results: list[dict[str, Any]]) -> None:
    """The finished rows' inference speeds, measured together, then each row's MLflow run
    (a child of the experiment's) with every number of the table."""
    done = [r for r in results if not r.get("error")]
    if not done:
        return
    speeds = speed_task({r["label"]: r["checkpoint"] for r in done}, data, exp.split)
    configs = {row.label: row.config.to_dict() for row in exp.rows}
    for r in done:
        r["infer_img_s"] = speeds[r["label"]]
        r["mlflow_run"] = log_row_task(parent, r, configs[r["label"]])
