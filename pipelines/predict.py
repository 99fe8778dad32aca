"""Inference on image files and folders: class-id PNGs and colour overlays.

Small inputs run in this process; large folders go through Ray Data (one model load per
actor). Unreadable files are reported and skipped; every readable one is written.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fcn_core.inference import InferenceOptions
from pipelines import storage
from pipelines.storage import StoragePath

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}
Log = Callable[[str], None]


@dataclass
class PredictResult:
    written: list[str] = field(default_factory=list)  # the class-id PNGs
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def collect_inputs(inputs: Sequence[str]) -> tuple[list[StoragePath], list[tuple[str, str]]]:
    """Files as given, folders searched recursively for images; missing ones reported.
    Paths and URIs (s3://bucket/images/) alike."""
    files, missing = [], []
    for item in inputs:
        p = storage.path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            missing.append((item, "no such file or folder"))
    return files, missing


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image blended with the VOC colour map of its labels (background left clear)."""
    from fcn_core.palettes import colorize

    colour = colorize(label).astype(np.float32)
    out = image.astype(np.float32)
    fg = label > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colour[fg]
    return out.round().astype(np.uint8)


def _output_names(files: list[StoragePath]) -> list[str]:
    """<stem>, made unique when two inputs share a stem (a/x.jpg, b/x.png)."""
    seen: dict[str, int] = {}
    names = []
    for f in files:
        n = seen.get(f.stem, 0)
        seen[f.stem] = n + 1
        names.append(f.stem if n == 0 else f"{f.stem}_{n}")
    return names


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def predict_one(loaded: Any, path: str, out_dir: str, name: str, options: InferenceOptions,
                device: Any = "cpu") -> tuple[str | None, str | None]:
    """(written label location, None) or (None, why it was skipped)."""
    from fcn_core.inference import predict_labels
    from pipelines.sources import decode_image

    try:
        image = decode_image(path)
    except ValueError as e:
        return None, str(e)
    (label,) = predict_labels(loaded.net, [image], loaded.mean_bgr, options, device)
    target = storage.join(out_dir, f"{name}.png")
    storage.write_bytes(target, _png(label))
    storage.write_bytes(storage.join(out_dir, f"{name}_color.png"),
                        _png(overlay(image, label)))
    return target, None


class _FolderPredictor:
    """Ray Data UDF for large folders: one model load per actor."""

    def __init__(self, model_uri: str, tracking_uri: str | None, out_dir: str,
                 options: dict[str, Any]):
        from pipelines.registry import resolve_model

        self.loaded = resolve_model(model_uri, tracking_uri)
        self.out_dir = out_dir
        self.options = InferenceOptions(**{k: tuple(v) if k == "scales" else v
                                           for k, v in options.items()})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        written, reasons = [], []
        for path, name in zip(batch["path"], batch["name"], strict=True):
            w, why = predict_one(self.loaded, str(path), self.out_dir, str(name), self.options)
            written.append(w or "")
            reasons.append(why or "")
        return {"path": batch["path"], "written": np.array(written, dtype=object),
                "reason": np.array(reasons, dtype=object)}


def predict(model_uri: str, inputs: Sequence[str], out: str, *,
            options: InferenceOptions | None = None, ray_threshold: int = 64,
            actors: int = 2, log: Log = print) -> PredictResult:
    """Predict every image in ``inputs`` into ``out``: <name>.png (uint8 class ids, the
    input's size) and <name>_color.png (overlay)."""
    from pipelines.registry import is_mlflow_uri, resolve_model
    from pipelines.tracking import tracking_uri

    options = options or InferenceOptions()
    out_dir = storage.as_location(out)
    storage.check_writable(out_dir)
    storage.makedirs(out_dir)
    files, missing = collect_inputs(inputs)
    result = PredictResult(skipped=list(missing))
    names = _output_names(files)
    if len(files) < ray_threshold:
        loaded = resolve_model(model_uri)
        for i, (f, name) in enumerate(zip(files, names, strict=True), 1):
            written, why = predict_one(loaded, str(f), out_dir, name, options)
            if written:
                result.written.append(written)
            else:
                result.skipped.append((str(f), why or "unknown"))
            if i % 10 == 0 or i == len(files):
                log(f"predicted {i}/{len(files)}")
    else:
        import ray.data
        from ray.data import ActorPoolStrategy

        from pipelines.evaluate import actor_cpus
        from pipelines.ray_env import init_ray

        log(init_ray())
        uri = tracking_uri() if is_mlflow_uri(model_uri) else None
        ds = ray.data.from_items([{"path": str(f), "name": n} for f, n in
                                  zip(files, names, strict=True)],
                                 override_num_blocks=max(1, len(files) // 16))
        done = ds.map_batches(_FolderPredictor, batch_size=16, batch_format="numpy",
                              compute=ActorPoolStrategy(size=actors),
                              num_cpus=actor_cpus(actors),
                              fn_constructor_kwargs={"model_uri": model_uri,
                                                     "tracking_uri": uri,
                                                     "out_dir": out_dir,
                                                     "options": asdict(options)})
        for batch in done.iter_batches(batch_format="numpy", batch_size=None):
            for path, written, why in zip(batch["path"], batch["written"], batch["reason"],
                                          strict=True):
                if written:
                    result.written.append(str(written))
                else:
                    result.skipped.append((str(path), str(why)))
    for path, why in result.skipped:
        log(f"skipped {path}: {why}")
    return result
