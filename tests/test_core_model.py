"""The FCN nets against the reference architecture: shapes, crops, kernels, fixed layers."""

import numpy as np
import pytest
import torch

from fcn_core import FCN, fcn8s, fcn8s_atonce, fcn16s, fcn32s
from fcn_core.optim import param_groups

BUILDERS = [fcn32s, fcn16s, fcn8s, fcn8s_atonce]
# Sizes 1..64 and odd sizes up to 500; paired with a second sweep so H != W is covered too.
# 1..64 covers every size modulo 32 (what the crops depend on) twice; larger ones sparsely.
SWEEP = list(range(1, 65)) + list(range(65, 501, 26)) + [499, 500]


def reference_upsample_filt(size: int) -> np.ndarray:
    """Written out independently from the reference surgery.py, for comparison."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    k = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            k[i, j] = (1 - abs(i - center) / factor) * (1 - abs(j - center) / factor)
    return k


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_scores_have_the_input_size_for_every_size(builder):
    # width 1/64 keeps 1 channel per conv block: geometry is all that matters here.
    model = builder(num_classes=3, width=1 / 64).eval()
    sizes = list(zip(SWEEP, reversed(SWEEP), strict=True))
    with torch.no_grad():
        for h, w in sizes:
            out = model(torch.zeros(2, 3, h, w))
            assert out.shape == (2, 3, h, w), (h, w, tuple(out.shape))


@pytest.mark.parametrize(
    "builder, expected",
    [(fcn32s, {"score": 19}),
     (fcn16s, {"score_pool4c": 5, "score": 27}),
     (fcn8s, {"score_pool4c": 5, "score_pool3c": 9, "score": 31}),
     (fcn8s_atonce, {"score_pool4c": 5, "score_pool3c": 9, "score": 31})],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_crop_offsets_are_the_reference_ones(builder, expected):
    assert builder(width=1.0).offsets == expected


def test_full_width_trunk_matches_vgg16_and_keys_match_torchvision():
    import torchvision

    model = fcn8s(width=1.0)
    tv = torchvision.models.vgg16(weights=None)
    ours = {k[len("features."):]: v.shape for k, v in model.state_dict().items()
            if k.startswith("features.")}
    assert ours == {k: v.shape for k, v in tv.features.state_dict().items()}
    assert model.fc6.weight.shape == (4096, 512, 7, 7)
    assert model.fc7.weight.shape == (4096, 4096, 1, 1)
    assert model.features[0].padding == (100, 100)
    assert all(m.ceil_mode for m in model.features if isinstance(m, torch.nn.MaxPool2d))


def test_parameters_are_counted_as_the_paper_counts_them():
    """FCN-VGG16 has 134M parameters in the paper's Table 1: VGG16's 138M less fc8's 4.1M,
    plus score_fr; the fixed bilinear upscore (21 x 21 kernels of 64 x 64) is no parameter
    there. A deconvolution that learns is counted."""
    from fcn_core.profile import learned_params

    model = fcn32s(width=1.0)
    total = sum(p.numel() for p in model.parameters())
    assert learned_params(model) == 134_346_581
    assert total - learned_params(model) == 21 * 21 * 64 * 64
    model.heads["out"].upscore.weight.requires_grad_(True)
    assert learned_params(model) == total


def test_width_scales_every_conv_including_fc6_fc7():
    model = fcn32s(width=0.125)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    assert model.fc6.weight.shape == (512, 64, 7, 7)
    assert model.fc7.weight.shape == (512, 512, 1, 1)


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_deconvolutions_are_bias_free_bilinear_and_score_layers_zero(builder):
    model = builder(num_classes=5, width=0.0625)
    deconvs = [(n, m) for n, m in model.named_modules()
               if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(deconvs) == {32: 1, 16: 2, 8: 3}[model.stride]
    for name, m in deconvs:
        assert m.bias is None, name
        k = m.kernel_size[0]
        expected = torch.zeros(5, 5, k, k)
        expected[range(5), range(5)] = torch.from_numpy(reference_upsample_filt(k)).float()
        torch.testing.assert_close(m.weight.detach(), expected, rtol=0, atol=0)
    for name, m in model.named_modules():
        if name.split(".")[-1].startswith("score_"):
            assert not m.weight.any() and not m.bias.any(), name


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_final_upscore_gets_no_gradient_and_is_not_optimised(builder):
    model = builder(num_classes=4, width=0.0625)
    # Non-zero score layers so that gradients flow through every path.
    for name, m in model.named_modules():
        if name.split(".")[-1].startswith("score_"):
            torch.nn.init.normal_(m.weight, std=0.1)
    model(torch.randn(1, 3, 40, 36)).square().sum().backward()
    head = model.heads["out"]
    final = head.final_upscore
    assert final.weight.grad is None and not final.weight.requires_grad
    groups = param_groups(model, lr=1e-3, weight_decay=5e-4)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert id(final.weight) not in in_groups
    # The intermediate deconvolutions learn (paper: initialised bilinear, then learned).
    for name in ("upscore2", "upscore_pool4"):
        if hasattr(head, name):
            layer = getattr(head, name)
            assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name
            assert id(layer.weight) in in_groups


def test_param_groups_follow_the_reference_solver():
    model = fcn16s(width=0.0625)
    weights, biases = param_groups(model, lr=1e-10, weight_decay=5e-4)
    assert biases["lr"] == 2e-10 and biases["weight_decay"] == 0.0
    assert weights["lr"] == 1e-10 and weights["weight_decay"] == 5e-4
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".bias") for p in biases["params"])
    assert not any(names[id(p)].endswith(".bias") for p in weights["params"])


def test_atonce_scales_pool_features_before_scoring():
    model = fcn8s_atonce(width=0.0625)
    assert model.scale_pool4.item() == pytest.approx(0.01)
    assert model.scale_pool3.item() == pytest.approx(0.0001)
    assert fcn8s(width=0.0625).scale_pool4.item() == 1.0
    # The scale sits in front of the score layer: scores on pool3 shrink by 1e-4 (bias aside).
    head = model.heads["out"]
    seen = {}
    # (hooks must return None, or they would replace the layer's output)
    head.score_pool3.register_forward_hook(lambda m, a, o: seen.update({"in": a[0]}))
    model.features[16].register_forward_hook(lambda m, a, o: seen.update({"pool3": o}))
    model(torch.randn(1, 3, 32, 32))
    torch.testing.assert_close(seen["in"], seen["pool3"] * 1e-4)


def test_heads_give_one_score_map_each_with_own_skips():
    model = fcn16s(width=0.0625, heads={"sem": 33, "geo": 3})
    out = model(torch.randn(2, 3, 48, 40))
    assert isinstance(out, dict) and set(out) == {"sem", "geo"}
    assert out["sem"].shape == (2, 33, 48, 40) and out["geo"].shape == (2, 3, 48, 40)
    assert model.heads["sem"].score_pool4 is not model.heads["geo"].score_pool4
    # Changing one head's skip leaves the other head's scores alone.
    x = torch.randn(1, 3, 48, 40)
    before = model(x)
    torch.nn.init.normal_(model.heads["geo"].score_pool4.weight)
    after = model(x)
    torch.testing.assert_close(before["sem"], after["sem"], rtol=0, atol=0)
    assert not torch.equal(before["geo"], after["geo"])


def test_four_channel_input_for_rgbd():
    model = fcn32s(num_classes=40, width=0.0625, in_channels=4)
    assert model.features[0].in_channels == 4
    assert model(torch.randn(1, 4, 33, 47)).shape == (1, 40, 33, 47)
    with pytest.raises(ValueError, match="in_channels=4"):
        model(torch.randn(1, 3, 33, 47))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_classes": 0}, "num_classes.*0"), ({"num_classes": -3}, "num_classes.*-3"),
     ({"width": 0}, "width.*0"), ({"width": -0.5}, "width.*-0.5"),
     ({"in_channels": 0}, "in_channels.*0"), ({"heads": {"sem": 0}}, "num_classes.*0")],
)
@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_bad_builder_arguments_raise_value_error_naming_them(builder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        builder(**kwargs)


def test_builders_are_keyword_only_and_2d_input_is_refused():
    with pytest.raises(TypeError):
        fcn8s(21)  # type: ignore[misc]
    model = fcn8s(width=0.0625)
    with pytest.raises(ValueError, match=r"x .*\(64, 64\)"):
        model(torch.zeros(64, 64))


def test_config_rebuilds_the_same_net():
    model = fcn8s(num_classes=7, width=0.0625, in_channels=4)
    clone = FCN(model.config)
    clone.load_state_dict(model.state_dict())
    assert clone.config.to_dict() == {"variant": "fcn8s", "heads": {"out": 7}, "width": 0.0625,
                                      "in_channels": 4}


@pytest.mark.parametrize("builder", [fcn32s, fcn8s])
def test_training_flops_are_counted_as_the_backward_runs(builder):
    """fcn_core.profile.train_flops agrees with torch's own FLOP counter: no weight gradient
    for the frozen final upscore, no input gradient for conv1_1 (the image)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fcn_core import segmentation_loss
    from fcn_core.profile import total_macs, train_flops

    net = builder(width=1 / 8).train()
    x = torch.randn(1, 3, 64, 64)
    counted = train_flops(net, x)
    with FlopCounterMode(display=False) as fc:
        segmentation_loss(net(x), torch.zeros(1, 64, 64, dtype=torch.long)).backward()
    assert counted.total == fc.get_total_flops()
    assert counted.total < 3 * counted.forward  # the naive count overstates it
    # Inference runs every diagonal deconvolution per class; training too, once they are
    # fixed as the reference fixes them: then both count the same forward.
    assert 2 * total_macs(net.eval(), x) <= counted.forward
    for name, p in net.named_parameters():
        p.requires_grad_("upscore" not in name)
    assert train_flops(net.train(), x).forward == 2 * total_macs(net.eval(), x)


def test_a_fixed_diagonal_deconvolution_runs_per_class_with_the_same_output():
    """FCN's bilinear upsampling (C x C kernels, only the diagonal non-zero, fixed) runs as C
    per-class transposed convolutions; a learned or non-diagonal weight as the full layer."""
    from fcn_core.bilinear import Deconvolution, bilinear_weight

    up = Deconvolution(21, 21, 16, stride=8, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_weight(21, 16))
    x = torch.randn(2, 21, 7, 9)
    full = torch.nn.functional.conv_transpose2d(x, up.weight.detach(), None, 8)
    with torch.no_grad():
        got = up(x)
    assert up.ran_groups == 21 and got.shape == full.shape
    torch.testing.assert_close(got, full, rtol=0, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the demo's amp:
        half = up(x)  # computed in float32 (oneDNN's grouped bf16 one is slow), bf16 out
        dense = torch.nn.functional.conv_transpose2d(x, up.weight.detach(), None, 8)
    assert half.dtype == dense.dtype == torch.bfloat16
    # The float32 result rounded once to bf16: closer to the true sums than the bf16 layer.
    assert torch.equal(half, got.to(torch.bfloat16))
    assert (half.float() - full).abs().max() <= (dense.float() - full).abs().max()
    up(x.requires_grad_()).sum().backward()  # the weight learns: the full layer, its gradient
    assert up.ran_groups == 1 and up.weight.grad is not None
    up.weight.requires_grad_(False)
    with torch.no_grad():  # a weight changed in place (a learned one loaded) is seen at once
        up.weight[0, 1] = 0.5
    out = up(x.detach())
    assert up.ran_groups == 1
    torch.testing.assert_close(out, torch.nn.functional.conv_transpose2d(
        x.detach(), up.weight, None, 8))


@pytest.mark.parametrize("channels_last", [False, True])
def test_fc6_and_fc7_as_matrix_products_are_the_convolutions(channels_last):
    """fc6 (7x7) and fc7 (1x1) computed as patches x weight: the convolution's output and
    gradients; under bf16 inference autocast a cast weight is kept, and a changed weight is
    seen at once; a dilated one (shift-and-stitch's densify) runs the convolution."""
    from fcn_core.fc_conv import FullyConvolutional

    torch.manual_seed(0)
    for k, c_in, c_out in ((7, 16, 24), (1, 24, 24)):
        layer = FullyConvolutional(c_in, c_out, k)
        x = torch.randn(2, c_in, 11, 13)
        if channels_last:
            layer = layer.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        conv = torch.nn.functional.conv2d(x, layer.weight, layer.bias)
        xg = x.clone().requires_grad_()
        out = layer(xg)
        torch.testing.assert_close(out, conv, rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
        # The gradient has the weight's own strides (DDP's bucket views are laid out like the
        # weight, and warns "Grad strides do not match bucket view strides" otherwise).
        assert layer.weight.grad.stride() == layer.weight.stride()
        wg, xgrad = layer.weight.grad.clone(), xg.grad.clone()
        layer.weight.grad = None
        xc = x.clone().requires_grad_()
        torch.nn.functional.conv2d(xc, layer.weight, layer.bias).square().sum().backward()
        torch.testing.assert_close(xgrad, xc.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(wg, layer.weight.grad, rtol=1e-4, atol=1e-4)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            half = layer(x)
            assert half.dtype == torch.bfloat16 and layer._cast.dtype == torch.bfloat16
            torch.testing.assert_close(half.float(), conv, rtol=0.05, atol=0.05)
            layer.weight.mul_(2)  # a new weight (a checkpoint loaded in place)
            doubled = layer(x).float()
        torch.testing.assert_close(doubled - layer.bias.view(1, -1, 1, 1),
                                   2 * (conv - layer.bias.view(1, -1, 1, 1)), rtol=0.05,
                                   atol=0.1)
    layer.dilation = (2, 2)  # densify: the convolution itself
    assert torch.equal(layer(x), torch.nn.functional.conv2d(x, layer.weight, layer.bias,
                                                            dilation=2))
