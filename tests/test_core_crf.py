"""fcn_core.crf: DeepLab's fully connected CRF (pydensecrf2) and the ``--crf`` option."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fcn_core.crf import CRFParams, dense_crf
from fcn_core.inference import InferenceOptions, predict_labels, predict_scores
from fcn_core.transforms import image_to_tensor

MEAN = (104.0, 117.0, 123.0)
COLOURS = np.array([[40, 40, 40], [200, 60, 60], [60, 180, 70]])


def scene(seed: int = 0, h: int = 96, w: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(labels (H, W), uint8 RGB image): an ellipse and a bar on a background, each its own
    colour with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    gt = (((yy - 48) ** 2 / 30**2 + (xx - 60) ** 2 / 40**2) < 1).astype(np.int64)
    gt[(xx > 95) & (yy > 20) & (yy < 70)] = 2
    image = np.clip(COLOURS[gt] + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    return gt, image


def coarse_noisy_logits(gt: np.ndarray, seed: int = 1) -> np.ndarray:
    """What a stride-8 net gives: the labels averaged over 8x8 cells, upsampled bilinearly
    (blurred, misplaced boundaries), plus noise. (K, H, W)."""
    onehot = torch.from_numpy(np.eye(3)[gt].transpose(2, 0, 1)).float()[None]
    coarse = F.avg_pool2d(onehot, 8, ceil_mode=True)
    up = F.interpolate(coarse, size=gt.shape, mode="bilinear", align_corners=False)[0]
    rng = np.random.default_rng(seed)
    return (4 * up.numpy() + rng.normal(0, 0.6, up.shape)).astype(np.float32)


def boundary_band(gt: np.ndarray, radius: int = 4) -> np.ndarray:
    """Pixels within ``radius`` of a label boundary (DeepLab's trimap evaluation)."""
    t = torch.from_numpy(gt)[None, None].float()
    k = 2 * radius + 1
    hi = F.max_pool2d(t, k, 1, radius)
    lo = -F.max_pool2d(-t, k, 1, radius)
    return (hi != lo)[0, 0].numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(logits).softmax(0).numpy()


def test_the_crf_snaps_a_coarse_noisy_prediction_to_the_image_boundaries():
    gt, image = scene()
    probs = softmax(coarse_noisy_logits(gt))
    band = boundary_band(gt)
    raw = probs.argmax(0)
    refined = dense_crf(probs, image)
    crf = refined.argmax(0)
    raw_band, crf_band = (raw == gt)[band].mean(), (crf == gt)[band].mean()
    assert raw_band < 0.9 and crf_band > raw_band + 0.08, (raw_band, crf_band)
    assert (crf == gt).mean() > (raw == gt).mean()
    assert refined.shape == probs.shape and refined.dtype == np.float32
    assert np.allclose(refined.sum(0), 1, atol=1e-4)
    # The bilateral kernel reads the image: on a flat grey one nothing marks the boundaries.
    flat = dense_crf(probs, np.full_like(image, 128)).argmax(0)
    assert (flat == gt)[band].mean() < crf_band - 0.05


def test_crf_parameters_are_deeplab_largefovs_and_are_checked():
    p = CRFParams()
    assert (p.iterations, p.bilateral_weight, p.bilateral_xy, p.bilateral_rgb,
            p.gaussian_weight, p.gaussian_xy) == (10, 4.0, 121.0, 5.0, 3.0, 3.0)
    with pytest.raises(ValueError, match="iterations must be an int >= 1"):
        CRFParams(iterations=0)
    with pytest.raises(ValueError, match="bilateral_xy must be > 0"):
        CRFParams(bilateral_xy=0)
    gt, image = scene()
    with pytest.raises(ValueError, match=r"image must be uint8 \(96, 128, 3\)"):
        dense_crf(softmax(coarse_noisy_logits(gt)), image[:50])
    with pytest.raises(ValueError, match="crf must be a bool"):
        InferenceOptions(crf="yes")


class Fixed(torch.nn.Module):
    """A 'net' whose scores are given (the CRF's wiring, not a net, is under test)."""

    def __init__(self, logits: np.ndarray) -> None:
        super().__init__()
        self.logits = torch.from_numpy(logits)[None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1, -1, -1)


def test_crf_option_refines_the_scores_with_the_image_the_net_scored():
    """predict_scores(crf=True) recovers each image from the preprocessed batch and its mean
    and gives the CRF's marginals; predict_labels passes the mean; without a mean or with
    input that is not RGB it refuses."""
    gt, image = scene()
    logits = coarse_noisy_logits(gt)
    net = Fixed(logits)
    x = image_to_tensor(image, MEAN)[None]
    got = predict_scores(net, x, InferenceOptions(crf=True), mean_bgr=MEAN)
    expected = dense_crf(softmax(logits), image)
    assert np.array_equal(got[0].numpy(), expected)
    (labels,) = predict_labels(net, [image], MEAN, InferenceOptions(crf=True))
    assert np.array_equal(labels, expected.argmax(0).astype(np.uint8))
    # Averaged probabilities (flip) are refined as they are, not softmaxed twice. (The
    # fixed scores of the mirrored image are mirrored back.)
    flipped = predict_scores(net, x, InferenceOptions(flip=True, crf=True), mean_bgr=MEAN)
    both = (softmax(logits) + softmax(logits)[..., ::-1]) / 2
    assert np.allclose(flipped[0].numpy(), dense_crf(both.astype(np.float32), image),
                       atol=1e-5)
    with pytest.raises(ValueError, match="needs RGB input and its mean_bgr"):
        predict_scores(net, x, InferenceOptions(crf=True))
    with pytest.raises(ValueError, match="needs RGB input"):
        predict_scores(net, torch.zeros(1, 4, 96, 128), InferenceOptions(crf=True),
                       mean_bgr=MEAN)


def test_crf_is_refused_in_one_line_where_it_cannot_run(monkeypatch):
    """A model that reads HHA or depth, or a machine without pydensecrf2: a usage error
    before anything is scored."""
    from types import SimpleNamespace

    import fcn_core.crf
    from pipelines.errors import UsageError
    from pipelines.predict import check_options

    net = Fixed(np.zeros((3, 4, 4), np.float32))
    with pytest.raises(UsageError, match="reads input='hha'"):
        check_options(SimpleNamespace(net=net, input="hha"), InferenceOptions(crf=True), "m")
    check_options(SimpleNamespace(net=net, input="rgb"), InferenceOptions(crf=True), "m")
    monkeypatch.setattr(fcn_core.crf, "available", lambda: False)
    with pytest.raises(UsageError, match=r"--crf: the dense CRF needs pydensecrf2 .*\[crf\]"):
        check_options(SimpleNamespace(net=net, input="rgb"), InferenceOptions(crf=True), "m")
    check_options(SimpleNamespace(net=net, input="rgb"), InferenceOptions(), "m")


def test_fcn_predict_crf_writes_the_crfs_labels(tmp_path):
    """`fcn predict --crf` on a checkpoint: the written labels are the CRF's argmax of the
    net's probabilities for that image."""
    from PIL import Image

    from fcn_core.fcn import fcn8s
    from flows.cli import main
    from pipelines.registry import resolve_model

    torch.manual_seed(3)
    model = fcn8s(width=1 / 16)
    for name, m in model.named_modules():
        if name.split(".")[-1].startswith("score_"):
            torch.nn.init.normal_(m.weight, std=1.0)
    (tmp_path / "ck").mkdir()
    torch.save({"model": model.state_dict(), "arch": {"kind": "fcn", **model.config.to_dict()},
                "step": 0, "config": {"dataset": "voc", "input": "rgb"}},
               tmp_path / "ck" / "checkpoint.pt")
    _, image = scene(h=40, w=56)
    Image.fromarray(image).save(tmp_path / "scene.png")
    assert main(["predict", "--model", str(tmp_path / "ck"), str(tmp_path / "scene.png"),
                 "--out", str(tmp_path / "out"), "--crf"]) == 0
    written = np.array(Image.open(tmp_path / "out" / "scene.png"))
    loaded = resolve_model(str(tmp_path / "ck"), None)
    x = image_to_tensor(image, loaded.mean_bgr)[None]
    with torch.no_grad():
        probs = loaded.net.eval()(x).softmax(1)[0].numpy()
    assert np.array_equal(written, dense_crf(probs, image).argmax(0))
    assert not np.array_equal(written, probs.argmax(0))  # the CRF changed something
