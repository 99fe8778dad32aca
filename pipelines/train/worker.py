"""Every Ray Train call of a chain of stages: the loop each worker runs (data shards, DDP,
reports, checkpoints to the run's storage, failure injection for tests)."""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcn_core.fcn import scores_untrained
from fcn_core.precision import (
    amp_note,
    channels_last_note,
    grad_scaler,
    maybe_compile,
    resolve_amp,
    resolve_channels_last,
)
from fcn_core.transforms import MEAN_BGR
from pipelines import storage
from pipelines.config import TrainConfig
from pipelines.shards import model_input, training_batch
from pipelines.train.checkpoint import (
    CHECKPOINT_FILE,
    read_checkpoint,
    write_checkpoint,
)
from pipelines.train.sampling import IN_MEMORY, RowSampler, collect_rows, rows_from_shards
from pipelines.train.step import (
    _all_reduce_hist,
    _scores,
    build_stage_model,
    make_optimizer,
    mean_over_workers,
    output_stride,
    replicas_in_sync,
    sampled_labels,
    set_lr,
    sync_batch_norm,
    train_step,
    validate,
)

DONE_FILE = "stage_done.json"
# Written by rank 0 when a stage's training loss stops being finite; the driver reads it.
DIVERGED_FILE = "stage_diverged.json"
# What the in-memory samplers keep of each training row (the encoded bytes, as stored).
TRAIN_COLUMNS = ["id", "image", "label", "label_geo", "depth", "hha"]
Log = Callable[[str], None]


def _batches(shard: Any, cfg: TrainConfig, device: Any, train: bool, seed: int
             ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Decode + pad in Ray Data's prefetch thread (collate_fn), float conversion on device."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    mean = MEAN_BGR[cfg.dataset]

    class Collate(NumpyBatchCollateFn):
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            self.calls += 1
            b = training_batch(batch, mirror=train and cfg.mirror, seed=seed + self.calls,
                               multiple=cfg.pad_multiple, jitter=cfg.jitter if train else 0,
                               scale=cfg.random_scale if train else None,
                               crop=cfg.crop_size if train else 0)
            return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}

    it = shard.iter_torch_batches(
        batch_size=cfg.batch_size, collate_fn=Collate(), prefetch_batches=2,
        local_shuffle_buffer_size=4 * cfg.batch_size if train else None,
        local_shuffle_seed=seed if train else None)
    for batch in it:
        x, labels = model_input(batch, mean, device, cfg.input)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, labels


def _sampled_batches(rows: RowSampler, cfg: TrainConfig, device: Any, start: int
                     ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The ``random`` / ``shuffle`` orders: rows picked by step number, decoded and padded
    one step ahead in a thread (as Ray Data's prefetch does for the stream)."""
    from concurrent.futures import ThreadPoolExecutor

    mean = MEAN_BGR[cfg.dataset]

    def prepare(step: int) -> dict[str, np.ndarray]:
        return training_batch(rows.batch(step), mirror=cfg.mirror, seed=cfg.seed + step,
                              multiple=cfg.pad_multiple, jitter=cfg.jitter,
                              scale=cfg.random_scale, crop=cfg.crop_size)

    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = [pool.submit(prepare, start), pool.submit(prepare, start + 1)]
        step = start
        while True:
            batch = ahead.pop(0).result()
            step += 1
            ahead.append(pool.submit(prepare, step + 1))
            x, labels = model_input(batch, mean, device, cfg.input)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels


def _held_batches(rows: dict[str, list[Any]], cfg: TrainConfig, device: Any
                  ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """A worker's validation rows, held in memory after the first pass, in batches in order
    (no flips): every later validation costs the decoding only, not a Ray Data pass."""
    mean = MEAN_BGR[cfg.dataset]
    n = len(rows["id"])
    for lo in range(0, n, cfg.batch_size):
        batch: dict[str, np.ndarray] = {}
        for k, v in rows.items():
            col = np.empty(min(cfg.batch_size, n - lo), dtype=object)
            col[:] = v[lo:lo + cfg.batch_size]
            batch[k] = col
        b = training_batch(batch, mirror=False, seed=cfg.seed, multiple=cfg.pad_multiple)
        x, labels = model_input(b, mean, device, cfg.input)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, labels


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the chain's stages one after the other in this worker
    group (no new workers, no new data pass per stage). A stage already done (its done
    file) is skipped; the Ray Train checkpoint of an unfinished stage resumes it."""
    import ray.train
    import ray.train.torch

    from pipelines.ray_env import quiet_train_worker

    quiet_train_worker()
    cfg: TrainConfig = loop["config"]  # the typed config itself crosses the Ray boundary
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(loop.get("threads_per_worker", 1))))
    device = ray.train.torch.get_device()  # channels_last: auto resolved once, for every step
    cfg = dataclasses.replace(cfg, channels_last=resolve_channels_last(
        cfg.channels_last, device, resolve_amp(cfg.amp, device)))
    data = _WorkerData(cfg, rank, world, loop.get("shards"))
    resume: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            resume = read_checkpoint(d)  # weights_only: no pickle; tensors on the CPU
    init: str | None = loop["init_checkpoint"]
    previous: torch.nn.Module | None = None  # the last stage's net, promoted in memory
    for name in loop["stages"]:
        stage = next(s for s in cfg.stages if s.name == name)
        stage_dir = storage.join(loop["run_dir"], name)
        done = storage.join(stage_dir, DONE_FILE)
        if storage.is_file(done):  # finished by an earlier attempt of this run
            init, previous = storage.read_json(done)["checkpoint"], None
            continue
        state = resume if resume is not None and resume.get("stage") == name else None
        try:
            previous = _train_stage(loop, cfg, stage, stage_dir, init, previous, state, data,
                                    rank, world)
        except _Diverged:
            return  # not an error: Ray Train would retry it, and diverge again
        init = None


class _Diverged(Exception):
    """The stage's loss stopped being finite (every worker raises it at the same step)."""


class _WorkerData:
    """A worker's rows for the whole chain, read once. The in-memory samplers (``random``,
    ``shuffle``) read the worker's share straight from the shards (``shards``: split ->
    (location, rows), from the driver's manifest); ``stream`` reads Ray Data's shards."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int,
                 shards: dict[str, list[tuple[str, int]]] | None) -> None:
        self.cfg, self.rank, self.world, self.shards = cfg, rank, world, shards
        self.held: dict[str, list[Any]] = {}
        self._rows: RowSampler | None = None

    def _read(self, split: str) -> dict[str, list[Any]]:
        if self.shards is not None:
            return rows_from_shards(self.shards[split], self.rank, self.world, TRAIN_COLUMNS)
        import ray.train

        return collect_rows(ray.train.get_dataset_shard(split), TRAIN_COLUMNS)

    def rows(self) -> RowSampler:
        if self._rows is None:
            cfg = self.cfg
            self._rows = RowSampler(self._read("train"), cfg.sampling, cfg.seed,
                                    cfg.batch_size, self.rank)
        return self._rows

    @property
    def train_shard(self) -> Any:
        import ray.train

        return ray.train.get_dataset_shard("train")

    def val_batches(self, device: Any) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        if self.cfg.sampling not in IN_MEMORY:  # stream: splits too big to hold
            import ray.train

            return _batches(ray.train.get_dataset_shard("val"), self.cfg, device, False,
                            self.cfg.seed)
        if not self.held:  # one read per chain; later validations reuse the rows
            self.held.update(self._read("val"))
        return _held_batches(self.held, self.cfg, device)


def _train_stage(loop: dict[str, Any], cfg: TrainConfig, stage: Any, stage_dir: str,
                 init: str | None, previous: torch.nn.Module | None,
                 state: dict[str, Any] | None, data: _WorkerData, rank: int, world: int
                 ) -> torch.nn.Module:
    """One stage in this worker group; returns its final net (unwrapped) for the next."""
    import ray.train
    import ray.train.torch

    from fcn_core.precision import unwrap

    torch.manual_seed(cfg.seed)  # as a stage of its own would: the same draws

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[{stage.name}] {msg}", flush=True)

    model = build_stage_model(cfg, stage, loop["num_classes"], init, log, previous=previous)
    if previous is None:
        model = sync_batch_norm(model, cfg.use_gpu, world, log)
    heads = list((cfg.heads or {"out": loop["num_classes"]}).keys())
    classes = cfg.heads or {"out": loop["num_classes"]}
    optimizer = make_optimizer(model, cfg, stage)
    step, resumed_from = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # to the worker's device; DDP (gloo / nccl)
    device = ray.train.torch.get_device()
    if state is not None:  # after the move: load_state_dict puts the state on the params' device
        optimizer.load_state_dict(state["optimizer"])
        step = resumed_from = int(state["step"])
        log(f"resumed from the checkpoint at step {step}")
    model = maybe_compile(model, cfg.compile, log)
    amp = resolve_amp(cfg.amp, device)  # auto: bf16 where this device runs it natively
    note = amp_note(cfg.amp, amp, device)
    if note and previous is None:
        log(note)
    note = channels_last_note(loop["config"].channels_last, device, amp)  # as asked
    if note and previous is None:
        log(note)
    scaler = grad_scaler(amp, device)  # fp16 only
    stride = output_stride(model)  # loss sampling's cells
    weight = (torch.tensor(loop["class_weights"], dtype=torch.float32, device=device)
              if loop.get("class_weights") else None)
    tracker = None
    run_ids = loop.get("mlflow_run_ids") or {}
    if rank == 0 and run_ids.get(stage.name):
        from pipelines.tracking import MetricLogger

        tracker = MetricLogger(loop["tracking_uri"], run_ids[stage.name])

    last_val: dict[str, float] = {}
    window_t, window_imgs, window_step = time.perf_counter(), 0, step
    epoch = 0

    def report(metrics: dict[str, float]) -> None:
        """A resume point: Ray Train keeps the latest few of the run."""
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                write_checkpoint(Path(d) / CHECKPOINT_FILE, model, optimizer=optimizer,
                                 step=step, stage=stage.name, config=cfg.to_dict())
            ckpt = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
            ray.train.report({**metrics, "stage": stage.name}, checkpoint=ckpt)

    timing = {"val_s": 0.0, "images": 0.0}  # training images/s leaves validations out

    def run_validation() -> dict[str, float]:
        t0 = time.perf_counter()
        seen = [0]

        def counted() -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
            for x, labels in data.val_batches(device):
                seen[0] += x.shape[0]
                yield x, labels

        cms = validate(model, counted(), classes, heads, amp)
        images = _all_reduce_hist(cms, seen[0], device)
        timing["val_s"] += time.perf_counter() - t0
        return {**_scores(cms, heads), "val_images": float(images)}

    def finish() -> None:
        """The stage's final checkpoint and done file, in the stage's folder: the next
        stage (here, or a later attempt of the run) and the driver start from them."""
        nonlocal last_val
        seconds = time.perf_counter() - loop_t0 - timing["val_s"]
        last_val = run_validation()
        speed = {"train_img_per_s": timing["images"] / seconds} if timing["images"] else {}
        metrics = {**speed,"loss": float(loss) if loss is not None else float("nan"), "step": step,
                   "resumed_from": resumed_from, **last_val,
                   "replicas_in_sync": float(replicas_in_sync(model)), "world_size": world}
        if rank == 0:
            final = storage.join(stage_dir, "final")
            write_checkpoint(storage.join(final, CHECKPOINT_FILE), model, optimizer=optimizer,
                             step=step, stage=stage.name, config=cfg.to_dict())
            storage.write_json(storage.join(stage_dir, DONE_FILE), {
                "checkpoint": final, "steps": step, "mlflow_run": run_ids.get(stage.name),
                "metrics": {k: float(v) for k, v in metrics.items()},
                # which worker (a Ray actor) ran the stage: the same one for a whole chain
                "worker": ray.get_runtime_context().get_actor_id()})
            print(f"[{stage.name}] checkpoint at step {step}: {final}", flush=True)
        ray.train.report(metrics)  # every rank, after the files: no one runs ahead

    loss: float | None = None
    if step == 0 and cfg.val_every:  # where the stage starts: the previous stage's predictions
        untrained = scores_untrained(unwrap(model))  # class 0 everywhere: no forward pass
        init_val = run_validation()
        shown = ", ".join(f"{k} {v:.3f}" for k, v in init_val.items() if k != "val_images")
        how = "; score layers still zero, so class 0 everywhere" if untrained else ""
        log(f"initial {shown} ({init_val['val_images']:.0f} images{how})")
        if tracker is not None:
            tracker.log({f"init_{k}": v for k, v in init_val.items()}, 0)
    if cfg.sampling in IN_MEMORY:
        fresh = data._rows is None
        rows = data.rows()
        if fresh:
            log(f"sampling {cfg.sampling}: {rows.n} rows per worker held in memory")
    loop_t0, timing["val_s"] = time.perf_counter(), 0.0
    while step < stage.steps:
        if cfg.sampling in IN_MEMORY:
            batches = _sampled_batches(rows, cfg, device, step)
        else:
            batches = _batches(data.train_shard, cfg, device, True, cfg.seed + 7919 * epoch)
        for x, labels in batches:
            if cfg.fail_at_step is not None and step == cfg.fail_at_step and \
                    rank == world - 1 and _first_injection(stage_dir):
                raise RuntimeError(f"injected failure at step {step} (fail_at_step)")
            lr = set_lr(optimizer, cfg, stage, step)
            if cfg.loss_sampling < 1:
                labels = sampled_labels(labels, cfg.loss_sampling, stride, cfg.seed, rank, step)
            loss = train_step(model, optimizer, x, labels, heads, cfg.normalize_loss,
                              amp, scaler, weight)
            step += 1
            mean_loss = mean_over_workers(loss, device)
            if not math.isfinite(mean_loss):  # diverged: the next steps would all be NaN
                if rank == 0:
                    storage.write_json(storage.join(stage_dir, DIVERGED_FILE), {
                        "stage": stage.name, "step": step, "loss": str(mean_loss), "lr": lr})
                log(f"step {step}/{stage.steps}  loss {mean_loss}: diverged, stopping")
                raise _Diverged
            window_imgs += x.shape[0] * world
            timing["images"] += x.shape[0] * world
            metrics = {"loss": loss, "lr": lr, "step": step, "resumed_from": resumed_from}
            val_due = cfg.val_every and step % cfg.val_every == 0 and step < stage.steps
            if val_due:
                last_val = run_validation()
                metrics.update(last_val)
            dt = time.perf_counter() - window_t
            if tracker is not None:
                tracker.log({"loss": loss, "lr": lr, "img_per_s": window_imgs / max(dt, 1e-9),
                             **(last_val if val_due else {})}, step)
            if step % max(1, min(cfg.checkpoint_every, 10)) == 0 or step == 1:
                miou = f"  val mean IU {last_val['mean_iu']:.3f}" if "mean_iu" in last_val else ""
                # (step 1's window holds the stage's setup: no ETA from it)
                eta = _eta((stage.steps - step) * dt / (step - window_step)) if step > 1 else ""
                log(f"step {step}/{stage.steps}  loss {loss:.4g}  lr {lr:.3g}  "
                    f"{window_imgs / dt:.1f} img/s{miou}{eta}")
                window_t, window_imgs, window_step = time.perf_counter(), 0, step
            if step % cfg.checkpoint_every == 0 and step < stage.steps:
                report(metrics)
            if step >= stage.steps:
                break
        epoch += 1
    finish()
    if tracker is not None:
        tracker.log({f"final_{k}": v for k, v in last_val.items()}, step)
        tracker.flush()
    # Validation runs under the training's autocast; fcn evaluate scores in fp32, so its
    # mean IU may differ in the third decimal: say which this is.
    precision = f" ({amp} validation)" if amp != "off" else ""
    log(f"done: {step} steps" + (f", mean IU {last_val['mean_iu']:.3f}{precision}"
                                  if "mean_iu" in last_val else ""))
    return unwrap(model)


def _eta(seconds: float) -> str:
    """The stage's time left at the last window's pace: "  ETA 4m05s" ("" at its end)."""
    s = round(seconds)
    if s <= 0:
        return ""
    h, m = divmod(s // 60, 60)
    return f"  ETA {h}h{m:02d}m" if h else f"  ETA {m}m{s % 60:02d}s" if m else f"  ETA {s}s"


def _first_injection(stage_dir: str) -> bool:
    """True once per stage run: a marker on shared storage survives the worker restart."""
    return storage.create_exclusive(storage.join(stage_dir, ".failure_injected"))
