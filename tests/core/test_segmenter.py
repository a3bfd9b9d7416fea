"""Class-agnostic segmenter with attention channels (core/segmenter.py). Tiny inputs (64 px), one CPU thread."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from ovseg.core.models.backbone import load_efficientnet_lite0
from ovseg.core.errors import ModelError
from ovseg.core.ops.segmenter import (ClassAgnosticSegmenter, SegmenterConfig, foreground_probability,
                                      segmentation_loss, widen_stem)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convs are many times faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_net():
    """EfficientNet-Lite0 with random weights (no weight file read)."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0").eval()


def test_widen_stem_keeps_the_rgb_path_exactly():
    torch.manual_seed(0)
    net = random_net()
    original = copy.deepcopy(net)
    widen_stem(net, 5, 0.01, torch.Generator().manual_seed(0))
    assert torch.equal(net._conv_stem.rgb.weight, original._conv_stem.weight)
    with torch.no_grad():
        net._conv_stem.extra.weight.zero_()
        x = torch.randn(2, 5, 64, 64)
        assert torch.equal(net._conv_stem(x), original._conv_stem(x[:, :3]))
        assert torch.equal(net.extract_features(x), original.extract_features(x[:, :3]))
        # Nonzero extra weights do change the output, and the shapes follow the original "same" padding.
        net._conv_stem.extra.weight.fill_(0.1)
        y = net._conv_stem(x)
        assert y.shape == (2, 32, 32, 32) and not torch.equal(y, original._conv_stem(x[:, :3]))


def test_widen_stem_new_weights_have_the_requested_std_and_seed():
    a = widen_stem(random_net(), 5, 0.05, torch.Generator().manual_seed(3))._conv_stem.extra.weight
    b = widen_stem(random_net(), 5, 0.05, torch.Generator().manual_seed(3))._conv_stem.extra.weight
    assert a.shape == (32, 2, 3, 3) and torch.equal(a, b)
    assert abs(a.std().item() - 0.05) < 0.01 and abs(a.mean().item()) < 0.01
    net = random_net()
    stem = net._conv_stem
    assert widen_stem(net, 3)._conv_stem is stem  # nothing to add
    widen_stem(net, 4)
    with pytest.raises(ValueError, match="already widened"):
        widen_stem(net, 5)


@pytest.mark.parametrize("in_channels", [3, 4, 5])
def test_forward_shapes_and_probabilities(in_channels):
    torch.manual_seed(0)
    model = ClassAgnosticSegmenter(random_net(), SegmenterConfig(in_channels=in_channels, aspp_channels=32)).eval()
    x = torch.cat([torch.randn(2, 3, 64, 96), torch.rand(2, in_channels - 3, 64, 96)], dim=1)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 2, 64, 96) and torch.isfinite(logits).all()
    p = foreground_probability(logits)
    assert p.shape == (2, 64, 96) and p.min() >= 0 and p.max() <= 1
    with pytest.raises(ValueError, match="input"):
        model(torch.zeros(2, in_channels + 1, 64, 64))


def test_frozen_backbone_parts_stay_in_eval_mode_and_out_of_the_optimizer():
    cases = [("none", False, False, {"backbone._conv_stem.extra.weight"}),
             ("stem", True, False, None), ("all", True, True, None)]
    for mode, bn0_trains, block_trains, backbone_params in cases:
        model = ClassAgnosticSegmenter(random_net(), SegmenterConfig(train_backbone=mode, aspp_channels=16)).train()
        net = model.backbone
        assert net._bn0.training is bn0_trains and net._blocks[3]._bn1.training is block_trains
        assert model.aspp.training and model.decoder.training
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in model.named_parameters()
                             if any(p is q for q in model.trainable_parameters())}
        in_backbone = {n for n in trainable if n.startswith("backbone.")}
        if backbone_params is not None:
            assert in_backbone == backbone_params
        assert not any(n.startswith(("backbone._fc", "backbone._conv_head", "backbone._bn1")) for n in trainable)
        assert ("backbone._blocks.3._bn1.weight" in in_backbone) is (mode == "all")
        model.eval()
        assert not net._bn0.training and not model.aspp.training


def test_loss_falls_and_frozen_backbone_stays_bit_identical():
    torch.manual_seed(0)
    model = ClassAgnosticSegmenter(load_efficientnet_lite0(), SegmenterConfig(train_backbone="none"),
                                   generator=torch.Generator().manual_seed(0)).train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    x = torch.cat([torch.randn(2, 3, 64, 64).clamp(-1, 1), torch.rand(2, 2, 64, 64)], dim=1)
    target = torch.zeros(2, 64, 64, dtype=torch.long)
    target[:, 16:48, 16:48] = 1
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = segmentation_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0], losses
    after = model.backbone.state_dict()
    extra = "_conv_stem.extra.weight"
    assert not torch.equal(after[extra], before[extra])
    changed = [k for k in before if k != extra and not torch.equal(after[k], before[k])]
    assert changed == []  # RGB stem weights, all other weights and BN statistics untouched


def _rectangles(n, g, size=64):
    """Noise images (no information in RGB) and S+ = a random rectangle; target = S+ > 0.5."""
    x = torch.randn(n, 3, size, size, generator=g).clamp(-1, 1)
    s = torch.zeros(n, 1, size, size)
    for i in range(n):
        h, w = torch.randint(24, 48, (2,), generator=g).tolist()
        y0, x0 = (torch.randint(0, size - d + 1, (1,), generator=g).item() for d in (h, w))
        s[i, 0, y0:y0 + h, x0:x0 + w] = 1
    s = 0.8 * s + 0.1 * torch.rand(n, 1, size, size, generator=g)  # 0-0.1 outside, 0.8-0.9 inside
    return torch.cat([x, s], dim=1), (s[:, 0] > 0.5).long()


def test_prediction_follows_the_saliency_channel():
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    cfg = SegmenterConfig(in_channels=4, aspp_channels=32, train_backbone="none", new_channel_init_std=0.1)
    model = ClassAgnosticSegmenter(load_efficientnet_lite0(), cfg, generator=g).train()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(80):
        x, y = _rectangles(4, g)
        loss = segmentation_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = _rectangles(4, g)  # held out
    with torch.no_grad():
        pred = foreground_probability(model.eval()(x)) > 0.5
    iou = (pred & (y == 1)).sum((1, 2)) / (pred | (y == 1)).sum((1, 2))
    assert iou.mean() > 0.8, iou


def test_ignore_index_is_ignored():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 4, 5)
    target = torch.full((1, 4, 5), 255, dtype=torch.long)
    target[0, 2, 3] = 1
    expected = F.cross_entropy(logits[:, :, 2, 3], torch.tensor([1]))
    assert torch.allclose(segmentation_loss(logits, target), expected)
    target[0, 2, 3] = 255
    assert segmentation_loss(logits, target).item() == 0.0  # all ignored: zero, not NaN


def test_state_dict_small_round_trip_and_clear_errors():
    torch.manual_seed(0)
    cfg = SegmenterConfig(aspp_channels=32, train_backbone="stem")
    a = ClassAgnosticSegmenter(load_efficientnet_lite0(), cfg).train()
    x = torch.cat([torch.randn(2, 3, 64, 64), torch.rand(2, 2, 64, 64)], dim=1)
    with torch.no_grad():
        a(x)  # moves the BN running statistics of the trained parts away from their initial values
    sd = a.state_dict_small()
    assert "backbone._bn0.running_mean" in sd and "backbone._conv_stem.rgb.weight" in sd
    assert not any(k.startswith(("backbone._blocks", "backbone._fc")) for k in sd)
    sd = {k: v.clone() for k, v in sd.items()}

    restored_cfg = SegmenterConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    b = ClassAgnosticSegmenter(load_efficientnet_lite0(), restored_cfg)
    with torch.no_grad():
        assert not torch.equal(a.eval()(x), b.eval()(x))
        b.load_state_dict_small(sd)
        assert torch.equal(a(x), b(x))

    missing = dict(sd)
    del missing["aspp.project.0.weight"]
    with pytest.raises(ModelError, match=r"missing keys \(1\): \['aspp.project.0.weight'\]"):
        b.load_state_dict_small(missing)
    with pytest.raises(ModelError, match="unexpected keys"):
        b.load_state_dict_small({**sd, "backbone._fc.weight": torch.zeros(1)})
    four = ClassAgnosticSegmenter(random_net(), SegmenterConfig(in_channels=4, aspp_channels=32))
    with pytest.raises(ModelError, match="mis-shaped keys.*extra.weight"):
        four.load_state_dict_small(sd)


def test_config_round_trip_and_validation():
    cfg = SegmenterConfig(in_channels=4, aspp_rates=(1, 2, 3), use_low_level=False)
    assert SegmenterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ModelError, match="unknown"):
        SegmenterConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError):
        SegmenterConfig(in_channels=6)
    with pytest.raises(ValueError):
        SegmenterConfig(train_backbone="head")
    model = ClassAgnosticSegmenter(random_net(), SegmenterConfig(in_channels=3, aspp_channels=16, use_low_level=False))
    assert not hasattr(model, "low_level")
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_priors_to_head_lets_the_head_read_the_priors_without_the_stem():
    """With the stem path of the priors cut (its weights zero and frozen), the head alone learns to follow S+
    when the priors are also given to it (priors_to_head); without it the same run cannot see them."""
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    cfg = SegmenterConfig(in_channels=4, aspp_channels=32, train_backbone="none", new_channel_init_std=1e-4,
                          priors_to_head=True)
    model = ClassAgnosticSegmenter(load_efficientnet_lite0(), cfg, generator=g).train()
    assert model.aspp.branches[0][0].in_channels == 320 + 1 and model.low_level[0].in_channels == 40 + 1
    stem = model.backbone._conv_stem.extra.weight
    stem.data.zero_()
    opt = torch.optim.Adam([p for p in model.trainable_parameters() if p is not stem], lr=1e-2)
    for _ in range(80):
        x, y = _rectangles(4, g, size=128)
        loss = segmentation_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = _rectangles(4, g, size=128)
    with torch.no_grad():
        model.eval()
        pred = foreground_probability(model(x)) > 0.5
        blank = foreground_probability(model(torch.cat([x[:, :3], torch.zeros_like(x[:, 3:])], 1)))
    iou = (pred & (y == 1)).sum((1, 2)) / (pred | (y == 1)).sum((1, 2))
    assert iou.mean() > 0.7, iou  # without priors_to_head the same run scores 0
    assert (blank > 0.5).float().mean() < 0.05  # without priors nothing is foreground: the priors decide
