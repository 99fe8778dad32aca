"""Evaluation over a manifest split: Ray Data batch inference on an actor pool (each actor
loads the model once), one ConfusionMatrix per batch, merged into one in the driver.

Every image is scored whole and alone (no padding), exactly as the reference score.py does.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fcn_core.inference import InferenceOptions
from fcn_core.metrics import ConfusionMatrix
from pipelines.errors import UsageError

Log = Callable[[str], None]
ROW_COLUMNS = ("image", "label", "label_geo", "depth", "hha")


@dataclass
class EvalResult:
    model: str
    split: str
    metrics: dict[str, float]  # pixel_acc, mean_acc, mean_iu, fw_iu
    per_class: list[tuple[str, float]]  # (class name, IU or NaN)
    hist: np.ndarray
    images: int
    run_id: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What a caller (a Prefect task, a Ray job's --result-json) needs: JSON-ready."""
        return {"model": self.model, "split": self.split, "metrics": self.metrics,
                "per_class_iu": {n: (None if np.isnan(v) else float(v))
                                 for n, v in self.per_class},
                "images": self.images, "mlflow_run": self.run_id}

    def table(self) -> str:
        lines = [f"{self.model} on {self.split} ({self.images} images)",
                 "  ".join(f"{k} {v:.4f}" for k, v in self.metrics.items()), "",
                 f"{'class':<20}{'IU':>8}"]
        lines += [f"{n:<20}{'-' if np.isnan(v) else f'{v:.4f}':>8}" for n, v in self.per_class]
        return "\n".join(lines)


def ray_cpus() -> float:
    """CPUs Ray assigned to the current task or actor (1 when unknown)."""
    import ray

    try:
        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:  # not inside Ray
        return 1.0


class Scorer:
    """Ray Data UDF (a callable class: one model load per actor)."""

    def __init__(self, model_uri: str, tracking_uri: str | None, num_classes: int,
                 options: dict[str, Any], use_gpu: bool = False):
        import torch

        from pipelines.registry import resolve_model

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(ray_cpus())))
        self.loaded = resolve_model(model_uri, tracking_uri)
        self.loaded.net.to(self.device)
        self.num_classes = num_classes
        self.options = InferenceOptions(**{k: tuple(v) if k == "scales" else v
                                           for k, v in options.items()})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cm = ConfusionMatrix(self.num_classes)
        for i in range(len(batch["image"])):
            row = {k: batch[k][i] for k in ROW_COLUMNS if k in batch}
            label, pred = predict_row(self.loaded, row, self.options, self.device)
            cm.update(label, pred)
        return {"hist": cm.hist.reshape(1, -1), "images": np.array([len(batch["image"])])}


def actor_cpus(actors: int) -> float:
    """CPUs to reserve per inference actor: the cluster's CPUs less one for reading, shared,
    at most 1 each."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    return max(0.25, min(1.0, (cpus - 1) / max(1, actors)))


def predict_row(loaded: Any, row: dict[str, Any], options: InferenceOptions, device: Any
                ) -> tuple[np.ndarray, np.ndarray]:
    """One shard row -> (label (H, W), predicted class ids (H, W))."""
    from fcn_core.inference import predict_scores
    from pipelines.shards import model_input, training_batch

    b = training_batch({k: [v] for k, v in row.items() if v is not None})
    x, labels = model_input(b, loaded.mean_bgr, device, loaded.input)
    pred = predict_scores(loaded.net, x, options).argmax(1)
    return labels["label"][0].cpu().numpy(), pred[0].cpu().numpy()


def evaluate(model_uri: str, data: str | Path, split: str = "val", *,
             options: InferenceOptions | None = None, actors: int = 2,
             batch_size: int = 4, use_gpu: bool = False, log_to_mlflow: bool = True,
             run_name: str | None = None, samples: int = 4, log: Log = print) -> EvalResult:
    """Score ``model_uri`` on a split of an ingested dataset with Ray Data, and log
    metrics.json, the per-class table, a confusion-matrix image and sample predictions to
    an MLflow run."""
    from ray.data import ActorPoolStrategy

    from pipelines.ray_env import init_ray
    from pipelines.registry import is_mlflow_uri, resolve_model
    from pipelines.shards import open_split, read_manifest
    from pipelines.tracking import tracking_uri

    options = options or InferenceOptions()
    manifest = read_manifest(data)
    manifest.shard_paths(split)  # an unknown split fails now, before the model loads
    n = manifest.num_classes
    uri = tracking_uri() if is_mlflow_uri(model_uri) else None
    loaded = resolve_model(model_uri, uri)  # fail here, in one line, not in every actor
    log(f"evaluating {loaded.source} on {data} [{split}] with {actors} Ray actor(s)")
    log(init_ray())
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = open_split(data, split).select_columns(
        [c for c in ROW_COLUMNS if c in manifest.data["columns"]])
    # An actor takes whole blocks and Ray Data reads small Parquet files as one block:
    # give every actor several.
    if len(manifest.shard_paths(split)) < 4 * actors:
        ds = ds.repartition(4 * actors)
    scored = ds.map_batches(
        Scorer, fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": uri,
                                       "num_classes": n, "options": asdict(options),
                                       "use_gpu": use_gpu},
        batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
        # Fractional CPUs: actors holding every CPU would starve the Parquet reads (a hang
        # on small machines); torch threads are set to match in the actor.
        num_cpus=actor_cpus(actors) if not use_gpu else 0, num_gpus=1 if use_gpu else 0)
    cm, images = ConfusionMatrix(n), 0
    for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
        for h, k in zip(batch["hist"], batch["images"], strict=True):
            cm.hist += np.asarray(h, np.int64).reshape(n, n)
            images += int(k)
    scores = cm.scores()
    classes = manifest.data["classes"]
    result = EvalResult(model_uri, split, {k: float(v) for k, v in scores.items()
                                           if k != "per_class_iu"},
                        list(zip(classes, scores["per_class_iu"], strict=True)), cm.hist,
                        images)
    if log_to_mlflow:
        _log_result(result, manifest, data, split, options, run_name, samples, loaded)
    return result


def _log_result(result: EvalResult, manifest: Any, data: Any, split: str,
                options: InferenceOptions, run_name: str | None, samples: int,
                loaded: Any) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import experiment_id, tracking_uri

    client = MlflowClient(tracking_uri())
    exp = experiment_id(client, f"fcn-{manifest.data['dataset']}")
    run_id = client.create_run(exp, run_name=run_name or f"evaluate-{split}",
                               tags={"model": result.model, "split": split,
                                     "manifest_fingerprint": manifest.fingerprint}).info.run_id
    for k, v in asdict(options).items():
        client.log_param(run_id, f"inference.{k}", str(v))
    for k, v in result.metrics.items():
        client.log_metric(run_id, k, v)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "metrics.json").write_text(json.dumps(
            {**result.metrics, "per_class_iu": dict(result.per_class), "images": result.images,
             "split": split, "model": result.model}, indent=2, default=float))
        (d / "per_class_iu.md").write_text(result.table() + "\n")
        np.savetxt(d / "confusion_matrix.csv", result.hist, fmt="%d", delimiter=",")
        confusion_image(result.hist).save(d / "confusion_matrix.png")
        sample_grid(loaded, data, split, samples).save(d / "samples.png")
        for f in sorted(d.iterdir()):
            client.log_artifact(run_id, str(f))
            result.artifacts[f.name] = f"runs:/{run_id}/{f.name}"
    client.set_terminated(run_id, "FINISHED")
    result.run_id = run_id


def evaluation_metrics(run_id: str) -> dict[str, float]:
    """The metrics an evaluation run logged (pixel_acc, mean_acc, mean_iu, fw_iu)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri

    try:
        metrics = MlflowClient(tracking_uri()).get_run(run_id).data.metrics
    except MlflowException as e:
        raise UsageError(f"--metrics-from-run {run_id}: no such MLflow run "
                         f"({e.message.splitlines()[0]})") from None
    if "mean_iu" not in metrics:
        raise UsageError(f"--metrics-from-run {run_id}: not an evaluation run (no mean_iu "
                         "metric); give the run `fcn evaluate` printed")
    return {k: float(metrics[k]) for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")
            if k in metrics}


def confusion_image(hist: np.ndarray, cell: int = 12) -> Any:
    """Row-normalised confusion matrix as a picture (ground truth down, prediction across)."""
    from PIL import Image

    rows = hist.sum(1, keepdims=True)
    norm = np.divide(hist, rows, out=np.zeros(hist.shape, float), where=rows > 0)
    shade = (255 * (1 - norm)).astype(np.uint8)  # white = 0, black = all of the row
    rgb = np.stack([shade, shade, np.full_like(shade, 255)], -1)
    rgb[np.eye(len(hist), dtype=bool) & (rows[:, 0] > 0)[:, None]] //= 2  # darker diagonal
    return Image.fromarray(rgb.repeat(cell, 0).repeat(cell, 1))


def sample_grid(loaded: Any, data: Any, split: str, n: int) -> Any:
    """image | ground truth | prediction, in the dataset's colour map, for n examples."""
    from PIL import Image

    from fcn_core.palettes import colorize
    from pipelines.shards import decode_arrays, read_split_table

    rows = read_split_table(data, split, list(ROW_COLUMNS)).slice(0, max(1, n)).to_pylist()
    strips = []
    for row in rows:
        label, pred = predict_row(loaded, row, InferenceOptions(), "cpu")
        image = decode_arrays(row)["image"]
        strips.append(np.concatenate([image, colorize(label), colorize(pred)], axis=1))
    width = max(s.shape[1] for s in strips)
    strips = [np.pad(s, ((0, 4), (0, width - s.shape[1]), (0, 0))) for s in strips]
    return Image.fromarray(np.concatenate(strips, axis=0).astype(np.uint8))
