"""Guided backpropagation through the classifier's ReLU6 activations (Springenberg et al. 2015), as
Golub et al. (seed 002, sec. 3.1) use it for their saliency maps.

A guided ReLU6 passes a gradient back only where its input was in the linear range (0 < x < 6, the forward
rule) and the gradient itself is positive (the deconvnet rule). The saliency of one class: the gradient of
its logit with respect to the input image, max over the three colour channels of its magnitude, divided by
its maximum so that it lies in [0, 1]. Several classes are done in one batched forward and backward pass.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class _GuidedReLU6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(0.0, 6.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad.clamp_min(0.0) * ((x > 0.0) & (x < 6.0)).to(grad.dtype)


class GuidedReLU6(nn.Module):
    """ReLU6 in the forward pass; guided backpropagation's rule in the backward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GuidedReLU6.apply(x)


def guided_copy(net: nn.Module) -> nn.Module:
    """A frozen copy of `net` in eval mode with every nn.ReLU6 replaced by GuidedReLU6."""
    guided = copy.deepcopy(net).eval().requires_grad_(False)
    for module in list(guided.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(module, name, GuidedReLU6())
    return guided


def guided_net(models) -> nn.Module:
    """The engine's classifier with guided-backprop ReLU6s (a frozen copy), built once per `Models`."""
    return models.shared("cls_saliency.guided_net", lambda: guided_copy(models.backbone.net))


def guided_backprop(guided_net: nn.Module, x: torch.Tensor, labels: list[int] | torch.Tensor) -> torch.Tensor:
    """Saliency maps of `labels` for one input.

    Args:
        guided_net: from `guided_copy`; maps (B, 3, H, W) to (B, num_classes) logits.
        x: (1, 3, H, W) network input.
        labels: K class indices.

    Returns:
        (K, H, W) float32 in [0, 1], one map per label (all zero where a label has no gradient).
    """
    labels = torch.as_tensor(labels, dtype=torch.long, device=x.device).flatten()
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"x must be (1, 3, H, W), got {tuple(x.shape)}")
    if len(labels) == 0:
        return torch.zeros((0, *x.shape[-2:]), dtype=torch.float32, device=x.device)
    batch = x.detach().expand(len(labels), -1, -1, -1).clone().requires_grad_(True)
    with torch.enable_grad():
        logits = guided_net(batch)
        # Each batch item's gradient depends only on its own logit: one backward pass serves all K.
        logits.gather(1, labels[:, None]).sum().backward()
    saliency = batch.grad.abs().amax(dim=1)  # max over the colour channels (sec. 3.1)
    peak = saliency.flatten(1).amax(dim=1).clamp_min(1e-12)
    return (saliency / peak[:, None, None]).float()


def label_saliency(guided_net: nn.Module, state_cache: dict, x: torch.Tensor, labels) -> dict[int, torch.Tensor]:
    """{label: (H, W) map} for `labels` on input x, computing only those not already in `state_cache`
    (one batched pass for the missing ones): the negatives several words share are computed once."""
    done = state_cache.setdefault("guided_backprop", {})
    missing = [int(c) for c in dict.fromkeys(int(c) for c in labels) if int(c) not in done]
    if missing:
        for c, m in zip(missing, guided_backprop(guided_net, x, missing)):
            done[c] = m
    return {int(c): done[int(c)] for c in labels}


def mean_saliency(maps: dict[int, torch.Tensor], labels, shape) -> torch.Tensor:
    """The average of the labels' maps (sec. 3.1); zeros when there is no label. (H, W) in [0, 1]."""
    labels = list(labels)
    if not labels:
        return torch.zeros(shape, dtype=torch.float32)
    return torch.stack([maps[int(c)] for c in labels]).mean(0)


SALIENCY_MODES = ("guided_backprop", "cam_gated", "cam")


def class_activation(head: torch.Tensor, fc_weight: torch.Tensor, labels) -> torch.Tensor:
    """The mean over `labels` of each label's class activation map relu(W_c . f(x, y)) / its max (Zhou et
    al. 2016), divided by its maximum. head: (C, h, w) features before pooling; fc_weight: (classes, C).
    -> (h, w) in [0, 1]; zeros when there is no label."""
    labels = [int(c) for c in labels]
    if not labels:
        return torch.zeros(head.shape[-2:], dtype=torch.float32, device=head.device)
    w = fc_weight[torch.tensor(labels, device=fc_weight.device)].to(head.dtype)
    cams = torch.einsum("kc,chw->khw", w, head).clamp_min(0.0).float()
    cams = cams / cams.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    mean = cams.mean(0)
    return mean / mean.max().clamp_min(1e-12)


def cam_gate(saliency: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """A class-discriminative saliency map: the guided-backprop map gated by the same labels' class
    activation map (upsampled to its size), renormalised to [0, 1] (the Guided Grad-CAM idea of Selvaraju
    et al. 2017, with CAM, which equals Grad-CAM for a global-average-pooled linear classifier). This is
    the project's `saliency=cam_gated` option, not the paper's: through EfficientNet-Lite0 guided backprop
    is nearly the same map for every class."""
    up = torch.nn.functional.interpolate(activation[None, None].float(), size=tuple(saliency.shape[-2:]),
                                         mode="bilinear", align_corners=False)[0, 0].to(saliency.device)
    gated = saliency.float() * up.clamp_min(0.0)
    return gated / gated.max().clamp_min(1e-12)


def cam_prior(activation: torch.Tensor, shape) -> torch.Tensor:
    """A dense prior: the labels' class activation map itself, upsampled (bilinear) to `shape` and
    renormalised to [0, 1]. The project's `saliency=cam` option, not the paper's: guided-backprop maps are
    sparse speckle, which a segmenter trained on frozen features learns to ignore (see the README)."""
    up = torch.nn.functional.interpolate(activation[None, None].float(), size=tuple(shape), mode="bilinear",
                                         align_corners=False)[0, 0].clamp_min(0.0)
    return up / up.max().clamp_min(1e-12)
