"""Embedding network, its fully convolutional form, attention maps, verification and the refinement network."""

import math

import pytest
import torch
import torch.nn.functional as F

from ovseg.core.methods.concept_mask.embedding_net import (ConvEmbeddingNet, EmbeddingNet, RefinementNet,
                                                           attention_maps, cosine_embedding_loss, normalise_maps,
                                                           verification_score)


def _trained_net(in_dim=6, hidden=8, out_dim=5):
    """An EmbeddingNet trained a few steps so that its BN running statistics are far from (0, 1)."""
    torch.manual_seed(0)
    net = EmbeddingNet(in_dim, hidden, out_dim)
    net.layers[1].eps, net.layers[1].momentum = 1e-3, 0.3  # non-default values must be carried over
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(5):
        x = torch.randn(16, in_dim) * 3.0 + 2.0
        loss = cosine_embedding_loss(net(x), torch.randn(16, out_dim))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_trained_net_has_nontrivial_bn_statistics():
    bn = _trained_net().layers[1]
    assert bn.running_mean.abs().max() > 0.1 and (bn.running_var - 1).abs().max() > 0.1


def test_conv_net_equals_fc_net_on_pooled_features():
    net = _trained_net()
    conv = net.to_conv()
    assert isinstance(conv, ConvEmbeddingNet) and not conv.training
    assert conv.layers[1].eps == 1e-3 and conv.layers[1].momentum == 0.3
    feats = torch.randn(3, 6, 5, 5) * 3.0 + 2.0
    pooled = feats.mean(dim=(2, 3))
    with torch.no_grad():
        out = conv(pooled[:, :, None, None])
        assert out.shape == (3, 5, 1, 1)
        torch.testing.assert_close(out[:, :, 0, 0], net(pooled), atol=1e-5, rtol=1e-5)


def test_conv_net_equals_fc_net_at_every_location():
    net = _trained_net()
    conv = net.to_conv()
    feats = torch.randn(2, 6, 3, 4) * 3.0 + 2.0
    with torch.no_grad():
        dense = conv(feats)
        assert dense.shape == (2, 5, 3, 4)
        for i in range(3):
            for j in range(4):
                torch.testing.assert_close(dense[:, :, i, j], net(feats[:, :, i, j]), atol=1e-5, rtol=1e-5)
        assert dense.abs().max() > 0  # not a trivially zero comparison


def test_to_conv_keeps_train_mode():
    net = EmbeddingNet(4, 4, 3).train()
    assert net.to_conv().training


def test_attention_maps_against_a_loop():
    torch.manual_seed(1)
    dense, words = torch.randn(2, 5, 3, 4), torch.randn(3, 5)
    maps = attention_maps(dense, words)
    assert maps.shape == (2, 3, 3, 4)
    for b in range(2):
        for k in range(3):
            for i in range(3):
                for j in range(4):
                    assert maps[b, k, i, j].item() == pytest.approx(float(dense[b, :, i, j] @ words[k]), abs=1e-5)


def test_normalise_maps_by_hand():
    maps = torch.tensor([[[[-1.0, 2.0], [1.0, 0.0]], [[-3.0, -1.0], [0.0, -2.0]]]])  # (1, 2, 2, 2)
    out = normalise_maps(maps)
    # first map: rectified [[0, 2], [1, 0]], max 2; second: no positive value -> zeros
    assert out.tolist() == [[[[0.0, 1.0], [0.5, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]]


def test_verification_with_one_hot_attention_is_the_net_at_that_location():
    net = _trained_net()
    torch.manual_seed(2)
    feats = torch.randn(2, 6, 3, 4) * 3.0 + 2.0
    word = torch.randn(5)
    att = torch.zeros(2, 3, 4)
    att[0, 1, 2] = 1.0
    att[1, 0, 3] = 7.0  # normalised to sum 1
    att[1, 2, 0] = -4.0  # negative values are rectified away
    with torch.no_grad():
        score = verification_score(feats, att, net, word)
        e = net(torch.stack([feats[0, :, 1, 2], feats[1, :, 0, 3]]))
    assert score.shape == (2,)
    torch.testing.assert_close(score, F.cosine_similarity(e, word[None], dim=1), atol=1e-5, rtol=1e-5)


def test_verification_with_zero_attention_is_global_average_pooling():
    net = _trained_net()
    feats = torch.randn(1, 6, 3, 4) * 3.0 + 2.0
    word = torch.randn(5)
    with torch.no_grad():
        score = verification_score(feats, torch.zeros(1, 3, 4), net, word)
        expected = F.cosine_similarity(net(feats.mean(dim=(2, 3))), word[None], dim=1)
    torch.testing.assert_close(score, expected, atol=1e-5, rtol=1e-5)


def test_refinement_net_shapes_and_range():
    torch.manual_seed(3)
    ref = RefinementNet(num_concepts=7, bottleneck=4)
    coarse = torch.rand(2, 7, 5, 6)
    out = ref(coarse)
    assert out.shape == (2, 7, 5, 6)
    assert ((out > 0) & (out < 1)).all()
    torch.testing.assert_close(out, torch.sigmoid(ref.logits(coarse)))
    assert ref.reduce.kernel_size == (1, 1) and ref.expand.kernel_size == (1, 1)
    # every refined map depends on every coarse map (1x1 mixing across concepts, none across locations)
    bumped = coarse.clone()
    bumped[:, 6, 0, 0] += 5.0
    diff = (ref.logits(bumped) - ref.logits(coarse)).abs()
    assert diff[:, :, 1:, :].max() == 0 and diff[:, :, 0, 1:].max() == 0


def test_cosine_loss_by_hand():
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    # pair 1: cos 45 deg = 1/sqrt(2) -> 1 - 1/sqrt(2); pair 2: opposite -> 1 - (-1) = 2
    assert cosine_embedding_loss(e, t).item() == pytest.approx((1 - 1 / math.sqrt(2) + 2) / 2, abs=1e-6)


def test_cosine_loss_is_eps_safe():
    e = torch.zeros(1, 3, requires_grad=True)
    loss = cosine_embedding_loss(e, torch.ones(1, 3))
    loss.backward()
    assert loss.item() == pytest.approx(1.0) and torch.isfinite(e.grad).all()


def test_cosine_loss_falls_when_optimising_e():
    torch.manual_seed(4)
    e = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4)
    opt = torch.optim.SGD([e], lr=3.0)
    losses = []
    for _ in range(30):
        loss = cosine_embedding_loss(e, t)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.05
