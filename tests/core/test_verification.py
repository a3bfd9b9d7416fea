"""Concept Mask's verification calibration (ovseg.core.methods.concept_mask.verification) on hand-made scores."""

import hashlib

import numpy as np
import pytest

from ovseg.core.ops.metrics import best_f1_threshold
from ovseg.core.methods.concept_mask.verification import (Calibration, CalibrationSet,
                                                          fit_calibration, fit_cross_fitted, fit_logistic)


def test_best_f1_threshold_by_hand():
    scores = np.array([0.9, 0.8, 0.6, 0.4, 0.3])
    labels = np.array([True, True, False, True, False])
    t, f1 = best_f1_threshold(scores, labels)
    # t=0.8: P=1, R=2/3 -> 0.8; t=0.4: P=3/4, R=1 -> 6/7 (the best); t=0.3: P=3/5 -> 0.75
    assert t == 0.4 and f1 == pytest.approx(6 / 7)


def test_logistic_fit_recovers_a_known_curve():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-(4 * x - 1)))
    a, b = fit_logistic(x, y)
    assert a == pytest.approx(4, abs=0.3) and b == pytest.approx(-1, abs=0.15)


def _synthetic(rng, n=200):
    """Concept 'high' is present above 0.6, 'low' above 0.2, 'rare' is seen present twice only."""
    scores, labels = {}, {}
    for name, cut in (("high", 0.6), ("low", 0.2)):
        s = rng.uniform(0, 1, n)
        scores[name], labels[name] = s, s > cut
    scores["rare"] = rng.uniform(0, 1, n)
    labels["rare"] = np.zeros(n, bool)
    labels["rare"][[0, 1]] = True
    return scores, labels


def test_per_concept_thresholds_and_a_gate_that_only_fires_when_sure():
    scores, labels = _synthetic(np.random.default_rng(1))
    cal = fit_calibration(scores, labels)
    assert cal.thresholds["high"] == pytest.approx(0.6, abs=0.02)
    assert cal.thresholds["low"] == pytest.approx(0.2, abs=0.02)
    assert "rare" not in cal.thresholds  # too few positives for its own threshold: the shared one
    assert cal.threshold("rare") == (cal.global_threshold, False) and cal.threshold("high")[1]
    # the probability rises with the score, and sits near 1/2 at a concept's own threshold
    assert cal.probability("high", 0.9) > cal.probability("high", 0.6) > cal.probability("high", 0.3)
    assert cal.probability("low", 0.5) > cal.probability("high", 0.5)
    assert cal.gate > 0
    assert cal.empties("high", 0.05) and not cal.empties("high", 0.95)
    assert cal.covers("rare") and cal.empties("rare", -1.0)  # scored in calibration: gated on the shared threshold
    assert not cal.covers("an unseen word") and not cal.empties("an unseen word", -1.0)  # never emptied


def test_cross_fitted_calibration_judges_each_image_without_itself(tmp_path):
    rng = np.random.default_rng(2)
    samples = []
    for i in range(60):
        s = {"high": float(rng.uniform()), "low": float(rng.uniform())}
        samples.append({"key": hashlib.sha1(str(i).encode()).hexdigest()[:16], "scores": s,
                        "present": {c for c, cut in (("high", 0.6), ("low", 0.2)) if s[c] > cut}})
    cs = fit_cross_fitted(samples)
    assert len(cs.folds) == 2 and sum(len(images) for images, _ in cs.folds) == 60
    cal, how = cs.for_image(samples[0]["key"])
    assert how.startswith("fold") and cal is not cs.all
    assert cs.for_image("not-a-calibration-image")[0] is cs.all
    cs.save(tmp_path / "verification.json")
    back = CalibrationSet.load(tmp_path / "verification.json")
    assert back.all == cs.all and [i for i, _ in back.folds] == [i for i, _ in cs.folds]
    assert Calibration.from_dict(cs.all.to_dict()) == cs.all
