"""The evaluation protocol's scoring on hand-made masks: strict IoU (the headline) counts every pixel outside
the class's masks as a negative and ignores only its crowd regions; lenient IoU ignores unlabelled pixels."""

import numpy as np
import pytest

from ovseg.train.coco import ConceptTargets
from ovseg.train.evaluate import _Scores, _acceptance, _split_mean


def _targets():
    gt = np.zeros((10, 10), bool)
    gt[0:4, 0:5] = True  # 20 dog pixels
    other = np.zeros((10, 10), bool)
    other[6:10, 6:10] = True  # 16 pixels of another class: labelled, not dog
    crowd = np.zeros((10, 10), bool)
    crowd[0:2, 8:10] = True  # 4 crowd pixels of dog
    valid = gt | other | crowd
    return ConceptTargets(gt={"dog": gt}, valid=valid, crowd={"dog": crowd})


def test_strict_counts_unlabelled_pixels_and_ignores_only_crowd():
    t = _targets()
    mask = np.zeros((10, 10), bool)
    mask[0:4, 0:5] = True   # the dog exactly
    mask[4:6, 0:5] = True   # +10 unlabelled pixels: wrong by the strict rule, ignored by the lenient one
    mask[0:2, 8:10] = True  # +4 crowd pixels: ignored by both
    mask[6:7, 6:10] = True  # +4 pixels of the other class: wrong by both
    s = _Scores()
    s.add_mask("dog", mask, t, held_out=True)
    assert s.iou["dog"] == [pytest.approx(20 / 34)]          # union 20 + 10 + 4 (crowd left out)
    assert s.iou_lenient["dog"] == [pytest.approx(20 / 24)]  # union 20 + 4 (unlabelled and crowd left out)
    assert s.iou_held_out["dog"] == s.iou["dog"]
    assert s.precision["dog"] == [pytest.approx(20 / 34)] and s.recall["dog"] == [pytest.approx(1.0)]


def test_whole_image_mask_scores_low_by_the_strict_rule():
    t = _targets()
    s = _Scores()
    s.add_mask("dog", np.ones((10, 10), bool), t)
    assert s.iou["dog"][0] == pytest.approx(20 / 96)         # every pixel but the 4 crowd ones
    assert s.iou_lenient["dog"][0] == pytest.approx(20 / 36)


def test_acceptance_and_split_means():
    per_pair = {"dog": [0.2, 0.5, 0.8], "person": [0.74, 0.76]}  # dog is a target class, person a base one
    acc = _acceptance(per_pair)
    assert acc["target_0.5"] == pytest.approx(2 / 3) and acc["target_0.75"] == pytest.approx(1 / 3)
    assert acc["base_0.5"] == 1.0 and acc["base_0.75"] == 0.5
    m = _split_mean(per_pair)
    assert m["target"] == pytest.approx(0.5) and m["base"] == pytest.approx(0.75)
    assert m["h"] == pytest.approx(2 * 0.5 * 0.75 / 1.25)


def test_presence_calibration_bins_on_held_out_base_classes():
    from ovseg.train.evaluate import _calibration

    s = _Scores()
    # person (base): scores 0.1 absent x3, 0.9 present x3, on held-out images; one non-held-out row is ignored
    for score, present in [(0.1, False)] * 3 + [(0.9, True)] * 3:
        s.scores["person"].append(score)
        s.labels["person"].append(present)
        s.held_out["person"].append(True)
    s.scores["person"].append(0.9), s.labels["person"].append(False), s.held_out["person"].append(False)
    s.scores["dog"].append(0.9), s.labels["dog"].append(False), s.held_out["dog"].append(True)  # target: ignored
    cal = _calibration(s)
    assert cal["pairs"] == 6
    assert cal["brier"] == pytest.approx(0.01)  # (0.1 - 0)^2 and (0.9 - 1)^2
    assert [(b["pairs"], b["share_present"]) for b in cal["bins"]] == [(3, 0.0), (3, 1.0)]
