"""OVSegmentor's parts on hand-made tensors (seed 004, sec. 3): slot attention normalised over groups with the
hard assignment, entity masking of captions, Hungarian matching, the Dice loss, the EMA update, the contrastive
loss, and the network's shapes and eq. 1 scores."""

import numpy as np
import pytest
import torch

from ovseg.core.methods.ovsegmentor.model import (OVSegConfig, OVSegNet, contrastive_loss, dice_loss, ema_update,
                                                  hungarian, make_ema, mask_consistency, select_subgroups,
                                                  slot_binding)
from ovseg.core.methods.ovsegmentor.text import (MASK, caption_entities, entity_prompt, entity_set, label_caption,
                                                 mask_entities)


def test_slot_attention_normalises_over_groups_and_averages_the_values():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    groups, soft = slot_binding(q, k, v, hard=False)
    assert soft.shape == (2, 5, 3)
    torch.testing.assert_close(soft.sum(-1), torch.ones(2, 5))  # each patch is shared out over the groups
    expected = torch.softmax(k @ q.transpose(1, 2) / 8 ** 0.5, dim=-1)  # eq. 4
    torch.testing.assert_close(soft, expected)
    w = expected.transpose(1, 2)  # eq. 5: a weighted mean of the values, weights normalised over the patches
    torch.testing.assert_close(groups, (w @ v) / (w.sum(-1, keepdim=True) + 1e-6))


def test_hard_assignment_is_one_hot_forward_with_the_softmax_gradient_backward():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 3, 4, generator=g, requires_grad=True)
    k, v = torch.randn(1, 6, 4, generator=g), torch.randn(1, 6, 4, generator=g)
    groups, soft = slot_binding(q, k, v, hard=True)
    one_hot = torch.nn.functional.one_hot(soft.argmax(-1), 3).float()
    # forward: each group is the plain mean of the values of the patches it wins
    for j in range(3):
        won = one_hot[0, :, j].bool()
        if won.any():
            torch.testing.assert_close(groups[0, j], v[0, won].mean(0), atol=1e-5, rtol=1e-4)
    groups.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0  # gradients reach the queries through the softmax


def test_entity_masking_and_prompts():
    omega = {"dog", "frisbee", "man"}
    caption = "A man throws a frisbee to his dog in the park."
    assert caption_entities(caption, omega) == ["man", "frisbee", "dog"]
    masked = mask_entities(caption, omega)
    assert masked.split().count(MASK) == 3 and "frisbee" not in masked and "park" in masked
    assert mask_entities("Two teddy bears on a bed.", {"teddy bear"}).split()[:2] == ["two", MASK]
    assert entity_prompt(["dog", "cat"]).endswith("dog and cat.")
    with pytest.raises(ValueError):
        entity_prompt([])
    text, masked, names = label_caption(["person", "dog"], __import__("random").Random(0))
    assert set(names) == {"person", "dog"} and all(n in text for n in names) and masked.count(MASK) == 2
    # the entity set keeps object nouns named on enough images
    found = entity_set({1: ["a dog on grass"], 2: ["the dog sleeps"], 3: ["a cat"]}, min_images=2)
    assert found == ["dog"]


def test_hungarian_matching_on_a_hand_made_cost():
    cost = np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    p = hungarian(cost)
    assert sorted(p.tolist()) == [0, 1, 2]
    assert cost[np.arange(3), p].sum() == 5.0  # rows -> columns 1, 0, 2: 1 + 2 + 2
    assert p.tolist() == [1, 0, 2]


def test_dice_loss_by_hand():
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert float(dice_loss(target, target)) == pytest.approx(0.0)
    assert float(dice_loss(target, 1 - target)) == pytest.approx(1.0)
    pred = torch.tensor([[1.0, 0.5, 0.5, 0.0]])
    assert float(dice_loss(target, pred)) == pytest.approx(1 - 2 * 1.5 / (2 + 2))


def test_ema_update_moves_one_percent_towards_the_online_weights():
    net = torch.nn.Linear(2, 2)
    ema = make_ema(net)
    before = ema.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema_update(ema, net, 0.99)
    torch.testing.assert_close(ema.weight, 0.99 * before + 0.01 * net.weight)
    assert not any(p.requires_grad for p in ema.parameters())


def test_contrastive_loss_is_low_for_matched_rows_and_ignores_invalid_ones():
    a = torch.nn.functional.normalize(torch.eye(4), dim=-1)
    scale = torch.tensor(float(np.log(10.0)))
    matched = contrastive_loss(a, a, scale)
    shuffled = contrastive_loss(a, a[[1, 0, 3, 2]], scale)
    assert matched < 0.01 < shuffled
    expected = -torch.log_softmax(10.0 * a @ a.T, dim=1).diag().mean()
    torch.testing.assert_close(matched, expected)
    valid = torch.tensor([True, True, False, False])
    torch.testing.assert_close(contrastive_loss(a, a[[0, 1, 3, 2]], scale, valid), contrastive_loss(a[:2], a[:2], scale))


def test_network_shapes_scores_and_subgroups():
    torch.manual_seed(0)
    net = OVSegNet(OVSegConfig(in_channels=16, dim=32, heads=2, groups=4, pos_grid=6)).eval()
    with torch.no_grad():
        _check_network(net)


def _check_network(net):
    out = net(torch.randn(2, 16, 5, 7))  # any grid: the position embedding is interpolated
    assert out["groups"].shape == (2, 4, 32) and out["image"].shape == (2, 35, 32)
    torch.testing.assert_close(out["assignment"].sum(-1), torch.ones(2, 35))
    t = torch.nn.functional.normalize(torch.randn(3, 256), dim=-1)
    s = net.patch_scores(out, t)
    assert s.shape == (2, 3, 5, 7) and float(s.abs().max()) <= 1.0 + 1e-5  # a mix of cosines
    g = net.group_embeddings(out["groups"])[0]
    idx = select_subgroups(g, g[2], 0.5)
    assert len(idx) == 2 and 2 in idx.tolist()  # a group is most similar to itself


def test_mask_consistency_is_zero_when_the_other_image_grounds_the_same_masks():
    """Eq. 10-12: with two identical images and the EMA equal to the online model, sigmoid(I_1 G_2^sub) equals
    the target up to binarisation; the loss is the Dice of a mask against its own binarisation, and it has a
    gradient."""
    torch.manual_seed(0)
    net = OVSegNet(OVSegConfig(in_channels=8, dim=16, heads=2, groups=4, pos_grid=4))
    ema = make_ema(net)
    x = torch.randn(1, 8, 4, 4).repeat(2, 1, 1, 1)
    out, ema_out = net(x), ema(x)
    entity = torch.nn.functional.normalize(torch.randn(1, 256), dim=-1)
    loss = mask_consistency(out, ema_out, net, ema, [(0, 1)], entity, ratio=0.5, delta=0.5)
    assert 0.0 <= float(loss.detach()) < 0.6
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert float(mask_consistency(out, ema_out, net, ema, [], [], 0.5, 0.5).detach()) == 0.0


def test_competing_words_per_vocabulary_leave_out_the_word_and_its_kinds():
    from ovseg.core.errors import OvsegError
    from ovseg.core.methods.ovsegmentor.method import competitors, related

    entities = ["dog", "puppy", "animal", "cat", "grass", "frisbee"]
    assert competitors("dog", ["grass"], ["dog", "cat"], entities, "negatives") == ["grass"]
    assert competitors("dog", ["grass"], ["dog", "cat"], entities, "typed") == ["grass", "cat"]
    # a puppy is a kind of dog and a dog a kind of animal: neither competes with "dog"
    assert competitors("dog", (), ["dog"], entities, "entities") == ["cat", "grass", "frisbee"]
    assert related("man", "person") and related("person", "man") and not related("cat", "dog")
    with pytest.raises(OvsegError, match="vocabulary must be one of"):
        competitors("dog", (), (), (), "everything")


def test_uniform_gumbel_draws_given_by_the_caller_decide_the_training_assignment():
    torch.manual_seed(0)
    net = OVSegNet(OVSegConfig(in_channels=16, dim=32, heads=2, groups=4, pos_grid=3)).train()
    x = torch.randn(2, 16, 3, 3)
    u = torch.rand(2, 9, 4)
    a, b = net(x, noise=u)["assignment"], net(x, noise=u)["assignment"]
    assert torch.equal(a, b)  # the same draws, the same binding
    assert not torch.equal(net(x, noise=torch.rand(2, 9, 4))["assignment"], a)


def test_a_competing_typed_word_only_takes_patches_away(predictor, examples_dir):
    from ovseg.core.image_io import load_image
    from ovseg.core.methods.base import ImageState
    from ovseg.core.methods.ovsegmentor.method import OVSegmentor

    state = ImageState.compute(predictor.models, load_image(examples_dir / "cat.jpg"), 448)
    alone = OVSegmentor(predictor.models).predict(state, "cat")
    method = OVSegmentor(predictor.models, vocabulary="typed")
    method.prepare(state, ["cat", "blanket"])
    typed = method.predict(state, "cat")
    assert alone.details["vocabulary"].startswith("negatives (0 ")
    assert typed.details["vocabulary"].startswith("typed (1 ")
    assert (typed.mask <= alone.mask).all() and typed.score == alone.score
