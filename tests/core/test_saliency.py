"""Guided backpropagation through ReLU6, checked by hand on a tiny network, and on the real classifier."""

import pytest
import torch
import torch.nn as nn

from ovseg.core.methods.cls_saliency.saliency import (GuidedReLU6, cam_gate, class_activation, guided_backprop,
                                                      guided_copy, guided_net, label_saliency, mean_saliency)


def test_guided_relu6_gradient_sign_pattern():
    # inputs in the linear range (0, 6) pass a positive gradient only; saturated or negative inputs pass none
    x = torch.tensor([-1.0, 0.5, 3.0, 5.9, 6.5, 2.0], requires_grad=True)
    g = torch.tensor([1.0, 1.0, -1.0, 2.0, 1.0, 0.5])
    GuidedReLU6()(x).backward(g)
    assert x.grad.tolist() == [0.0, 1.0, 0.0, 2.0, 0.0, 0.5]
    # the forward pass is plain ReLU6
    assert GuidedReLU6()(x).tolist() == pytest.approx([0.0, 0.5, 3.0, 5.9, 6.0, 2.0])


def _tiny_net():
    """(B, 3, 1, 1) -> Linear 3->3 -> ReLU6 -> Linear 3->2; weights chosen so the hand computation is short."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 3, bias=False), nn.ReLU6(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, -1.0]]))
        net[3].weight.copy_(torch.tensor([[1.0, -1.0, 2.0], [-1.0, 1.0, 1.0]]))
    return net


def test_guided_backprop_on_a_tiny_network_by_hand():
    net = _tiny_net()
    guided = guided_copy(net)
    assert isinstance(guided[2], GuidedReLU6) and isinstance(net[2], nn.ReLU6)  # the original is untouched
    x = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    # hidden pre-activations z = W1 x = [1, 2, 2.5], all in (0, 6).
    # label 0: v = [1, -1, 2]; guided g = [1, 0, 2]; dx = W1^T g = [1 + 2, 0 + 2, -2] = [3, 2, -2]
    #   (plain backprop would give W1^T v = [3, 1, -2]); max |dx| over the 3 channels = 3 -> normalised 1.
    # label 1: v = [-1, 1, 1]; g = [0, 1, 1]; dx = [1, 2, -1]; max |dx| = 2 -> 1 after normalising.
    maps = guided_backprop(guided, x, [0, 1])
    assert maps.shape == (2, 1, 1) and torch.allclose(maps, torch.ones(2, 1, 1))
    batch = x.clone().requires_grad_(True)
    guided(batch)[0, 0].backward()
    assert batch.grad.flatten().tolist() == [3.0, 2.0, -2.0]
    plain = x.clone().requires_grad_(True)
    net(plain)[0, 0].backward()
    assert plain.grad.flatten().tolist() == [3.0, 1.0, -2.0]


def test_guided_backprop_saturated_unit_blocks_its_path():
    guided = guided_copy(_tiny_net())
    x = torch.tensor([7.0, 1.0, 0.0]).view(1, 3, 1, 1).requires_grad_(True)
    # z = [7, 1, 8]: units 0 and 2 are saturated (>= 6) and pass nothing; label 0 has v_1 = -1 < 0 -> no gradient
    guided(x)[0, 0].backward()
    assert x.grad.flatten().tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(guided_backprop(guided, x.detach(), [0]), torch.zeros(1, 1, 1))


def test_label_saliency_caches_per_label_and_batches():
    guided = guided_copy(_tiny_net())
    x = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    cache = {}
    first = label_saliency(guided, cache, x, [0, 1])
    calls = []
    guided.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    again = label_saliency(guided, cache, x, [1, 0, 1])
    assert calls == [] and set(again) == {0, 1} and torch.equal(again[0], first[0])
    assert mean_saliency(again, [], (1, 1)).sum() == 0
    assert torch.allclose(mean_saliency(again, [0, 1], (1, 1)), (first[0] + first[1]) / 2)


def test_class_activation_and_cam_gate_by_hand():
    # 2 feature channels on a 1x2 grid; class 0 looks at channel 0 (left cell), class 1 at channel 1 (right)
    head = torch.tensor([[[4.0, 0.0]], [[0.0, 2.0]]])
    fc = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    assert class_activation(head, fc, [0]).tolist() == [[1.0, 0.0]]
    assert class_activation(head, fc, [1]).tolist() == [[0.0, 1.0]]
    # each label's map is normalised before averaging, so the weaker class counts as much: [0.5, 0.5] -> 1
    assert class_activation(head, fc, [0, 1]).tolist() == [[1.0, 1.0]]
    assert class_activation(head, fc, [2]).tolist() == [[0.0, 0.0]]  # rectified: nowhere positive
    assert class_activation(head, fc, []).shape == (1, 2)
    # gating: a flat guided-backprop map takes the CAM's shape; bilinear upsampling of [1, 0] to 4 columns
    flat = torch.ones(1, 4)
    gated = cam_gate(flat, class_activation(head, fc, [0]))
    assert gated.tolist() == [[1.0, 0.75, 0.25, 0.0]]
    assert cam_gate(flat, class_activation(head, fc, [1])).tolist() == [[0.0, 0.25, 0.75, 1.0]]
    # a saliency peak the CAM does not support is suppressed
    s = torch.tensor([[0.2, 0.1, 0.1, 1.0]])
    assert cam_gate(s, class_activation(head, fc, [0])).argmax() == 0


@pytest.mark.slow
def test_real_classifier_saliency_is_in_range_and_on_the_cat(predictor, examples_dir):
    predictor.set_image(examples_dir / "cat.jpg")
    state = predictor._state
    top = state.features.logits[0].topk(3).indices.tolist()
    maps = guided_backprop(guided_net(predictor.models), state.input, top)
    assert maps.shape == (3, *state.input.shape[-2:])
    assert float(maps.min()) >= 0.0 and float(maps.amax(dim=(1, 2)).min()) == pytest.approx(1.0)
    # the cat's face fills the middle of the photo: per pixel, each map is denser inside the 10% borders than
    # on them. A flat (or uniformly noisy) map has a ratio of 1; measured: 2.13, 2.21, 2.17
    h, w = maps.shape[-2:]
    inner = torch.zeros((h, w), dtype=torch.bool)
    inner[h // 10 : -h // 10, w // 10 : -w // 10] = True
    for m in maps:
        density_ratio = float(m[inner].mean() / m[~inner].mean())
        assert density_ratio > 1.8, density_ratio
    # the classifier itself is not changed by making the guided copy
    assert all(not isinstance(m, GuidedReLU6) for m in predictor.models.backbone.net.modules())
