"""Cap2Seg's local branch and semi-global fusion (seed 000, sec. 3.4-3.5): the lattice labels, eq. 8-11 against
hand computations, the first-layer split against the stacked-input MLP, and a tiny fit that learns a layout."""

import numpy as np
import pytest
import torch

from ovseg.core.errors import OvsegError
from ovseg.core.methods.cap2seg.local import (LocalConfig, LocalInference, consistency_loss, fuse, grid_labels,
                                              grid_positions, local_loss, sample_sources, stripe_shares)


def test_grid_labels_take_the_class_covering_half_a_cell():
    a = np.zeros((40, 40), bool)
    a[:20, :] = True  # top half
    b = np.zeros((40, 40), bool)
    b[30:, :4] = True  # a sliver: a 4-pixel-wide column covers each 4x4 cell of column 0 whole
    labels = grid_labels({3: a, 7: b}, grid=10)
    assert labels.shape == (10, 10) and labels.dtype == np.int16
    assert (labels[:5] == 3).all()
    assert (labels[7:, 0] == 7).all() and (labels[7:, 1:] == -1).all() and (labels[5:7] == -1).all()


def test_grid_positions_are_cell_centres_row_major():
    pos = grid_positions(2)
    np.testing.assert_allclose(pos.numpy(), [[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]])


def test_stripe_shares_sum_each_stripe_and_normalise():
    prob = torch.zeros(10, 10)
    prob[0, :] = 1.0  # stripe 0: 10
    prob[9, :5] = 1.0  # stripe 4: 5
    out = stripe_shares(prob.reshape(-1), 5)
    np.testing.assert_allclose(out.numpy(), [10 / 15, 0, 0, 0, 5 / 15], rtol=1e-6)
    batch = stripe_shares(torch.ones(3, 100), 5)
    np.testing.assert_allclose(batch.numpy(), np.full((3, 5), 0.2), rtol=1e-6)


def test_consistency_loss_is_eq11_l2_distance():
    y = torch.tensor([[1.0, 0, 0, 0, 0], [0.2] * 5])
    v = torch.tensor([[0.0, 1, 0, 0, 0], [0.2] * 5])
    assert consistency_loss(y, v).item() == pytest.approx((2 ** 0.5 + 0.0) / 2)
    with pytest.raises(OvsegError):
        consistency_loss(y, v[:, :4])
    empty = consistency_loss(torch.zeros(0, 5, requires_grad=True), torch.zeros(0, 5))
    assert empty.item() == 0.0 and empty.requires_grad


def test_local_loss_is_eq9_bce_over_counted_cells():
    prob = torch.tensor([[0.9, 0.2, 0.5]])
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    weight = torch.tensor([[1.0, 1.0, 0.0]])  # the third cell is unlabelled: not counted
    hand = -(np.log(0.9) + np.log(0.8)) / 2
    assert local_loss(prob, labels, weight).item() == pytest.approx(hand, rel=1e-5)


def test_forward_is_the_mlp_over_the_stacked_input_averaged_over_sources():
    torch.manual_seed(0)
    m = LocalInference(LocalConfig(word_dim=6, hidden=8, grid=3)).eval()
    src_pos = torch.rand(2, 4, 2)
    src_vec = torch.randn(2, 4, 6)
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    word = torch.randn(2, 6)
    out = m(src_pos, src_vec, valid, word)
    assert out.shape == (2, 9)
    tgt = grid_positions(3)
    for b in range(2):
        for t in range(9):
            ps = []
            for s in range(4):
                if valid[b, s]:
                    x = torch.cat([src_pos[b, s], tgt[t], src_vec[b, s], word[b]])  # eq. 7's stacked vector
                    ps.append(torch.sigmoid(m.rest(m.first(x))).item())
            assert out[b, t].item() == pytest.approx(float(np.mean(ps)), abs=1e-5)  # eq. 8


def test_predict_needs_known_cells_and_sample_sources_excludes_the_class():
    m = LocalInference(LocalConfig(word_dim=4, hidden=8, grid=4))
    assert m.predict(np.full((4, 4), -1, np.int16), torch.randn(3, 4), torch.randn(4)) is None
    labels = np.full((4, 4), -1, np.int16)
    labels[0, :2] = 1
    labels[3, 3] = 2
    prob = m.predict(labels, torch.randn(3, 4), torch.randn(4))
    assert prob.shape == (4, 4) and ((prob >= 0) & (prob <= 1)).all()
    with pytest.raises(OvsegError):
        m.predict(np.full((3, 3), -1, np.int16), torch.randn(3, 4), torch.randn(4))
    cells, classes = sample_sources(labels, exclude=1, n_sub=5, rng=np.random.default_rng(0))
    assert list(classes) == [2] * 5 and list(cells) == [15] * 5  # with replacement: only one other cell
    cells, _ = sample_sources(labels, exclude=2, n_sub=2, rng=np.random.default_rng(0))
    assert sorted(cells) == [0, 1]
    assert len(sample_sources(np.full((4, 4), 1, np.int16), 1, 3, np.random.default_rng(0))[0]) == 0


def test_fuse_averages_and_falls_back_to_the_caption():
    v = np.array([0.5, 0.5, 0, 0, 0])
    y = np.array([0, 0, 0, 0.5, 0.5])
    np.testing.assert_allclose(fuse(y, v), [0.25, 0.25, 0, 0.25, 0.25])
    np.testing.assert_allclose(fuse(None, v), v)


def test_a_tiny_fit_learns_that_the_class_sits_above_its_companion():
    """u' always occupies the row right above a companion class: eq. 9 falls and the learned map points there."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    vectors = torch.eye(4)  # class 0 is u', class 1 its companion, classes 2-3 elsewhere
    m = LocalInference(LocalConfig(word_dim=4, hidden=32, grid=6, n_sub=6))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for step in range(150):
        labels = np.full((6, 6), -1, np.int16)
        r = int(rng.integers(1, 6))
        labels[r, :] = 1
        labels[r - 1, :] = 0
        cells, classes = sample_sources(labels, 0, 6, rng)
        prob = m(m.positions[torch.from_numpy(cells)][None], vectors[torch.from_numpy(classes)][None],
                 torch.ones(1, 6, dtype=torch.bool), vectors[0][None])
        flat = torch.from_numpy(labels.reshape(-1).astype(np.int64))
        loss = local_loss(prob, (flat == 0).float()[None], (flat >= 0).float()[None])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    for r in (2, 4):  # the map follows the companion: high on the row above it, low on the companion's own
        labels = np.full((6, 6), -1, np.int16)
        labels[r, :] = 1
        rows = m.predict(labels, vectors, vectors[0]).mean(axis=1)
        assert rows[r - 1] > 0.5 > rows[r]
        assert rows[r - 1] > rows[min(r + 1, 5)]
