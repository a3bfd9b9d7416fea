"""Tests of ovseg.core.ops.metrics on small hand-made inputs."""

import math

import numpy as np
import pytest

from ovseg.core.ops.metrics import average_precision, harmonic_mean, mask_iou, precision_recall_curve, soft_iou


def _mask(rows):
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


def test_mask_iou_hand_made():
    pred = _mask(["##..",
                  "##..",
                  "...."])
    gt = _mask([".##.",
                ".##.",
                "...."])
    # intersection: column 1, 2 pixels; union: columns 0-2, 6 pixels
    assert mask_iou(pred, gt) == pytest.approx(2 / 6)
    assert mask_iou(gt, gt) == 1.0
    assert mask_iou(pred, np.zeros_like(gt)) == 0.0


def test_mask_iou_ignores_pixels_outside_valid():
    pred = _mask(["####",
                  "...."])
    gt = _mask(["##..",
                "...."])
    valid = _mask(["##..",
                   "####"])
    # the false positives in columns 2-3 of row 0 fall outside valid: a perfect score
    assert mask_iou(pred, gt, valid) == 1.0
    assert mask_iou(pred, gt) == pytest.approx(2 / 4)
    # a false positive inside valid still counts: 2 / (2 + 1)
    pred2 = pred.copy()
    pred2[1, 0] = True
    assert mask_iou(pred2, gt, valid) == pytest.approx(2 / 3)


def test_mask_iou_empty_is_one():
    empty = np.zeros((3, 4), dtype=bool)
    assert mask_iou(empty, empty) == 1.0
    # both masks only outside valid: empty over the valid pixels
    outside = _mask(["#...", "....", "...."])
    valid = ~outside
    assert mask_iou(outside, outside, valid) == 1.0


def test_mask_iou_validates_inputs():
    a = np.zeros((3, 4), dtype=bool)
    with pytest.raises(ValueError, match="same shape"):
        mask_iou(a, np.zeros((4, 3), dtype=bool))
    with pytest.raises(ValueError, match="valid"):
        mask_iou(a, a, np.ones((2, 2), dtype=bool))
    with pytest.raises(TypeError, match="boolean"):
        mask_iou(a.astype(np.float32), a)


def test_average_precision_with_ties_by_hand():
    scores = [0.9, 0.8, 0.8, 0.5, 0.5, 0.1]
    labels = [1, 0, 1, 1, 0, 0]
    # 3 positives. Distinct thresholds, high to low (ties enter together):
    #   >= 0.9: TP=1 FP=0 -> P=1/1=1,   R=1/3, dR=1/3 -> 1/3
    #   >= 0.8: TP=2 FP=1 -> P=2/3,     R=2/3, dR=1/3 -> 2/9
    #   >= 0.5: TP=3 FP=2 -> P=3/5,     R=3/3, dR=1/3 -> 1/5
    #   >= 0.1: TP=3 FP=3 -> P=1/2,     R=1,   dR=0   -> 0
    # AP = 1/3 + 2/9 + 1/5 = 15/45 + 10/45 + 9/45 = 34/45 = 0.7556
    assert average_precision(scores, labels) == pytest.approx(34 / 45)

    precision, recall, thresholds = precision_recall_curve(scores, labels)
    np.testing.assert_allclose(thresholds, [0.1, 0.5, 0.8, 0.9])
    np.testing.assert_allclose(precision, [1 / 2, 3 / 5, 2 / 3, 1, 1])
    np.testing.assert_allclose(recall, [1, 1, 2 / 3, 1 / 3, 0])
    # the curve and the AP agree: AP = sum over points of (R_n - R_{n+1}) * P_n
    assert -np.sum(np.diff(recall) * precision[:-1]) == pytest.approx(34 / 45)


def test_average_precision_order_of_ties_does_not_matter():
    scores = [0.9, 0.8, 0.8, 0.5, 0.5, 0.1]
    a = average_precision(scores, [1, 0, 1, 1, 0, 0])
    b = average_precision(scores, [1, 1, 0, 0, 1, 0])  # the same pairs, tied items swapped
    assert a == pytest.approx(b)


def test_average_precision_no_positive_is_nan():
    assert math.isnan(average_precision([0.3, 0.2, 0.1], [0, 0, 0]))
    assert math.isnan(average_precision([], []))
    precision, recall, _ = precision_recall_curve([0.3, 0.2], [False, False])
    assert np.all(np.isnan(recall[:-1]))


def test_average_precision_perfect_ranking_is_one():
    assert average_precision([0.9, 0.8, 0.3, 0.1], [True, True, False, False]) == 1.0
    assert average_precision([0.5], [1]) == 1.0


def test_average_precision_validates_inputs():
    with pytest.raises(ValueError, match="same length"):
        average_precision([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="finite"):
        average_precision([0.1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="0/1"):
        average_precision([0.1, 0.2], [1, 2])


def test_harmonic_mean():
    assert harmonic_mean(0.5, 0.5) == pytest.approx(0.5)
    assert harmonic_mean(0.2, 0.6) == pytest.approx(2 * 0.2 * 0.6 / 0.8)  # 0.3
    assert harmonic_mean(0.0, 0.9) == 0.0
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert math.isnan(harmonic_mean(float("nan"), 0.5))
    assert math.isnan(harmonic_mean(0.0, float("nan")))


def test_evaluation_scores_attention_maps_and_mask_precision_recall_by_hand():
    from ovseg.train.evaluate import _class_mean, _Scores
    from ovseg.core.types import Prior
    from ovseg.train.coco import ConceptTargets

    gt = np.zeros((4, 4), dtype=bool)
    gt[:2, :2] = True  # "cat", a target class: 4 pixels
    valid = np.ones((4, 4), dtype=bool)
    valid[3, 3] = False  # an unlabelled pixel: ignored
    targets = ConceptTargets(gt={"cat": gt}, valid=valid)
    att = np.zeros((4, 4), dtype=np.float32)
    att[0, 0], att[0, 2], att[3, 3] = 0.5, 1.0, 1.0  # peak outside the mask (first maximum: (0, 2))
    refined = gt.astype(np.float32)
    s = _Scores()
    s.add_attention("cat", [Prior(att, "m", "cat", "attention"), Prior(refined, "m", "cat", "attention_refined"),
                            Prior(att, "m", "cat", "probability")], targets)
    assert s.pointing["attention"]["cat"] == [0.0] and s.pointing["attention_refined"]["cat"] == [1.0]
    assert "probability" not in s.pointing
    # eq. 5 over the valid pixels: sum(a G) = 0.5; sum(max(a, G)) = 4 (inside) + 1.0 at (0, 2)
    assert s.soft_iou["attention"]["cat"] == [pytest.approx(0.5 / 5.0)]
    assert s.soft_iou["attention_refined"]["cat"] == [1.0]
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :] = True  # 4 pixels, 2 of them in the mask
    mask[3, 3] = True  # unlabelled: a false positive by the strict rule (precision and recall are strict)
    s.add_mask("cat", mask, targets)
    assert s.precision["cat"] == [pytest.approx(2 / 5)] and s.recall["cat"] == [0.5]
    # pointing: mean over classes of each class's hit rate
    assert _class_mean({"cat": [1.0, 0.0, 0.0, 0.0], "dog": [1.0]})["target"] == pytest.approx((0.25 + 1.0) / 2)


def test_presence_ap_on_held_out_images_ranks_only_those():
    from ovseg.train.evaluate import _presence, _Scores
    from ovseg.train.coco import ConceptTargets

    valid = np.ones((2, 2), dtype=bool)
    with_cat = ConceptTargets(gt={"cat": valid.copy()}, valid=valid)
    without = ConceptTargets(gt={}, valid=valid)
    s = _Scores()
    # training images: a perfect ranking (remembered); held-out images: the absent one scores higher
    s.add_presence({"cat": 0.9}, with_cat, held_out=False)
    s.add_presence({"cat": 0.1}, without, held_out=False)
    s.add_presence({"cat": 0.3}, with_cat, held_out=True)
    s.add_presence({"cat": 0.6}, without, held_out=True)
    everything = _presence(s)[0]["target"]
    held = _presence(s, held_out_only=True)[0]["target"]
    assert held == pytest.approx(0.5)  # the one positive ranks second of two
    assert everything == pytest.approx((1.0 + 2 / 3) / 2)  # positives at ranks 1 and 3


def test_soft_iou_is_eq5_on_a_hand_made_map():
    a = np.array([[1.0, 0.5], [0.0, 0.25]])
    g = np.array([[1, 1], [0, 0]], dtype=bool)
    # sum(a * g) = 1.5; sum(max(a, g)) = 1 + 1 + 0 + 0.25
    assert soft_iou(a, g) == pytest.approx(1.5 / 2.25)
    assert soft_iou(a, g, valid=np.array([[True, True], [True, False]])) == pytest.approx(0.75)
    assert soft_iou(np.zeros((2, 2)), np.zeros((2, 2), dtype=bool)) == 0.0


def test_auroc_by_hand_with_ties_and_without_both_classes():
    from ovseg.core.ops.metrics import auroc

    assert auroc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    # positives 0.5, 0.7; negatives 0.5, 0.1: pairs (0.5 vs 0.5 tie = 1/2), 0.5>0.1, 0.7>0.5, 0.7>0.1 -> 3.5 / 4
    assert auroc([0.5, 0.7, 0.5, 0.1], [True, True, False, False]) == pytest.approx(0.875)
    assert auroc(np.full(6, 0.3), [1, 0, 1, 0, 1, 0]) == 0.5  # a constant map says nothing
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_spearman_is_rank_correlation():
    from ovseg.core.ops.metrics import spearman

    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x ** 3) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, np.ones(5)))
    with pytest.raises(ValueError):
        spearman(x, x[:3])
