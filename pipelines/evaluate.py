"""Evaluation over a manifest split: a Ray task per shard reads it into the object store, a pool
of scoring actors kept between evaluations (``pipelines.scorer_pool``; each call loads its
model into them) scores parts of the shards into confusion matrices, merged into one in the
driver.

Every image is scored whole and alone (no padding), exactly as the reference score.py does.
A net with two heads (SIFT Flow: semantic and geometric) is scored on both, each against its
own label column. Each dataset's reference protocol applies (``datasets.Dataset``): SIFT Flow
leaves cow, desert and moon (absent from its test set) out of the class means and skips the
two unannotated images.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fcn_core.inference import InferenceOptions
from fcn_core.metrics import ConfusionMatrix
from pipelines.errors import UsageError

Log = Callable[[str], None]
ROW_COLUMNS = ("image", "label", "label_geo", "depth", "hha")
LABEL_COLUMNS = ("label", "label_geo")  # a net's first head reads label, a second label_geo


@dataclass(frozen=True)
class HeadSpec:
    """One score head to evaluate: the net's head, its label column and its classes."""

    head: str | None  # the net's head name (None: a single-head net)
    column: str  # label | label_geo
    classes: tuple[str, ...]
    exclude: tuple[int, ...] = ()  # classes left out of the class means (the protocol's)


@dataclass
class HeadResult:
    metrics: dict[str, float]  # pixel_acc, mean_acc, mean_iu, fw_iu
    per_class: list[tuple[str, float]]  # (class name, IU or NaN)
    hist: np.ndarray
    excluded: tuple[str, ...] = ()  # class names left out of the means


@dataclass
class EvalResult:
    model: str
    split: str
    metrics: dict[str, float]  # the first head's pixel_acc, mean_acc, mean_iu, fw_iu
    per_class: list[tuple[str, float]]  # (class name, IU or NaN)
    hist: np.ndarray
    images: int
    run_id: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    heads: dict[str, HeadResult] = field(default_factory=dict)  # every head, by name
    skipped: tuple[str, ...] = ()  # ids the protocol does not score (unannotated)

    def summary(self) -> dict[str, Any]:
        """What a caller (a Prefect task, a Ray job's --result-json) needs: JSON-ready."""
        def iu(per_class: list[tuple[str, float]]) -> dict[str, float | None]:
            return {n: (None if np.isnan(v) else float(v)) for n, v in per_class}

        out = {"model": self.model, "split": self.split, "metrics": self.metrics,
               "per_class_iu": iu(self.per_class), "images": self.images,
               "mlflow_run": self.run_id}
        if len(self.heads) > 1 or any(h.excluded for h in self.heads.values()):
            out["heads"] = {n: {"metrics": h.metrics, "per_class_iu": iu(h.per_class),
                                "excluded_classes": list(h.excluded)}
                            for n, h in self.heads.items()}
        if self.skipped:
            out["skipped_ids"] = list(self.skipped)
        return out

    def flat_metrics(self) -> dict[str, float]:
        """The first head's metrics as they are, a second head's prefixed with its name."""
        out = dict(self.metrics)
        for i, (name, h) in enumerate(self.heads.items()):
            if i:
                out.update({f"{name}_{k}": v for k, v in h.metrics.items()})
        return out

    def table(self, compact: bool = False) -> str:
        """Metrics and per-class IU; ``compact``: the classes without a pixel in the split
        (IU undefined, "-" in the full table) on one line instead of a row each."""
        lines = [f"{self.model} on {self.split} ({self.images} images"
                 + (f"; not scored, as the reference: {', '.join(self.skipped)}"
                    if self.skipped else "") + ")"]
        heads = self.heads or {"": HeadResult(self.metrics, self.per_class, self.hist)}
        for name, h in heads.items():
            if len(heads) > 1:
                lines += ["", f"[{name}]"]
            lines += ["  ".join(f"{k} {v:.4f}" for k, v in h.metrics.items())]
            if h.excluded:
                lines += [f"(class means leave out {', '.join(h.excluded)}: absent from the "
                          "test set, as the reference)"]
            absent = [n for n, v in h.per_class if np.isnan(v) and n not in h.excluded]
            rows = [(n, v) for n, v in h.per_class if not (compact and n in absent)]
            lines += ["", f"{'class':<20}{'IU':>8}"]
            lines += [f"{n:<20}"
                      f"{'excluded' if n in h.excluded else '-' if np.isnan(v) else f'{v:.4f}':>8}"
                      for n, v in rows]
            if compact and absent:
                lines += [f"(no pixels in this split, IU undefined: {', '.join(absent)})"]
        return "\n".join(lines)


def eval_heads(net: Any, manifest: Any) -> list[HeadSpec]:
    """The heads to score and their protocol: the first head against ``label`` with the
    manifest's classes, a second (SIFT Flow geometric) against ``label_geo``."""
    from fcn_core.palettes import CLASSES
    from pipelines.sources.datasets import DATASETS

    dataset = manifest.data["dataset"]
    proto = DATASETS.get(dataset)
    classes = tuple(manifest.data["classes"])
    exclude = tuple(classes.index(c) for c in (proto.eval_exclude_classes if proto else ())
                    if c in classes)
    heads = dict(getattr(getattr(net, "config", None), "heads", {}) or {})
    if len(heads) <= 1:
        return [HeadSpec(None, "label", classes, exclude)]
    if "label_geo" not in manifest.data["columns"]:
        raise UsageError(f"the model has heads {', '.join(heads)}, but {dataset} rows have "
                         "no second label (label_geo)")
    names = list(heads)
    geo = tuple(CLASSES.get(f"{dataset}_geo", ())) or tuple(
        f"class_{i}" for i in range(heads[names[1]]))
    return [HeadSpec(names[0], "label", classes, exclude),
            HeadSpec(names[1], "label_geo", geo)][: len(LABEL_COLUMNS)]


def skipped_ids(manifest: Any) -> tuple[str, ...]:
    from pipelines.sources.datasets import DATASETS

    proto = DATASETS.get(manifest.data["dataset"])
    return proto.eval_exclude_ids if proto else ()


def ray_cpus() -> float:
    """CPUs Ray assigned to the current task or actor (1 when unknown)."""
    import ray

    try:
        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:  # not inside Ray
        return 1.0


class Scorer:
    """Ray Data UDF (a callable class: one model load per actor)."""

    def __init__(self, model_uri: str, tracking_uri: str | None, heads: list[dict[str, Any]],
                 options: dict[str, Any], skip: tuple[str, ...] = (), use_gpu: bool = False,
                 threads: int | None = None):
        """``threads``: torch's on the CPU (None: the CPUs Ray assigned; 0: leave them)."""
        import torch

        from fcn_core.precision import pick_device
        from pipelines.registry import resolve_model

        self.device = pick_device(use_gpu)  # Ray set CUDA_VISIBLE_DEVICES to this actor's GPU
        n = max(1, int(ray_cpus())) if threads is None else threads
        if self.device.type == "cpu" and n > 0:
            torch.set_num_threads(n)
        self.loaded = resolve_model(model_uri, tracking_uri)
        self.loaded.net.to(self.device)
        self.heads = [HeadSpec(h["head"], h["column"], tuple(h["classes"]),
                               tuple(h["exclude"])) for h in heads]
        self.skip = set(skip)
        self.options = InferenceOptions(**{k: tuple(v) if k == "scales" else v
                                           for k, v in options.items()})

    @classmethod
    def here(cls, loaded: Any, heads: list[HeadSpec], skip: tuple[str, ...],
             options: InferenceOptions) -> Scorer:
        """A scorer in this process, on the CPU, for a model already loaded."""
        import torch

        self = cls.__new__(cls)
        self.device, self.loaded, self.heads = torch.device("cpu"), loaded, list(heads)
        self.skip, self.options = set(skip), options
        return self

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cms = [ConfusionMatrix(len(h.classes)) for h in self.heads]
        images = 0
        for i in range(len(batch["image"])):
            if str(batch["id"][i]) in self.skip:
                continue
            row = {k: batch[k][i] for k in ROW_COLUMNS if k in batch}
            for cm, (label, pred) in zip(cms, predict_heads(self.loaded, row, self.options,
                                                            self.device, self.heads),
                                         strict=True):
                cm.update(label, pred)
            images += 1
        out = {f"hist_{k}": cm.hist.reshape(1, -1) for k, cm in enumerate(cms)}
        return {**out, "images": np.array([images])}


def actor_cpus(actors: int) -> float:
    """CPUs to reserve per inference actor: the cluster's CPUs less one for reading, shared,
    at most 1 each."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    return max(0.25, min(1.0, (cpus - 1) / max(1, actors)))


def actor_resources(actors: int, use_gpu: bool) -> dict[str, float]:
    """Ray options of one inference actor (``map_batches``): a whole GPU and no CPU reservation
    (the reads need the CPUs), or a share of the CPUs (``actor_cpus``).

    ``max_restarts=0``: Ray Data keeps an actor's constructor arguments in the object store,
    and Ray's core worker prints an error line for every such actor that may restart
    (ray-project/ray#53727). A lost actor fails the call instead, and Prefect's retry of the
    task (``retry_transient``: lost workers are transient) runs it again."""
    if use_gpu:
        return {"num_cpus": 0, "num_gpus": 1, "max_restarts": 0}
    return {"num_cpus": actor_cpus(actors), "num_gpus": 0, "max_restarts": 0}


def predict_row(loaded: Any, row: dict[str, Any], options: InferenceOptions, device: Any
                ) -> tuple[np.ndarray, np.ndarray]:
    """One shard row -> (label (H, W), predicted class ids (H, W)) of the first head."""
    return predict_heads(loaded, row, options, device, [HeadSpec(None, "label", ())])[0]


def predict_heads(loaded: Any, row: dict[str, Any], options: InferenceOptions, device: Any,
                  heads: list[HeadSpec]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One shard row -> (label, predicted class ids), both (H, W), per head."""
    from fcn_core.inference import predict_scores
    from pipelines.shards import model_input, training_batch

    b = training_batch({k: [v] for k, v in row.items() if v is not None})
    x, labels = model_input(b, loaded.mean_bgr, device, loaded.input)
    out = []
    for h in heads:
        pred = predict_scores(loaded.net, x, options, h.head, loaded.mean_bgr).argmax(1)
        out.append((labels[h.column][0].cpu().numpy(), pred[0].cpu().numpy()))
    return out


PROGRESS_EVERY_S = 30.0  # a progress line at most this often in a long evaluation

# A split this small is scored in the calling process when no actor count is given: two
# actors' start-up (a process each, torch, the model) costs more than scoring it.
SMALL_SPLIT = 64


def evaluate(model_uri: str, data: str | Path, split: str = "val", *,
             options: InferenceOptions | None = None, actors: int | None = None,
             batch_size: int = 4, use_gpu: bool = False, log_to_mlflow: bool = True,
             run_name: str | None = None, samples: int = 4, log: Log = print) -> EvalResult:
    """Score ``model_uri`` on a split of an ingested dataset with Ray Data (``actors``
    actors; by default 2, or this process for a split of at most ``SMALL_SPLIT`` rows on the
    CPU), and log metrics.json, the per-class table, a confusion-matrix image and sample
    predictions to an MLflow run."""
    from pipelines.registry import is_mlflow_uri, resolve_model
    from pipelines.shards import read_manifest
    from pipelines.tracking import tracking_uri

    options = options or InferenceOptions()
    manifest = read_manifest(data)
    manifest.shard_paths(split)  # an unknown split fails now, before the model loads
    uri = tracking_uri() if is_mlflow_uri(model_uri) else None
    loaded = resolve_model(model_uri, uri)  # fail here, in one line, not in every actor
    from pipelines.predict import check_options

    check_options(loaded, options, model_uri)
    heads = eval_heads(loaded.net, manifest)
    skip = skipped_ids(manifest)
    rows = int(manifest.data["splits"][split]["rows"])
    if actors is None and rows <= SMALL_SPLIT and not use_gpu:
        log(f"evaluating {loaded.source} on {data} [{split}] in this process ({rows} rows; "
            f"--actors N scores with Ray actors)")
        cms, images = _score_here(loaded, data, split, manifest, heads, skip, options,
                                  batch_size)
    else:
        actors = actors or 2
        log(f"evaluating {loaded.source} on {data} [{split}] with {actors} Ray actor(s)")
        cms, images = _score_on_ray(model_uri, uri, data, split, manifest, heads, skip, options,
                                    actors, batch_size, use_gpu, log)
    return _finish(model_uri, data, split, manifest, heads, skip, options, cms, images,
                   log_to_mlflow, run_name, samples, loaded)


def _score_here(loaded: Any, data: str | Path, split: str, manifest: Any,
                heads: list[HeadSpec], skip: tuple[str, ...], options: InferenceOptions,
                batch_size: int) -> tuple[list[ConfusionMatrix], int]:
    """The Ray actors' scoring, in this process: the split read from its shards in batches."""
    from pipelines.shards import read_split_table

    scorer = Scorer.here(loaded, heads, skip, options)
    columns = ["id", *(c for c in ROW_COLUMNS if c in manifest.data["columns"])]
    cms, images = [ConfusionMatrix(len(h.classes)) for h in heads], 0
    for batch in table_batches(read_split_table(data, split, columns), batch_size):
        images += _add(cms, scorer(batch))
    return cms, images


def table_batches(table: Any, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """An Arrow table as ``Scorer`` batches: columns of Python objects, ``batch_size`` rows."""
    for chunk in table.to_batches(max_chunksize=batch_size):
        batch = {}
        for name in chunk.column_names:
            col = np.empty(chunk.num_rows, dtype=object)
            col[:] = chunk.column(name).to_pylist()
            batch[name] = col
        yield batch


def _add(cms: list[ConfusionMatrix], out: dict[str, np.ndarray]) -> int:
    """Add a scored batch (or several, summed; {} for none) to ``cms``; its image count."""
    if not out:
        return 0
    for k, cm in enumerate(cms):
        n = cm.num_classes
        cm.hist += np.asarray(out[f"hist_{k}"], np.int64).reshape(-1, n, n).sum(0)
    return int(np.sum(out["images"]))


def _score_on_ray(model_uri: str, uri: str | None, data: str | Path, split: str,
                  manifest: Any, heads: list[HeadSpec], skip: tuple[str, ...],
                  options: InferenceOptions, actors: int, batch_size: int, use_gpu: bool,
                  log: Log) -> tuple[list[ConfusionMatrix], int]:
    """A Ray task per shard reads the split; the scoring actors (``pipelines.scorer_pool``:
    kept for the next evaluation in this driver) take a batch of a shard at a time."""
    from pipelines import scorer_pool
    from pipelines.ray_env import check_gpus, init_ray
    from pipelines.shards import ManifestError

    log(init_ray())
    note = check_gpus(actors, "actor", "lower --actors") if use_gpu else None
    if note:
        log(note)
    shards = manifest.shards(split)
    if not shards:
        raise ManifestError(f"split {split!r} of {data} has no rows")
    columns = ["id", *(c for c in ROW_COLUMNS if c in manifest.data["columns"])]
    threads = 0 if use_gpu else max(1, int(actor_cpus(actors)))
    spec = {"model_uri": model_uri, "tracking_uri": uri, "heads": [asdict(h) for h in heads],
            "options": asdict(options), "skip": skip, "use_gpu": use_gpu}
    rows = int(manifest.data["splits"][split]["rows"])
    cms, images = [ConfusionMatrix(len(h.classes)) for h in heads], 0
    with scorer_pool.borrowed(actors, threads, use_gpu) as handles:
        loading = scorer_pool.load(handles, spec)  # while the shards are read
        refs = scorer_pool.read_blocks([loc for loc, _ in shards], columns)
        blocks = zip(refs, [n for _, n in shards], strict=True)  # lazily: reads go ahead
        t0 = last = time.monotonic()
        for out in scorer_pool.score_blocks(handles, blocks, loading, batch_size,
                                            depth=2 if use_gpu else 1):
            images += _add(cms, out)
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S and images < rows:
                last = now
                log(f"evaluate [{split}]: {images}/{rows} images scored "
                    f"({images / (now - t0):.2f}/s)")
    return cms, images


def _finish(model_uri: str, data: str | Path, split: str, manifest: Any,
            heads: list[HeadSpec], skip: tuple[str, ...], options: InferenceOptions,
            cms: list[ConfusionMatrix], images: int, log_to_mlflow: bool,
            run_name: str | None, samples: int, loaded: Any) -> EvalResult:
    from pipelines.shards import read_split_table

    results = {}
    for h, cm in zip(heads, cms, strict=True):
        scores = cm.scores(h.exclude)
        results[h.head or "out"] = HeadResult(
            {k: float(v) for k, v in scores.items() if k != "per_class_iu"},
            list(zip(h.classes, scores["per_class_iu"], strict=True)), cm.hist,
            tuple(h.classes[i] for i in h.exclude))
    first = next(iter(results.values()))
    seen = set(read_split_table(data, split, ["id"])["id"].to_pylist()) if skip else set()
    result = EvalResult(model_uri, split, first.metrics, first.per_class, first.hist, images,
                        heads=results, skipped=tuple(i for i in skip if i in seen))
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
    for k, v in result.flat_metrics().items():
        client.log_metric(run_id, k, v)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "metrics.json").write_text(json.dumps(
            {**result.metrics, "per_class_iu": dict(result.per_class), "images": result.images,
             "split": split, "model": result.model, **{k: v for k, v in result.summary().items()
                                                       if k in ("heads", "skipped_ids")}},
            indent=2, default=float))
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
