"""ConfusionMatrix against hand-computed values of the reference score.py formulas."""

import math

import numpy as np
import pytest
import torch

from fcn_core import ConfusionMatrix


def test_hand_computed_three_class_example():
    # gt    pred
    # 0 0   0 1
    # 1 1   1 1
    # 2 2   2 0
    gt = np.array([[0, 0], [1, 1], [2, 2]])
    pred = np.array([[0, 1], [1, 1], [2, 0]])
    cm = ConfusionMatrix(3).update(gt, pred)
    assert cm.hist.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    s = cm.scores()
    assert s["pixel_acc"] == pytest.approx(4 / 6)
    assert s["mean_acc"] == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3)
    # IU = diag / (rowsum + colsum - diag): class 0: 1/(2+2-1), 1: 2/(2+3-2), 2: 1/(2+1-1)
    ius = [1 / 3, 2 / 3, 1 / 2]
    assert s["per_class_iu"] == pytest.approx(ius)
    assert s["mean_iu"] == pytest.approx(sum(ius) / 3)
    assert s["fw_iu"] == pytest.approx(sum(2 / 6 * iu for iu in ius))


def test_ignore_label_stays_outside_the_histogram():
    gt = torch.tensor([[0, 255, 1], [255, 255, 1]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 0]])
    cm = ConfusionMatrix(3).update(gt, pred)
    assert cm.hist.sum() == 3
    assert cm.hist.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]


def test_classes_absent_from_ground_truth():
    # Class 2 never occurs in gt: its accuracy is NaN (excluded from mean acc); as it is
    # predicted once its IU is 0 and counts in mean IU. Class 3 is never seen at all: NaN IU.
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    s = ConfusionMatrix(4).update(gt, pred).scores()
    assert math.isnan(s["per_class_iu"][3])
    assert s["per_class_iu"][2] == 0.0
    assert s["mean_acc"] == pytest.approx((1 / 2 + 1) / 2)
    assert s["mean_iu"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert s["fw_iu"] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)


def test_merging_shards_equals_one_matrix_over_all_pixels():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, size=(8, 30, 20))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, 5, size=gt.shape)
    whole = ConfusionMatrix(5 + 1).update(gt, pred)
    merged = ConfusionMatrix(6)
    for shard in np.array_split(np.arange(8), 3):
        merged.merge(ConfusionMatrix(6).update(gt[shard], pred[shard]))
    assert np.array_equal(whole.hist, merged.hist)
    assert whole.scores() == merged.scores()


def test_matches_the_reference_fast_hist_on_random_data():
    rng = np.random.default_rng(1)
    n = 7
    a = rng.integers(0, n, size=5000)
    a[rng.random(5000) < 0.2] = 255
    b = rng.integers(0, n, size=5000)
    k = (a >= 0) & (a < n)
    ref = np.bincount(n * a[k].astype(int) + b[k], minlength=n**2).reshape(n, n)
    assert np.array_equal(ConfusionMatrix(n).update(a, b).hist, ref)


def test_bad_inputs_are_refused_clearly():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="same shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="class id 7"):
        cm.update(np.array([7]), np.array([0]))
    with pytest.raises(ValueError, match="pred holds class ids outside"):
        cm.update(np.array([0]), np.array([3]))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.array([0.5]), np.array([0]))
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="merge"):
        cm.merge(ConfusionMatrix(4))


def test_empty_matrix_scores_are_nan_not_errors():
    s = ConfusionMatrix(2).scores()
    assert math.isnan(s["pixel_acc"]) and math.isnan(s["mean_iu"])
