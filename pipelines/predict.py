"""Inference on image files and folders: class-id PNGs and colour overlays.

The model is resolved once, in this process (the driver), against the project's tracking
URI. A NYUD model (HHA, RGB-D, RGB + HHA) also reads each image's HHA or depth file, named
with ``sources`` and matched by file name (``pipelines.companions``); what was given is
checked against what the model reads before any work starts. Inputs are predicted in
this process while that is quick; a large folder (or the rest of one, once the rate so far
says it would take long here) goes through Ray Data, whose actors receive that resolved model
(one copy in the object store), never a URI to resolve again.

Images are read with ``pipelines.images`` (16-bit, alpha, palette, CMYK, grayscale, EXIF
orientation, the pixel limit: its docstring says how). Each output is the size of the image
as a viewer shows it (EXIF orientation applied). An input that cannot be used (missing,
empty, not an image, truncated, too large, unreadable) is reported in one line naming it and
skipped; it never stops the others. When nothing at all was written the call fails with a
``UserError`` saying how many inputs were skipped.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fcn_core.inference import InferenceOptions
from pipelines import companions, images, storage
from pipelines.errors import ServiceUnavailable, UsageError, UserError
from pipelines.storage import StoragePath

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}
FORMATS = ("default", "voc")
# What the PASCAL VOC evaluation server takes: results/VOC2012/Segmentation/comp6_test_cls/
# <id>.png ('P' mode, the VOC colour map, pixel = class 0..20), as one tarball of results/.
VOC_RESULTS = "results/VOC2012/Segmentation/comp6_test_cls"
VOC_TARBALL = "results.tgz"
VOC_NUM_CLASSES = 21
Log = Callable[[str], None]


@dataclass
class PredictResult:
    written: list[str] = field(default_factory=list)  # the class-id PNGs
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    format: str = "default"
    tarball: str | None = None  # --format voc: OUT/results.tgz
    heads: tuple[str, ...] = ()  # a multi-head net's heads after the first

    def summary(self, out: str) -> str:
        """The closing line: what was written where, and how many inputs were skipped."""
        skipped = f"skipped {len(self.skipped)}" + (" (reasons above)" if self.skipped else "")
        if self.format == "voc":
            return (f"wrote {len(self.written)} VOC result(s) to "
                    f"{storage.join(out, VOC_RESULTS)} ('P' PNGs, VOC colour map) and "
                    f"{self.tarball} for the evaluation server; {skipped}")
        more = "".join(f", <name>_{h}.png {h} class ids" for h in self.heads)
        return (f"wrote {len(self.written)} prediction(s) to {out} (<name>.png class ids, "
                f"<name>_color.png overlay{more}); {skipped}")


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


def _output_names(files: list[StoragePath], heads: Sequence[str] = ()) -> list[str]:
    """<stem> per input, made unique (<stem>_1, ...) where its files would be another
    input's: two inputs that share a stem (a/x.jpg, b/x.png), or x.jpg beside x_color.jpg
    (x's overlay) or, with ``heads``, beside x_geometric.jpg (x's other head)."""
    used: set[str] = set()
    names = []
    for f in files:
        n = 0
        while True:
            name = f.stem if n == 0 else f"{f.stem}_{n}"
            stems = [name, *(f"{name}_{h}" for h in heads)]
            outs = {*stems, *(f"{x}_color" for x in stems)}
            if not outs & used:
                break
            n += 1
        used |= outs
        names.append(name)
    return names


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def voc_png(label: np.ndarray) -> bytes:
    """A 'P'-mode PNG of class ids 0..20 with the VOC colour map (what the server reads)."""
    from PIL import Image

    from fcn_core.palettes import voc_colormap

    im = Image.fromarray(label.astype(np.uint8), mode="L")
    im.putpalette(voc_colormap(256).astype(np.uint8).ravel().tolist())  # 'L' -> 'P'
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def check_voc_model(loaded: Any, model_uri: str) -> None:
    """--format voc: a single-head net over the 21 VOC classes."""
    heads = dict(getattr(loaded.net.config, "heads", {}) or {})
    if len(heads) != 1 or next(iter(heads.values())) != VOC_NUM_CLASSES:
        raise UsageError(f"--format voc needs a model over the {VOC_NUM_CLASSES} PASCAL VOC "
                         f"classes, got {model_uri} with heads {heads}")


def check_unique_ids(files: list[StoragePath]) -> None:
    """--format voc names each result by its image id (the stem): two inputs with one id
    would overwrite each other."""
    seen: dict[str, StoragePath] = {}
    for f in files:
        if f.stem in seen:
            raise UsageError(f"--format voc names results by image id, and {seen[f.stem]} and "
                             f"{f} share the id {f.stem!r}: give each image once")
        seen[f.stem] = f


def write_voc_tarball(out_dir: str, written: list[str]) -> str:
    """OUT/results.tgz of the written results, members under results/VOC2012/..., sorted,
    with fixed metadata (the same predictions give the same bytes)."""
    import gzip
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for loc in sorted(written, key=storage.name):
            data = storage.read_bytes(loc)
            info = tarfile.TarInfo(f"{VOC_RESULTS}/{storage.name(loc)}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    target = storage.join(out_dir, VOC_TARBALL)
    storage.write_bytes(target, gzip.compress(raw.getvalue(), mtime=0))
    return target


def check_options(loaded: Any, options: InferenceOptions, model_uri: str) -> None:
    """Inference options the model cannot take (shift-and-stitch by a factor that does not
    divide its output stride, or of a net that is not an FCN; a CRF on a model that does not
    read RGB, or without pydensecrf2): one usage error, up front."""
    from fcn_core.inference import check_shift_stitch

    if options.crf:
        from fcn_core.crf import INSTALL_HINT, available

        if getattr(loaded, "input", "rgb") != "rgb":
            raise UsageError(f"--crf with model {model_uri}: the dense CRF's bilateral kernel "
                             f"reads the RGB image, and this model reads "
                             f"input={loaded.input!r}")
        if not available():
            raise UsageError(f"--crf: {INSTALL_HINT}")
    try:
        check_shift_stitch(loaded.net, options.shift_stitch)
    except ValueError as e:
        raise UsageError(f"--shift-stitch {options.shift_stitch} with model {model_uri}: "
                         f"{e}") from None


def extra_heads(loaded: Any) -> list[str]:
    """A multi-head net's heads after the first (SIFT Flow: ["geometric"]); [] otherwise."""
    heads = dict(getattr(getattr(loaded.net, "config", None), "heads", None) or {})
    return list(heads)[1:]


def predict_one(loaded: Any, path: str, out_dir: str, name: str, options: InferenceOptions,
                device: Any = "cpu", max_pixels: int | None = None, fmt: str = "default",
                frame: Mapping[str, str] | None = None, camera: companions.Camera | None = None
                ) -> tuple[str | None, str | None]:
    """(written label location, None) or (None, why it was skipped: one line naming it).
    ``frame``: a NYUD model's companion files of this image (``pipelines.companions``).
    A multi-head net's first head is <name>.png; each other head <name>_<head>.png (and its
    overlay), from a pass of its own."""
    from fcn_core.inference import predict_labels

    nyud = loaded.input != "rgb"
    try:  # a NYUD frame is read as stored (no EXIF turn), pixel-aligned with its depth
        image = images.read_rgb(path, max_pixels=max_pixels, exif=not nyud)
        hha, depth = companions.read_frame(loaded.input, frame or {}, image.shape[:2], camera,
                                           max_pixels) if nyud else (None, None)
    except images.ImageError as e:
        return None, str(e)
    def labels(head: str | None = None) -> np.ndarray:
        (label,) = predict_labels(loaded.net, [image], loaded.mean_bgr, options, device,
                                  input=loaded.input, hha=[hha] if hha is not None else None,
                                  depth=[depth] if depth is not None else None, head=head)
        return label

    label = labels()  # the first head's: the model's answer
    if fmt == "voc":
        target = storage.join(out_dir, VOC_RESULTS, f"{name}.png")
        storage.write_bytes(target, voc_png(label))
        return target, None
    target = storage.join(out_dir, f"{name}.png")
    storage.write_bytes(target, _png(label))
    storage.write_bytes(storage.join(out_dir, f"{name}_color.png"),
                        _png(overlay(image, label)))
    for head in extra_heads(loaded):  # SIFT Flow's geometric labels beside the semantic ones
        other = labels(head)
        storage.write_bytes(storage.join(out_dir, f"{name}_{head}.png"), _png(other))
        storage.write_bytes(storage.join(out_dir, f"{name}_{head}_color.png"),
                            _png(overlay(image, other)))
    return target, None


class _FolderPredictor:
    """Ray Data UDF for large folders: the driver's resolved model, one copy per actor."""

    def __init__(self, model: Any, out_dir: str, options: dict[str, Any], max_pixels: int,
                 fmt: str = "default", use_gpu: bool = False,
                 camera: companions.Camera | None = None):
        import ray
        import torch

        from fcn_core.precision import pick_device
        from pipelines.evaluate import ray_cpus

        torch.set_num_threads(max(1, int(ray_cpus())))
        self.loaded = ray.get(model)  # an ObjectRef of the driver's LoadedModel
        self.device = pick_device(use_gpu)
        self.loaded.net.to(self.device)
        self.out_dir = out_dir
        self.max_pixels = max_pixels
        self.fmt = fmt
        self.camera = camera
        self.options = InferenceOptions(**{k: tuple(v) if k == "scales" else v
                                           for k, v in options.items()})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        written, reasons, fatal = [], [], []
        for i, (path, name) in enumerate(zip(batch["path"], batch["name"], strict=True)):
            w, why, stop = None, None, ""
            frame = {k: str(batch[k][i]) for k in companions.KINDS if batch[k][i]}
            try:
                w, why = predict_one(self.loaded, str(path), self.out_dir, str(name),
                                     self.options, device=self.device,
                                     max_pixels=self.max_pixels, fmt=self.fmt, frame=frame,
                                     camera=self.camera)
            except UserError as e:  # an output that cannot be written, a store that is down
                stop = f"{'transient:' if e.transient else 'user:'}{e}"
            written.append(w or "")
            reasons.append(why or "")
            fatal.append(stop)
        return {"path": batch["path"], "written": np.array(written, dtype=object),
                "reason": np.array(reasons, dtype=object),
                "fatal": np.array(fatal, dtype=object)}


@contextmanager
def _mlflow_store(uri: str) -> Iterator[None]:
    """MLflow (3.17) resolves a ``models:/`` URI with its process-wide tracking and registry
    URIs, whatever ``download_artifacts`` is given (``ModelsArtifactRepository.
    _get_model_uri_infos`` builds its own client): without this, a process that never set
    them looks in ``./mlflow.db``, creates it, and finds no model. Both point at the project's
    store while the model is resolved (and MLflow's download progress bar stays off unless
    the user asked for it); all are put back afterwards."""
    values = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR":
                  os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _resolve(model_uri: str) -> Any:
    """The model, resolved here on the driver, against the project's tracking URI (never
    MLflow's default store in the current folder)."""
    from pipelines.registry import is_mlflow_uri, resolve_model
    from pipelines.tracking import tracking_uri

    if is_mlflow_uri(model_uri):
        uri = tracking_uri()
        with _mlflow_store(uri):
            loaded = resolve_model(model_uri, uri)
    else:
        loaded = resolve_model(model_uri)
    return loaded


PROGRESS_EVERY_S = 5.0  # a progress line at most this often while predicting here


def _predict_here(loaded: Any, files: list[StoragePath], names: list[str], out_dir: str,
                  options: InferenceOptions, limit: int, log: Log, result: PredictResult,
                  fmt: str, use_gpu: bool, handoff_s: float,
                  frames: list[dict[str, str]], camera: companions.Camera | None) -> int:
    """Predict ``files`` in this process until the rest would take over ``handoff_s`` seconds
    at the rate so far (judged from the second image on: the first pays the warm-up); the
    number predicted here."""
    import time

    from fcn_core.precision import pick_device

    try:
        device = pick_device(use_gpu)
    except RuntimeError as e:
        raise UsageError(f"--gpu: {e}; leave --gpu out to predict on the CPU") from None
    loaded.net.to(device)
    start = shown = time.monotonic()
    for i, (f, name, frame) in enumerate(zip(files, names, frames, strict=True), 1):
        written, why = predict_one(loaded, str(f), out_dir, name, options, device=device,
                                   max_pixels=limit, fmt=fmt, frame=frame, camera=camera)
        if written:
            result.written.append(written)
        else:
            result.skipped.append((str(f), why or "unknown"))
        left = len(files) - i
        rest_s = (time.monotonic() - start) / i * left
        if i >= 2 and left and rest_s > handoff_s:
            log(f"predicted {i}/{len(files)} here; the other {left} (~{rest_s:.0f} s more "
                f"here) go to Ray Data")
            return i
        if left and time.monotonic() - shown >= PROGRESS_EVERY_S:  # the end has its summary
            shown = time.monotonic()
            log(f"predicted {i}/{len(files)} ({i / (shown - start):.1f} images/s)")
    return len(files)


def _predict_with_ray(loaded: Any, files: list[StoragePath], names: list[str], out_dir: str,
                      options: InferenceOptions, actors: int, limit: int, log: Log,
                      result: PredictResult, fmt: str = "default", use_gpu: bool = False,
                      frames: list[dict[str, str]] | None = None,
                      camera: companions.Camera | None = None) -> None:
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from pipelines.evaluate import actor_resources
    from pipelines.ray_env import check_gpus, init_ray, quiet_ray_data, remote_args_allowed

    quiet_ray_data()
    log(init_ray())
    actors = max(1, min(actors, len(files)))  # an actor per block at least (Ray Data warns)
    note = check_gpus(actors, "actor", "lower --actors") if use_gpu else None
    if note:
        log(note)
    model_ref = ray.put(loaded)
    frames = frames or [{} for _ in files]
    ds = ray.data.from_items([{"path": str(f), "name": n,
                               **{k: fr.get(k, "") for k in companions.KINDS}}
                              for f, n, fr in zip(files, names, frames, strict=True)],
                             override_num_blocks=max(actors, len(files) // 16))
    with remote_args_allowed():
        done = ds.map_batches(_FolderPredictor, batch_size=16, batch_format="numpy",
                              compute=ActorPoolStrategy(size=actors),
                              **actor_resources(actors, use_gpu),
                              fn_constructor_kwargs={"model": model_ref, "out_dir": out_dir,
                                                     "options": asdict(options),
                                                     "max_pixels": limit, "fmt": fmt,
                                                     "use_gpu": use_gpu, "camera": camera})
    for batch in done.iter_batches(batch_format="numpy", batch_size=None):
        for path, written, why, stop in zip(batch["path"], batch["written"], batch["reason"],
                                            batch["fatal"], strict=True):
            if stop:
                kind, _, message = str(stop).partition(":")
                raise (ServiceUnavailable if kind == "transient" else UserError)(message)
            if written:
                result.written.append(str(written))
            else:
                result.skipped.append((str(path), str(why)))


# A folder is predicted here until what is left would take longer than this; the rest then
# goes to Ray Data (its start on 2 CPUs: ~10 s, then the actors' imports and model copies).
HANDOFF_S = 20.0


def predict(model_uri: str, inputs: Sequence[str], out: str, *,
            options: InferenceOptions | None = None, ray_threshold: int = 64,
            actors: int | None = None, handoff_s: float = HANDOFF_S,
            max_pixels: int | None = None, log: Log = print,
            fmt: str = "default", use_gpu: bool = False,
            sources: companions.Sources | None = None) -> PredictResult:
    """Predict every image in ``inputs`` into ``out``: <name>.png (uint8 class ids, the
    size of the image as shown, EXIF orientation applied) and <name>_color.png (overlay).
    ``fmt="voc"``: the PASCAL VOC server's layout instead (``VOC_RESULTS``/<id>.png, 'P' mode
    with the VOC colour map) and ``OUT/results.tgz`` of it.

    Where it runs: with ``actors`` given, all on that many Ray Data actors (so too with
    ``use_gpu`` and at least ``ray_threshold`` files: the GPUs are the actors'). Otherwise in
    this process, image by image; with at least ``ray_threshold`` files, only until the rest
    would take more than ``handoff_s`` seconds at the rate so far, when the rest goes to 2 Ray
    actors (a folder of small images never pays Ray's start-up).

    ``sources``: a NYUD model's HHA / depth files or folders, matched to the images by name
    (``pipelines.companions``); an image without them is skipped with the reason.

    ``max_pixels``: the largest image accepted (``pipelines.images.pixel_limit``). Unusable
    inputs are logged (``skipped PATH: reason``) and listed in the result; a ``UserError``
    when there is nothing to predict or every input was skipped."""
    options = options or InferenceOptions()
    if fmt not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    limit = images.pixel_limit(max_pixels)
    out_dir = storage.as_location(out)
    storage.check_writable(out_dir)
    loaded = _resolve(model_uri)  # before any Ray work, and before anything is written
    sources = sources or companions.Sources()
    kinds = companions.check(loaded.input, sources, model_uri)
    if fmt == "voc":
        check_voc_model(loaded, model_uri)
    check_options(loaded, options, model_uri)
    files, missing = collect_inputs(inputs)
    if fmt == "voc":
        check_unique_ids(files)
    if not files and not missing:
        raise UsageError(f"no image files in {', '.join(map(str, inputs))} (looked for "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    result = PredictResult(skipped=list(missing), format=fmt, heads=tuple(extra_heads(loaded)))
    # --format voc names results by image id (unique, checked above); the default layout
    # keeps every input's files apart
    names = [f.stem for f in files] if fmt == "voc" else _output_names(files, result.heads)
    frames: list[dict[str, str]] = [{} for _ in files]
    if kinds:  # a NYUD model: each image with its HHA / depth, or skipped saying which lacks
        matched = companions.plan(files, kinds, sources)
        result.skipped += [(str(files[i]), why) for i, why in matched.missing.items()]
        keep = sorted(matched.files)
        files, names = [files[i] for i in keep], [names[i] for i in keep]
        frames = [matched.files[i] for i in keep]
    if files:
        storage.makedirs(out_dir)
    large = len(files) >= ray_threshold
    done = 0
    if not (actors is not None or (large and use_gpu)):
        done = _predict_here(loaded, files, names, out_dir, options, limit, log, result, fmt,
                             use_gpu, handoff_s if large else float("inf"), frames,
                             sources.camera)
    if done < len(files):
        loaded.net.to("cpu")  # one device-free copy in the object store
        _predict_with_ray(loaded, files[done:], names[done:], out_dir, options, actors or 2,
                          limit, log, result, fmt, use_gpu, frames[done:], sources.camera)
    for path, why in result.skipped:
        log(f"skipped {storage.redact(path)}: {why}")
    if not result.written:
        n = len(result.skipped)
        raise UserError(f"no prediction written: {'the' if n == 1 else 'all'} {n} input"
                        f"{'' if n == 1 else 's'} skipped (reasons above)")
    if fmt == "voc":
        result.tarball = write_voc_tarball(out_dir, result.written)
    return result
