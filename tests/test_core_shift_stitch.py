"""Shift-and-stitch (§3.2): the paper's claim, exactly, and the FCN inference mode."""

import pytest
import torch
from torch import nn

from fcn_core import fcn8s, fcn16s, fcn32s
from fcn_core.shift_stitch import densify, interlace, shift_and_stitch, shift_stitch_predict


def _random(net: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    return net.eval()


@pytest.mark.parametrize("f", [2, 3])
@pytest.mark.parametrize("size", [(23, 30), (24, 24), (17, 19)])
def test_shift_and_stitch_equals_the_densified_net_exactly(f, size):
    """For a net whose last pooling layer has stride f: shift-and-stitch of the input (f**2
    copies shifted by one pixel each) equals the same net with that pooling at stride 1 and
    every later filter rarefied by f. Unpadded layers before the pooling: a shifted input is
    then exactly a shifted pooling input, so the claim holds at every pixel, borders too."""
    net = _random(nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU(),
        nn.MaxPool2d(f, stride=f, ceil_mode=True),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=2), nn.ReLU(),
        nn.Conv2d(8, 5, 1)))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        stitched = shift_and_stitch(net, x, f)
        dense = densify(net)(x)
        coarse = net(x)
    assert stitched.shape == dense.shape
    torch.testing.assert_close(stitched, dense, rtol=1e-5, atol=1e-5)
    assert torch.equal(stitched[..., ::f, ::f], coarse)  # shift (0, 0) is the net itself
    assert dense.shape[-2] > coarse.shape[-2]  # f times finer


def _fcn_random(model: nn.Module, seed: int) -> nn.Module:
    """The builder's random trunk (kaiming), random score layers (zero at build); the fixed
    bilinear deconvolutions (upscore*) kept."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "score" in name and "upscore" not in name:
            p.data.normal_(0, 0.1)
    return model.eval()


def test_fcn32s_pool5_stitched_equals_pool5_at_stride_1_with_fc6_rarefied():
    """The VGG16 FCN-32s itself, on random weights: stitching the maps after pool5 (shifts of
    pool5's input) equals the net with pool5 at stride 1 and fc6 dilated by 2, score_fr out."""
    model = _fcn_random(fcn32s(num_classes=4, width=1 / 16), 3)
    head = model.heads["out"]
    tail = nn.Sequential(model.features[-1], model.fc6, model.relu6, model.fc7, model.relu7,
                         head.score_fr)
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        pre_pool5 = model.features[:-1](x)
        stitched = shift_and_stitch(tail, pre_pool5, 2)
        dense = densify(tail)(pre_pool5)
    assert stitched.shape == dense.shape and stitched.shape[-1] > tail(pre_pool5).shape[-1]
    torch.testing.assert_close(stitched, dense, rtol=1e-4, atol=1e-4)


def test_interlace_places_each_shift_and_refuses_missing_ones():
    maps = {(y, x): torch.full((1, 1, 2, 2), float(10 * y + x)) for y in range(2) for x in
            range(2)}
    out = interlace(maps, 2)
    assert out[0, 0].tolist() == [[0, 1, 0, 1], [10, 11, 10, 11], [0, 1, 0, 1], [10, 11, 10, 11]]
    del maps[(1, 1)]
    with pytest.raises(ValueError, match="the 4 shifts"):
        interlace(maps, 2)


@pytest.mark.parametrize("build", [fcn32s, fcn16s, fcn8s])
def test_fcn_inference_mode_aligns_with_the_net_and_refines_the_grid(build):
    """f = 1 resamples the net's own coarse map: inside the image (away from the borders,
    where the net's fixed deconvolution tapers) it equals the net's output, so the coordinate
    maps align; f = 2 and 4 give (N, C, H, W) too, and differ from f = 1."""
    model = _fcn_random(build(num_classes=3, width=1 / 16), 5)
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        plain = model(x)
    one = shift_stitch_predict(model, x, 1)
    assert one.shape == plain.shape == (1, 3, 96, 80)
    s = model.stride
    torch.testing.assert_close(one[..., s:-s, s:-s], plain[..., s:-s, s:-s], rtol=1e-4,
                               atol=1e-4)
    for f in (2, 4):
        finer = shift_stitch_predict(model, x, f)
        assert finer.shape == plain.shape and not torch.allclose(finer, one)
    with pytest.raises(ValueError, match="dividing the output stride"):
        shift_stitch_predict(model, x, 3)
