"""Tests of ovseg.core.types: validation on construction, box_from_mask, Prediction look-ups."""

import math

import numpy as np
import pytest

from ovseg.core.types import ConceptResult, Prediction, Prior, PseudoLabel, box_from_mask


def _map(h=4, w=5, value=0.5):
    return np.full((h, w), value, dtype=np.float32)


def _mask(rows):
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


# ---------------------------------------------------------------- Prior


def test_prior_accepts_valid_map_and_keeps_values():
    m = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    p = Prior(m, "cam", "dog", "attention", 0.25)
    assert p.shape == (4, 5)
    assert p.score == 0.25 and isinstance(p.score, float)
    assert p.map is m
    # the bounds themselves are allowed
    Prior(_map(value=0.0), "cam", "dog", "noise")
    Prior(_map(value=1.0), "cam", "dog", "probability", 1.0)


def test_prior_default_score_is_nan():
    p = Prior(_map(), "cam", "dog", "attention")
    assert math.isnan(p.score)


@pytest.mark.parametrize("kind", ["Attention", " attention", "attention ", "attention_refined2", "saliency", ""])
def test_prior_kind_must_be_a_known_name_exactly(kind):
    """No case folding or trimming: a misspelt kind would pass validation and then match no renderer rule."""
    with pytest.raises(ValueError, match="kind must be one of"):
        Prior(_map(), "m", "dog", kind)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.uint8, np.int32, np.bool_])
def test_prior_rejects_non_float32(dtype):
    with pytest.raises(TypeError, match="float32"):
        Prior(np.zeros((4, 5), dtype=dtype), "cam", "dog", "attention")


def test_prior_rejects_non_array():
    with pytest.raises(TypeError, match="numpy array"):
        Prior([[0.5, 0.5]], "cam", "dog", "attention")


@pytest.mark.parametrize("bad", [-0.01, 1.01, np.nan, np.inf, -np.inf])
def test_prior_rejects_values_outside_unit_interval_or_not_finite(bad):
    m = _map()
    m[2, 3] = bad
    with pytest.raises(ValueError, match=r"finite values in \[0, 1\]"):
        Prior(m, "cam", "dog", "attention")


@pytest.mark.parametrize("shape", [(2, 3, 4), (6,), (0, 5), (4, 0), ()])
def test_prior_rejects_maps_that_are_not_non_empty_2d(shape):
    with pytest.raises(ValueError, match="HxW"):
        Prior(np.zeros(shape, dtype=np.float32), "cam", "dog", "attention")


def test_prior_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        Prior(_map(), "cam", "dog", "heatmap")


def test_prior_rejects_empty_concept():
    with pytest.raises(ValueError, match="concept"):
        Prior(_map(), "cam", "", "attention")


@pytest.mark.parametrize("score", [-0.1, 1.5, np.inf])
def test_prior_rejects_score_outside_unit_interval(score):
    with pytest.raises(ValueError, match=r"Prior.score must lie in \[0, 1\]"):
        Prior(_map(), "cam", "dog", "attention", score)


def test_prior_is_frozen():
    p = Prior(_map(), "cam", "dog", "attention", 0.5)
    with pytest.raises(AttributeError):
        p.score = 0.1


# ---------------------------------------------------------------- box_from_mask / PseudoLabel


def test_box_from_mask_hand_made_exclusive_corners():
    mask = _mask(["......",
                  "..##..",
                  "..#...",
                  "...#..",
                  "......"])
    # columns 2..3, rows 1..3 -> (x0, y0, x1, y1) = (2, 1, 4, 4) with x1/y1 exclusive
    assert box_from_mask(mask) == (2.0, 1.0, 4.0, 4.0)
    single = np.zeros((3, 3), bool)
    single[0, 2] = True
    assert box_from_mask(single) == (2.0, 0.0, 3.0, 1.0)
    assert box_from_mask(np.ones((3, 7), bool)) == (0.0, 0.0, 7.0, 3.0)
    assert box_from_mask(np.zeros((3, 3), bool)) is None


def test_pseudolabel_derives_box_from_mask():
    mask = _mask(["........",
                  "........",
                  "...###..",
                  "....#...",
                  "........"])
    pl = PseudoLabel(mask, "dog", 0.7, "cam")
    assert pl.box == (3.0, 2.0, 6.0, 4.0)
    x0, y0, x1, y1 = pl.box
    # the box covers exactly the mask: cropping it keeps every pixel
    assert mask[int(y0):int(y1), int(x0):int(x1)].sum() == mask.sum()
    assert pl.score == 0.7 and pl.noise_map is None and pl.reliability is None


def test_pseudolabel_keeps_a_given_box_as_floats():
    pl = PseudoLabel(np.ones((4, 4), bool), "dog", 0.5, "cam", box=(0, 1, 3, 4))
    assert pl.box == (0.0, 1.0, 3.0, 4.0)
    assert all(isinstance(v, float) for v in pl.box)


@pytest.mark.parametrize("box", [(2, 0, 2, 3), (3, 0, 1, 3), (0, 3, 4, 3), (0, 4, 4, 1), (0, 0, float("nan"), 3)])
def test_pseudolabel_rejects_bad_boxes(box):
    with pytest.raises(ValueError, match="box"):
        PseudoLabel(np.ones((4, 4), bool), "dog", 0.5, "cam", box=box)


def test_pseudolabel_rejects_non_bool_mask_and_bad_score_and_empty_concept():
    with pytest.raises(TypeError, match="bool"):
        PseudoLabel(np.ones((4, 4), np.uint8), "dog", 0.5, "cam")
    with pytest.raises(ValueError, match="score"):
        PseudoLabel(np.ones((4, 4), bool), "dog", 1.2, "cam")
    with pytest.raises(ValueError, match="score"):
        PseudoLabel(np.ones((4, 4), bool), "dog", float("nan"), "cam")
    with pytest.raises(ValueError, match="concept"):
        PseudoLabel(np.ones((4, 4), bool), "", 0.5, "cam")


def test_pseudolabel_noise_map_must_match_mask():
    mask = np.ones((4, 4), bool)
    ok = PseudoLabel(mask, "dog", 0.5, "cam", noise_map=np.full((4, 4), 0.3, np.float32))
    assert ok.noise_map.shape == (4, 4)
    with pytest.raises(ValueError, match="mask's shape"):
        PseudoLabel(mask, "dog", 0.5, "cam", noise_map=np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="mask's shape"):
        PseudoLabel(mask, "dog", 0.5, "cam", noise_map=np.zeros((5, 4), np.float32))
    with pytest.raises(TypeError, match="float32"):
        PseudoLabel(mask, "dog", 0.5, "cam", noise_map=np.zeros((4, 4), np.float64))
    with pytest.raises(ValueError, match="HxW"):
        PseudoLabel(mask, "dog", 0.5, "cam", noise_map=np.zeros((4, 4, 1), np.float32))


@pytest.mark.parametrize("bad", [2.0, -0.5, float("nan")])
def test_pseudolabel_rejects_noise_map_values_outside_unit_interval(bad):
    noise = np.full((4, 4), 0.5, np.float32)
    noise[1, 1] = bad
    with pytest.raises(ValueError):
        PseudoLabel(np.ones((4, 4), bool), "dog", 0.5, "cam", noise_map=noise)


def test_pseudolabel_reliability_in_unit_interval():
    mask = np.ones((4, 4), bool)
    assert PseudoLabel(mask, "dog", 0.5, "cam", reliability=0).reliability == 0.0
    assert PseudoLabel(mask, "dog", 0.5, "cam", reliability=1).reliability == 1.0
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match="reliability"):
            PseudoLabel(mask, "dog", 0.5, "cam", reliability=bad)


# ---------------------------------------------------------------- ConceptResult / Prediction


def _result(concept="dog", method="cam", shape=(4, 5), score=0.5):
    mask = np.zeros(shape, bool)
    mask[1:3, 1:4] = True
    prior = Prior(np.full(shape, 0.2, np.float32), method, concept, "attention", score)
    return ConceptResult(concept, method, mask, score, score >= 0.05, priors=[prior])


def test_concept_result_accepts_matching_prior_and_finds_it_by_kind():
    r = _result()
    assert r.prior("attention") is r.priors[0]
    assert r.prior("noise") is None
    assert r.score == 0.5 and r.details == {} and r.pseudo_labels == []


def test_concept_result_rejects_prior_of_another_shape():
    mask = np.zeros((4, 5), bool)
    prior = Prior(np.zeros((5, 4), np.float32), "cam", "dog", "attention")
    with pytest.raises(ValueError, match=r"prior attention has shape \(5, 4\), mask has \(4, 5\)"):
        ConceptResult("dog", "cam", mask, 0.5, True, priors=[prior])


def test_concept_result_rejects_bad_mask_and_score():
    with pytest.raises(TypeError, match="bool"):
        ConceptResult("dog", "cam", np.zeros((4, 5), np.float32), 0.5, True)
    with pytest.raises(ValueError, match="ConceptResult.score"):
        ConceptResult("dog", "cam", np.zeros((4, 5), bool), 1.5, True)
    with pytest.raises(ValueError, match="ConceptResult.score"):
        ConceptResult("dog", "cam", np.zeros((4, 5), bool), float("nan"), True)


def test_prediction_get_by_concept_and_method():
    dog_cam, cat_cam, dog_other = _result("dog", "cam"), _result("cat", "cam"), _result("dog", "other")
    pred = Prediction((4, 5), [dog_cam, cat_cam, dog_other], negatives=("person",))
    assert pred.get("dog") is dog_cam  # the first result for the concept
    assert pred.get("dog", "other") is dog_other
    assert pred.get("cat", "cam") is cat_cam
    assert pred.by_method("cam") == [dog_cam, cat_cam]
    assert pred.by_method("other") == [dog_other]
    with pytest.raises(KeyError, match="'horse'"):
        pred.get("horse")
    with pytest.raises(KeyError, match="'cat' and method 'other'"):
        pred.get("cat", "other")
