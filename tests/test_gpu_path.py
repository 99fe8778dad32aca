"""The GPU path, tested where it can run on a CPU-only machine: device choice, bf16 autocast,
the validation all-reduce on the worker's device, checkpoints that are fp32, contiguous and
device-free whatever trained them, and GPU requests reaching Ray's options (issue 12).

What needs a real GPU (NCCL, CUDA kernels, fp16 with a GradScaler) is measured by
``bench/bench_model.py --device cuda`` on the device machine, not here."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fcn_core import fcn8s
from fcn_core.metrics import ConfusionMatrix
from fcn_core.precision import (
    AMP,
    autocast,
    check_amp,
    grad_scaler,
    maybe_compile,
    native_bf16,
    pick_device,
    portable,
    resolve_amp,
    unwrap,
)
from fcn_core.serving import load_checkpoint, net_from_checkpoint
from pipelines import config
from pipelines.config import ConfigError, StageConfig, TrainConfig
from pipelines.train.checkpoint import checkpoint_bytes
from pipelines.train.step import _all_reduce_hist, make_optimizer, train_step, validate

CUDA = torch.cuda.is_available()
TINY = dict(width=1 / 16, num_classes=5)


def _batch(seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 32, 32, generator=g),
            {"label": torch.randint(0, 5, (2, 32, 32), generator=g)})


def test_the_config_and_the_core_agree_on_the_amp_modes():
    assert config.AMP == AMP


def test_device_choice_never_falls_back_silently():
    assert pick_device(False) == torch.device("cpu")
    if CUDA:
        assert pick_device(True).type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="a GPU was requested but torch sees no CUDA"):
            pick_device(True)


def test_fp16_is_refused_on_cpus_and_in_a_cpu_config():
    with pytest.raises(ValueError, match="amp fp16 needs a CUDA device"):
        check_amp("fp16", "cpu")
    with pytest.raises(ValueError, match="amp must be one of off, bf16, fp16"):
        autocast("half", "cpu")
    with pytest.raises(ValueError, match="auto resolved with resolve_amp"):
        autocast("auto", "cpu")  # resolved per device first, never autocast as such
    assert grad_scaler("bf16", "cpu") is None and grad_scaler("off", "cpu") is None
    with pytest.raises(ConfigError, match=r"^amp: 'fp16' needs GPUs \(use_gpu: true"):
        TrainConfig(amp="fp16")
    assert TrainConfig(amp="fp16", use_gpu=True).amp == "fp16"
    assert config.from_dict({"amp": False}).amp == "off"  # YAML 1.1's reading of `amp: off`


def test_bf16_autocast_trains_in_bf16_and_keeps_fp32_weights():
    torch.manual_seed(0)
    model = fcn8s(**TINY)
    for name, m in model.named_modules():  # non-zero scores: the step does real work
        if name.split(".")[-1].startswith("score_"):
            torch.nn.init.normal_(m.weight, std=0.01)
    cfg = TrainConfig(dataset="synthetic", normalize_loss=True, optimizer="sgd",
                      stages=(StageConfig("8s", 1, 1e-3),))
    seen: list[torch.dtype] = []
    hook = model.features[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x, y = _batch()
    ref = fcn8s(**TINY)
    ref.load_state_dict(model.state_dict())
    opt = make_optimizer(model, cfg, cfg.stages[0])
    loss = train_step(model, opt, x, y, ["out"], normalize=True, amp="bf16")
    hook.remove()
    assert seen == [torch.bfloat16]  # the convolutions ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights did not
    ref_loss = train_step(ref, make_optimizer(ref, cfg, cfg.stages[0]), x, y, ["out"],
                          normalize=True, amp="off")
    assert np.isfinite(loss) and abs(loss - ref_loss) < 0.02 * abs(ref_loss), (loss, ref_loss)
    moved = model.heads.out.score_fr.weight.detach() - fcn8s(**TINY).heads.out.score_fr.weight
    assert moved.abs().sum() > 0
    # Validation under bf16 scores the same pixels as fp32 (predictions may differ slightly).
    cms = validate(model, iter([_batch(1)]), {"out": 5}, ["out"], amp="bf16")
    assert cms["out"].hist.sum() == 2 * 32 * 32


@pytest.fixture
def one_process_group(tmp_path):
    """A real gloo process group of one rank (what Ray Train sets up on CPU workers)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_the_validation_all_reduce_runs_on_the_workers_device(one_process_group, monkeypatch):
    """NCCL reduces CUDA tensors only: every reduced tensor must be on the device given (the
    worker's ray.train.torch.get_device()), and the sums come back to the CPU matrices."""
    devices: list[torch.device] = []
    real = dist.all_reduce

    def recording(t: torch.Tensor, *a, **kw):
        devices.append(t.device)
        return real(t, *a, **kw)

    monkeypatch.setattr(dist, "all_reduce", recording)
    cm = ConfusionMatrix(3)
    cm.hist = np.array([[5, 1, 0], [0, 7, 2], [1, 0, 9]], np.int64)
    device = pick_device(CUDA)
    images = _all_reduce_hist({"out": cm}, 4, device)
    assert images == 4 and cm.hist.tolist() == [[5, 1, 0], [0, 7, 2], [1, 0, 9]]
    assert cm.hist.dtype == np.int64 and isinstance(cm.hist, np.ndarray)
    assert devices == [device, device]  # the histogram and the image count


def _as_saved_on_cuda(data: bytes) -> bytes:
    """The bytes torch.save writes on a GPU machine: every storage tagged 'cuda:0' (the
    pickled location string) instead of 'cpu'."""
    import zipfile

    src, dst = io.BytesIO(data), io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            blob = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in blob
                blob = blob.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(item, blob)
    return dst.getvalue()


def test_a_checkpoint_saved_on_a_gpu_loads_on_a_cpu():
    torch.manual_seed(0)
    model = fcn8s(**TINY)
    data = _as_saved_on_cuda(checkpoint_bytes(model, step=3, stage="8s"))
    if not CUDA:  # the file really says cuda: torch.load without a map_location refuses it
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(io.BytesIO(data), weights_only=True)
    net = net_from_checkpoint(load_checkpoint(data))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(net.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_checkpoints_are_fp32_contiguous_and_free_of_wrappers():
    """channels_last weights, a torch.compile wrapper and optimizer state: the checkpoint
    holds plain contiguous CPU tensors under the net's own names."""
    torch.manual_seed(0)
    model = fcn8s(**TINY).to(memory_format=torch.channels_last)
    cfg = TrainConfig(dataset="synthetic", stages=(StageConfig("8s", 1, 1e-3),))
    opt = make_optimizer(model, cfg, cfg.stages[0])
    x, y = _batch()
    train_step(model, opt, x.contiguous(memory_format=torch.channels_last), y, ["out"],
               normalize=True, amp="bf16")
    compiled = torch.compile(model)  # wraps lazily: nothing is compiled until it is called
    assert unwrap(compiled) is model
    state = load_checkpoint(checkpoint_bytes(compiled, optimizer=opt, step=1))
    assert set(state["model"]) == set(model.state_dict())  # no _orig_mod. prefix
    for k, t in state["model"].items():
        assert t.device.type == "cpu" and t.is_contiguous() and t.dtype == torch.float32, k
    momentum = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert momentum and all(t.is_contiguous() and t.device.type == "cpu" for t in momentum)
    assert portable({"a": [torch.ones(2, 2).t()]})["a"][0].is_contiguous()


def test_compile_is_a_speed_option_that_never_fails_a_run():
    model = fcn8s(**TINY)
    assert maybe_compile(model, False) is model
    compiled = maybe_compile(model, True, log=lambda m: None)
    assert unwrap(compiled) is model


def test_gpu_requests_reach_ray_train_and_the_inference_actors():
    from pipelines.evaluate import actor_resources
    from pipelines.train.driver import scaling_config

    cfg = TrainConfig(workers=4, use_gpu=True, cpus_per_worker=2, placement_strategy="SPREAD")
    sc = scaling_config(cfg)
    assert sc.use_gpu and sc.num_workers == 4 and sc.placement_strategy == "SPREAD"
    assert sc.resources_per_worker == {"CPU": 2, "GPU": 1}
    cpu = scaling_config(TrainConfig(workers=2))
    assert not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 0.5}
    assert actor_resources(3, True) == {"num_cpus": 0, "num_gpus": 1, "max_restarts": 0}


def test_fcn_run_carries_gpu_amp_and_weights_into_the_flow_s_config():
    from flows.cli import build_parser
    from flows.cli.pipeline import _pipeline_params
    from pipelines.config import load_config

    args = build_parser().parse_args(
        ["run", "--config", "configs/voc/fcn8s.yaml", "--dataset", "pascal", "--root", "/v",
         "--gpu", "--amp", "fp16", "--backbone-weights", "s3://weights/vgg16.pth"])
    over = _pipeline_params(args)["overrides"]
    assert over == {"use_gpu": True, "amp": "fp16", "backbone_weights": "s3://weights/vgg16.pth"}
    cfg = load_config("configs/voc/fcn8s.yaml", **over)  # what the flow's train step loads
    assert cfg.use_gpu and cfg.amp == "fp16" and cfg.backbone_weights == over["backbone_weights"]
    plain = build_parser().parse_args(
        ["run", "--config", "configs/voc/fcn8s.yaml", "--dataset", "pascal", "--root", "/v"])
    assert "overrides" not in _pipeline_params(plain)


def test_amp_auto_is_bf16_only_where_the_device_runs_it_natively():
    has = "avx512_bf16" in open("/proc/cpuinfo").read() or "amx_bf16" in open(
        "/proc/cpuinfo").read()
    assert native_bf16("cpu") == has
    assert resolve_amp("auto", "cpu") == ("bf16" if has else "off")
    assert resolve_amp("fp16", "cpu") == "fp16" and resolve_amp("off", "cpu") == "off"
    assert TrainConfig(amp="auto").amp == "auto"


def test_the_log_warns_of_bf16_asked_for_where_the_cpu_only_emulates_it(monkeypatch):
    import fcn_core.precision as precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: False)  # an AVX2 CPU
    warning = precision.amp_note("bf16", "bf16", "cpu")
    assert warning is not None and warning.startswith("warning: amp bf16 on a CPU without "
                                                      "avx512_bf16/AMX: bf16 is emulated")
    assert precision.amp_note("auto", "off", "cpu") == (
        "amp auto: off on cpu (no native bf16 on this CPU: no avx512_bf16/AMX)")
    assert precision.amp_note("off", "off", "cpu") is None
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.amp_note("bf16", "bf16", "cpu") is None
    assert precision.amp_note("auto", "bf16", "cpu") == (
        "amp auto: bf16 on cpu (native bf16: avx512_bf16/AMX)")
    assert precision.amp_note("auto", "bf16", "cuda") == "amp auto: bf16 on cuda"


def test_channels_last_auto_is_nhwc_on_gpus_and_under_autocast_and_nchw_for_fp32_on_a_cpu():
    """Full-width FCN-8s trained 1.3-1.5x faster in NCHW than NHWC in fp32 on an AVX2 CPU
    (bench/bench_model.py, 2026-12-07), about as fast on an avx512 one; NHWC is the fast
    layout of cuDNN and of oneDNN's bf16 kernels."""
    from fcn_core.precision import channels_last_note, resolve_channels_last

    assert TrainConfig().channels_last == "auto"
    assert TrainConfig(channels_last=True).channels_last is True
    assert resolve_channels_last("auto", "cpu", "off") is False
    assert resolve_channels_last("auto", "cpu", "bf16") is True
    assert resolve_channels_last("auto", "cuda", "off") is True
    assert resolve_channels_last("auto", "cuda", "fp16") is True
    assert resolve_channels_last(True, "cpu", "off") is True
    assert resolve_channels_last(False, "cuda", "bf16") is False
    assert channels_last_note("auto", "cpu", "off") == "channels_last auto: NCHW (fp32 on a CPU)"
    assert channels_last_note("auto", "cpu", "bf16") == (
        "channels_last auto: NHWC (bf16 autocast)")
    assert channels_last_note("auto", "cuda", "off") == "channels_last auto: NHWC (on a GPU)"
    assert channels_last_note(True, "cpu", "off") is None


@pytest.mark.parametrize("major, native", [(7, False), (8, True), (9, True)])
def test_native_bf16_on_cuda_means_ampere_or_later_not_emulation(monkeypatch, major, native):
    """A V100 or T4 (compute capability 7) only emulates bf16, though torch's
    ``is_bf16_supported()`` says True there: ``amp: auto`` must train in fp32 on it."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(major=major if index == 1 else 99))
    assert native_bf16("cuda:1") is native
    assert resolve_amp("auto", "cuda:1") == ("bf16" if native else "off")
