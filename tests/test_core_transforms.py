"""Input conventions, losses, batching, palettes."""

import numpy as np
import pytest
import torch

from fcn_core.losses import multi_head_loss, segmentation_loss
from fcn_core.palettes import NYUD_CLASSES, SIFTFLOW_CLASSES, VOC_CLASSES, colorize, voc_colormap
from fcn_core.transforms import (
    MEAN_BGR,
    depth_to_tensor,
    image_to_tensor,
    pad_batch,
    random_mirror,
    tensor_to_image,
)


def test_image_to_tensor_is_bgr_minus_mean_chw_and_invertible():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30  # R, G, B
    x = image_to_tensor(rgb, MEAN_BGR["voc"])
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    b, g, r = MEAN_BGR["voc"]
    assert x[0, 0, 0].item() == pytest.approx(30 - b)  # channel 0 is blue
    assert x[2, 0, 0].item() == pytest.approx(10 - r)
    assert np.array_equal(tensor_to_image(x, MEAN_BGR["voc"]), rgb)


def test_depth_is_log_millimetres_minus_mean_and_holes_are_finite():
    d = depth_to_tensor(np.array([[0, 2500]], np.uint16))
    assert d.shape == (1, 1, 2) and torch.isfinite(d).all()
    assert d[0, 0, 1].item() == pytest.approx(np.log(2500) - 7.844, abs=1e-5)


def test_pad_batch_pads_images_with_zero_and_labels_with_255():
    imgs = [torch.ones(3, 4, 5), torch.ones(3, 6, 2)]
    labs = [torch.zeros(4, 5, dtype=torch.int64), torch.ones(6, 2, dtype=torch.int64)]
    x, y = pad_batch(imgs, labs, multiple=4)
    assert x.shape == (2, 3, 8, 8) and y.shape == (2, 8, 8)
    assert x[0, :, 4:, :].abs().sum() == 0 and x[0, :, :4, :5].eq(1).all()
    assert y[0, :4, :5].eq(0).all() and y[0, 4:, :].eq(255).all() and y[1, :, 2:].eq(255).all()
    _, ys = pad_batch(imgs, [{"sem": labs[0], "geo": labs[0]}, {"sem": labs[1], "geo": labs[1]}])
    assert set(ys) == {"sem", "geo"} and ys["geo"].shape == (2, 6, 5)


def test_random_mirror_flips_image_and_label_together():
    g = torch.Generator().manual_seed(0)
    img = torch.arange(12.0).view(1, 3, 4)
    lab = torch.arange(12).view(3, 4)
    flips = 0
    for _ in range(50):
        i2, l2 = random_mirror(img, lab, g)
        assert torch.equal(i2[0].long(), l2)
        flips += int(not torch.equal(l2, lab))
    assert 10 < flips < 40


def test_loss_unnormalised_is_a_sum_and_normalised_a_mean_over_valid_pixels():
    scores = torch.zeros(1, 3, 2, 2)  # uniform: each pixel costs log 3
    target = torch.tensor([[[0, 1], [255, 2]]])
    assert segmentation_loss(scores, target).item() == pytest.approx(3 * np.log(3))
    assert segmentation_loss(scores, target, normalize=True).item() == pytest.approx(np.log(3))
    empty = torch.full((1, 2, 2), 255)
    assert segmentation_loss(scores.requires_grad_(), empty, normalize=True).item() == 0.0
    two = multi_head_loss({"a": scores, "b": scores}, {"a": target, "b": target})
    assert two.item() == pytest.approx(6 * np.log(3))
    with pytest.raises(ValueError, match="must agree"):
        segmentation_loss(scores, torch.zeros(1, 3, 3, dtype=torch.int64))


def test_palettes_and_class_lists():
    cmap = voc_colormap()
    assert cmap[0].tolist() == [0, 0, 0] and cmap[1].tolist() == [128, 0, 0]
    assert cmap[15].tolist() == [192, 128, 128] and cmap[255].tolist() == [224, 224, 192]
    assert len(VOC_CLASSES) == 21 and len(NYUD_CLASSES) == 40 and len(SIFTFLOW_CLASSES) == 33
    assert colorize(np.array([[0, 255]])).shape == (1, 2, 3)


def test_nyud_class_names_match_the_real_class_mapping_file(realdata):
    import scipy.io

    p = realdata / "nyud" / "nyuv2-python-toolkit_meta" / "classMapping40.mat"
    names = [str(n[0]) for n in scipy.io.loadmat(str(p))["className"][0]]
    assert [n.replace("_", " ") for n in names] == list(NYUD_CLASSES)


def test_net_input_follows_the_reference_conventions_for_each_input():
    """What training, evaluation and the served model feed the net, against numpy by hand:
    BGR minus the mean, HHA minus its mean in file order (no flip), log depth in mm (holes as
    1 mm) minus its mean, and colour then HHA for late fusion."""
    from fcn_core.transforms import MEAN_HHA, MEAN_LOG_DEPTH, net_input

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    hha = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    depth = rng.integers(0, 9000, (2, 5, 7)).astype(np.uint16)
    depth[0, 0, 0] = 0
    mean = (104.0, 116.7, 122.7)
    bgr = rgb[..., ::-1].astype(np.float32) - np.float32(mean)
    want_hha = hha.astype(np.float32) - np.float32(MEAN_HHA)
    want_d = np.log(np.maximum(depth.astype(np.float32), 1.0)) - np.float32(MEAN_LOG_DEPTH)
    t = torch.from_numpy
    nchw = lambda a: a.transpose(0, 3, 1, 2)  # noqa: E731
    cases = {
        "rgb": (net_input(t(rgb), "rgb", mean), nchw(bgr)),
        "hha": (net_input(None, "hha", mean, hha=t(hha)), nchw(want_hha)),
        "rgbd": (net_input(t(rgb), "rgbd", mean, depth=t(depth.astype(np.int32))),
                 np.concatenate([nchw(bgr), want_d[:, None]], axis=1)),
        "rgb-hha": (net_input(t(rgb), "rgb-hha", mean, hha=t(hha)),
                    np.concatenate([nchw(bgr), nchw(want_hha)], axis=1)),
    }
    for name, (got, want) in cases.items():
        assert got.dtype == torch.float32 and tuple(got.shape) == want.shape, name
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="needs HHA"):
        net_input(t(rgb), "rgb-hha", mean)
    with pytest.raises(ValueError, match="input must be one of"):
        net_input(t(rgb), "bgr", mean)
