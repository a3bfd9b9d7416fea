"""Refinement losses of Concept Mask on tiny tensors, against hand computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.core.methods.concept_mask.losses import (C_MATCH, N_TOP, box_loss, gamma_weights, matching_loss,
                                                    multitask_loss, overlap_ratio, spatial_discrimination_loss)

LOG2 = math.log(2.0)


def sp(x):
    """softplus: BCE(logit x, target 0) = log(1 + e^x); BCE(x, 1) = sp(-x)."""
    return math.log1p(math.exp(x))


def test_constants():
    assert N_TOP == 800 and C_MATCH == 1e-6


def test_box_loss_by_hand():
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 0.0]]], requires_grad=True)
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # BCE(0, 1) = log 2, BCE(2, 1) = sp(-2), BCE(-1, 0) = sp(-1), BCE(0, 0) = log 2
    expected = (LOG2 + sp(-2.0) + sp(-1.0) + LOG2) / 4
    assert box_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)
    valid = torch.tensor([[[True, False], [True, False]]])
    assert box_loss(logits, target, valid).item() == pytest.approx((LOG2 + sp(-1.0)) / 2, abs=1e-6)
    none = box_loss(logits, target, torch.zeros_like(valid))
    none.backward()
    assert none.item() == 0.0 and not logits.grad.any()


def test_matching_loss_by_hand():
    # V = 3 concepts, 1 x 2 maps. Coarse maxima: 0.15, 1.0, 0.2 -> top 2 are concepts 1 and 2.
    coarse = torch.tensor([[[[0.1, 0.15]], [[1.0, 0.1]], [[0.2, 0.19]]]])
    logits = torch.tensor([[[[5.0, 5.0]], [[0.0, 0.0]], [[1.0, -1.0]]]], requires_grad=True)
    # targets (>= 0.2): concept 1 [1, 0], concept 2 [1, 0] (0.2 itself counts as on)
    # BCE: concept 1: log 2, log 2; concept 2: BCE(1, 1) = sp(-1), BCE(-1, 0) = sp(-1)
    loss = matching_loss(logits, coarse, top_n=2)
    assert loss.item() == pytest.approx((2 * LOG2 + 2 * sp(-1.0)) / 4, abs=1e-6)
    loss.backward()
    assert not logits.grad[0, 0].any() and logits.grad[0, 1:].abs().min() > 0  # concept 0 not selected
    # top_n larger than V selects all: concept 0 adds BCE(5, 0) twice
    all_three = matching_loss(logits, coarse, top_n=10)
    assert all_three.item() == pytest.approx((2 * LOG2 + 2 * sp(-1.0) + 2 * sp(5.0)) / 6, abs=1e-5)


def test_matching_loss_selects_per_image():
    coarse = torch.zeros(2, 3, 2, 2)
    coarse[0, 0, 0, 0] = 0.9  # image 0: concept 0 has the highest peak
    coarse[0, 2, 1, 1] = 0.5
    coarse[1, 2, 1, 0] = 0.8  # image 1: concept 2
    coarse[1, 1] = 0.7
    logits = torch.zeros(2, 3, 2, 2, requires_grad=True)
    matching_loss(logits, coarse, top_n=1).backward()
    touched = logits.grad.abs().sum(dim=(2, 3)) > 0
    assert touched.tolist() == [[True, False, False], [False, False, True]]


def test_matching_loss_rejects_bad_top_n():
    with pytest.raises(ValueError):
        matching_loss(torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1), top_n=0)


def test_multitask_loss():
    assert multitask_loss(torch.tensor(2.0), torch.tensor(3.0)).item() == pytest.approx(2.0 + 3e-6)
    assert multitask_loss(torch.tensor(2.0), torch.tensor(3.0), c=0.5).item() == pytest.approx(3.5)


PERSON, FACE, SKY, CAR, UNSEEN = range(5)


def _masks():
    m = lambda rows, cols: np.pad(np.ones((len(rows), len(cols)), bool),
                                  ((rows[0], 4 - rows[-1] - 1), (cols[0], 4 - cols[-1] - 1)))
    return [
        # image 1: person = left half (8 px), face = its top 2x2 (4 px), sky = right half (8 px)
        {PERSON: m(range(4), range(2)), FACE: m(range(2), range(2)), SKY: m(range(4), range(2, 4))},
        # image 2: person = top half (8 px), face = row 0, cols 0-1 (2 px)
        {PERSON: m(range(2), range(4)), FACE: m(range(1), range(2))},
        # image 3: a car alone (it never co-occurs with anything)
        {CAR: m(range(1), range(1))},
    ]


def test_overlap_ratio_by_hand():
    o = overlap_ratio(_masks(), 5)
    assert o.shape == (5, 5)
    assert o[FACE, PERSON] == 1.0  # (4 + 2) / (4 + 2): the face is always inside the person
    assert o[PERSON, FACE] == pytest.approx(6 / 16)  # (4 + 2) / (8 + 8): asymmetric
    # person-sky and face-sky co-occur only in image 1, disjoint; sky's area there is 8, face's 4
    assert o[PERSON, SKY] == 0.0 and o[SKY, PERSON] == 0.0 and o[FACE, SKY] == 0.0 and o[SKY, FACE] == 0.0
    assert np.isnan(o[CAR, PERSON]) and np.isnan(o[PERSON, CAR])  # never co-occur: unknown
    assert np.diag(o)[:4].tolist() == [1.0, 1.0, 1.0, 1.0] and np.isnan(o[UNSEEN, UNSEEN])


def test_overlap_ratio_counts_only_images_with_both():
    full, half = np.ones((2, 2), bool), np.array([[True, True], [False, False]])
    # concept 0 alone in image 1 (area 4) must not enter O(0, 1); with 1 in image 2: |a(0)| = 2, overlap 2
    o = overlap_ratio([{0: full}, {0: half, 1: full}], 2)
    assert o[0, 1] == 1.0 and o[1, 0] == pytest.approx(2 / 4)


def test_gamma_weights_by_hand():
    g = gamma_weights(overlap_ratio(_masks(), 5))
    assert g[FACE, PERSON] == 0.0  # O = 1 >= 0.5
    assert g[PERSON, FACE] == pytest.approx(1 - 6 / 16)  # O = 0.375 < 0.5
    assert g[PERSON, SKY] == 1.0 and g[SKY, FACE] == 1.0  # disjoint: full weight
    assert g[CAR, PERSON] == 0.0 and g[PERSON, CAR] == 0.0  # NaN: no evidence
    assert not np.diag(g).any() and not np.isnan(g).any()
    assert gamma_weights(np.array([[1.0, 0.5], [0.49, 1.0]])).tolist() == [[0.0, 0.0], [pytest.approx(0.51), 0.0]]


def test_spatial_discrimination_loss_by_hand():
    # V = 3, one image of 1 x 2 pixels; concepts 0 and 1 present, 2 absent (its gt is ignored)
    gt = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]]])
    present = torch.tensor([[True, True, False]])
    gamma = torch.tensor([[0.0, 0.5, 1.0], [0.0, 1.0, 0.0], [0.25, 0.0, 0.0]])  # the diagonal 1 is ignored
    logits = torch.tensor([[[[3.0, -2.0]], [[0.0, 4.0]], [[1.0, 7.0]]]], requires_grad=True)
    # entries: (i=0, j=1, pixel 0): 0.5 * BCE(0, 0) = 0.5 log 2; (i=0, j=2, pixel 0): 1 * BCE(1, 0) = sp(1).
    # i=1 has no j with gamma > 0 off the diagonal; i=2 is absent. Mean over 2 entries.
    loss = spatial_discrimination_loss(logits, gt, present, gamma)
    assert loss.item() == pytest.approx((0.5 * LOG2 + sp(1.0)) / 2, abs=1e-6)
    loss.backward()
    # only logit_1 and logit_2 at pixel 0 receive gradient
    assert (logits.grad != 0).tolist() == [[[[False, False]], [[True, False]], [[True, False]]]]


def test_spatial_discrimination_loss_zero_when_separated():
    gamma = torch.tensor(gamma_weights(overlap_ratio(_masks(), 5)), dtype=torch.float32)
    person, sky = torch.zeros(4, 4), torch.zeros(4, 4)
    person[:, :2], sky[:, 2:] = 1.0, 1.0
    gt = torch.zeros(1, 5, 4, 4)
    gt[0, PERSON], gt[0, SKY] = person, sky
    present = torch.tensor([[True, False, True, False, False]])
    # gamma > 0 off the diagonal among rows PERSON and SKY: (person, face), (person, sky), (sky, person),
    # (sky, face); each concept's logit is very negative exactly where one of these i has gt = 1
    logits = torch.full((1, 5, 4, 4), 10.0)
    logits[0, FACE] = -30.0
    logits[0, SKY][person.bool()] = -30.0
    logits[0, PERSON][sky.bool()] = -30.0
    assert spatial_discrimination_loss(logits, gt, present, gamma).item() < 1e-10
    # a positive logit of sky inside the person's gt costs gamma(person, sky) * sp(2) = sp(2) at that pixel,
    # averaged over the 8 * 2 (person: face, sky) + 8 * 2 (sky: person, face) = 32 entries
    logits[0, SKY, 0, 0] = 2.0
    assert spatial_discrimination_loss(logits, gt, present, gamma).item() == pytest.approx(sp(2.0) / 32, rel=1e-5)


def test_spatial_discrimination_loss_without_entries_has_a_gradient_path():
    logits = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss = spatial_discrimination_loss(logits, torch.ones(2, 3, 2, 2), torch.zeros(2, 3, dtype=torch.bool),
                                       torch.ones(3, 3))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None and not logits.grad.any()


def test_spatial_discrimination_loss_against_a_loop():
    torch.manual_seed(0)
    b, v = 3, 4
    logits = torch.randn(b, v, 2, 3)
    gt = (torch.rand(b, v, 2, 3) > 0.5).float()
    present = torch.rand(b, v) > 0.4
    gamma = torch.rand(v, v) * (torch.rand(v, v) > 0.3)
    terms = []
    for n in range(b):
        for i in range(v):
            if not present[n, i]:
                continue
            for j in range(v):
                if j == i or gamma[i, j] <= 0:
                    continue
                for pix in gt[n, i].flatten().nonzero().flatten():
                    logit = logits[n, j].flatten()[pix]
                    terms.append(gamma[i, j] * F.binary_cross_entropy_with_logits(logit, torch.tensor(0.0)))
    assert len(terms) > 5
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(spatial_discrimination_loss(logits, gt, present, gamma), expected)
