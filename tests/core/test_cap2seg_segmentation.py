"""Cap2Seg's segmentation model (sec. 3.6): eq. 12-14 and eq. 17 against hand computations on tiny tensors."""

import math

import pytest
import torch

from ovseg.core.methods.cap2seg.segmentation import (Cap2SegNet, SegmentationConfig, class_scores, pixel_labels,
                                                     ranking_loss, seg_loss, stripe_means)


def test_class_scores_and_argmax_by_hand():
    f = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # D=2, h=1, w=2: pixel a = (1, 0), pixel b = (0, 2)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = class_scores(f, w)
    assert s.shape == (3, 1, 2)
    assert s[:, 0, 0].tolist() == [1.0, 0.0, 1.0] and s[:, 0, 1].tolist() == [0.0, 2.0, 2.0]
    assert pixel_labels(s).tolist() == [[0, 1]]  # ties go to the first class (eq. 14's arg max)


def test_seg_loss_is_cross_entropy_over_labelled_pixels_only():
    f = torch.tensor([[[1.0, 0.0, 5.0]], [[0.0, 1.0, 5.0]]])[None]  # (1, 2, 1, 3)
    w = torch.eye(2)
    labels = torch.tensor([[0, 0, -1]])  # the third pixel is unlabelled: ignored
    expected = (-math.log(math.e / (math.e + 1)) - math.log(1 / (1 + math.e))) / 2
    assert float(seg_loss(f, w, labels)) == pytest.approx(expected, rel=1e-5)
    assert float(seg_loss(f, w, torch.full((1, 3), -1))) == 0.0


def test_stripe_means_by_hand():
    score = torch.arange(8.0).reshape(4, 2)  # rows 0..3: (0,1), (2,3), (4,5), (6,7)
    unlabelled = torch.tensor([[True, False], [True, True], [False, False], [True, True]])
    means, has = stripe_means(score, unlabelled, k=2)  # stripes: rows 0-1, rows 2-3
    assert means.tolist() == pytest.approx([(0 + 2 + 3) / 3, (6 + 7) / 2])
    assert has.tolist() == [True, True]
    means, has = stripe_means(score, torch.zeros(4, 2, dtype=torch.bool), k=2)
    assert means.tolist() == [0.0, 0.0] and has.tolist() == [False, False]


def test_ranking_loss_eq17_by_hand_and_its_sign_follows_occurrence():
    # one unseen class u with w_u = (1, 0); f's first channel is the score
    f1 = torch.tensor([[[2.0, 4.0], [6.0, 8.0]], [[0.0, 0.0], [0.0, 0.0]]])[None]
    f2 = torch.tensor([[[1.0, 1.0], [1.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]])[None]
    y = torch.ones(2, 2, dtype=torch.bool)
    w = torch.tensor([[1.0, 0.0]])
    p1, p2 = torch.tensor([[0.75, 0.25]]), torch.tensor([[0.5, 0.5]])
    # stripe means: image 1 (3, 7), image 2 (1, 2)
    term = (0.75 * 3 + 0.25 * 7) - (0.5 * 1 + 0.5 * 2)
    more = ranking_loss(f1, f2, y, y, w, torch.tensor([0.9]), torch.tensor([0.1]), p1, p2)
    less = ranking_loss(f1, f2, y, y, w, torch.tensor([0.1]), torch.tensor([0.9]), p1, p2)
    same = ranking_loss(f1, f2, y, y, w, torch.tensor([0.5]), torch.tensor([0.5]), p1, p2)
    assert float(more) == pytest.approx(-term) and float(less) == pytest.approx(term) and float(same) == 0.0
    # the gradient raises the more likely image's scores where its stripes say the class is
    f1g = f1.clone().requires_grad_(True)
    ranking_loss(f1g, f2, y, y, w, torch.tensor([0.9]), torch.tensor([0.1]), p1, p2).backward()
    g = f1g.grad[0, 0]
    assert (g < 0).all() and float(g[0, 0]) < float(g[1, 0])  # descent raises row 0 (p=0.75) most


def test_network_maps_backbone_levels_to_the_word_space_and_round_trips(tmp_path):
    net = Cap2SegNet(SegmentationConfig(channels=16, word_dim=8))
    feats = {"c3": torch.randn(1, 40, 8, 6), "c4": torch.randn(1, 112, 4, 3), "c5": torch.randn(1, 320, 2, 2)}
    f = net(feats)
    assert f.shape == (1, 8, 8, 6)
    net.save(tmp_path / "s.pt", {"seen_classes": ["a", "background"]})
    back, extra = Cap2SegNet.load(tmp_path / "s.pt")
    assert extra["seen_classes"] == ["a", "background"]
    assert torch.allclose(back(feats), net.eval()(feats), atol=0.05)  # half-precision weights
