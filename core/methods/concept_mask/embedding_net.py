"""Embedding network and attention refinement module of Concept Mask (ECCV 2018, sec. 4.1-4.2; verification:
supplementary 5).

The embedding network maps a globally pooled CNN feature to the word-vector space and is trained with a
cosine loss against the soft topic embedding of the image's tags. Converted to 1x1 convolutions it gives a
dense embedding map, whose inner product with a word vector is that word's coarse attention map (eq. 1). The
refinement network turns the coarse maps of all concepts into refined maps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def _blocks(in_dim: int, hidden: int, out_dim: int, linear, norm) -> nn.Sequential:
    dims = (in_dim, hidden, hidden, out_dim)
    layers = []
    for cin, cout in zip(dims[:-1], dims[1:]):
        layers += [linear(cin, cout), norm(cout), nn.ReLU()]
    return nn.Sequential(*layers)


class ConvEmbeddingNet(nn.Module):
    """The embedding network as a fully convolutional network: three 1x1 Conv2d -> BatchNorm2d -> ReLU
    blocks, (B, in_dim, h, w) -> (B, out_dim, h, w). Built by `EmbeddingNet.to_conv`."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.layers = _blocks(in_dim, hidden, out_dim, lambda i, o: nn.Conv2d(i, o, 1), nn.BatchNorm2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class EmbeddingNet(nn.Module):
    """Three fc blocks, each Linear -> BatchNorm1d -> ReLU (sec. 4.1): (B, in_dim) -> (B, out_dim).

    The paper puts a ReLU after every fc layer, the last included, so embeddings are non-negative."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.dims = (in_dim, hidden, out_dim)
        self.layers = _blocks(in_dim, hidden, out_dim, nn.Linear, nn.BatchNorm1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def to_conv(self) -> ConvEmbeddingNet:
        """The same network as 1x1 convolutions and spatial batch normalisation: weights, biases, BN affine
        parameters, running statistics, eps and momentum copied; same device, dtype and train/eval mode.
        In eval mode it gives this network's output at every location."""
        conv = ConvEmbeddingNet(*self.dims)
        p = next(self.parameters())
        conv.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            for src, dst in zip(self.layers, conv.layers):
                if isinstance(src, nn.Linear):
                    dst.weight.copy_(src.weight[:, :, None, None])
                    dst.bias.copy_(src.bias)
                elif isinstance(src, nn.BatchNorm1d):
                    dst.load_state_dict(src.state_dict())
                    dst.eps, dst.momentum = src.eps, src.momentum
        return conv.train(self.training)


def cosine_embedding_loss(e: torch.Tensor, t: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over the batch of 1 - e.t / (|e| |t|) (sec. 4.1); e, t: (B, D). Norms are clamped to `eps`."""
    return (1.0 - F.cosine_similarity(e, t, dim=-1, eps=eps)).mean()


def attention_maps(dense: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Coarse attention maps alpha(i, j) = <e_ij, w> (eq. 1): dense (B, D, h, w), words (K, D) -> (B, K, h, w)."""
    return torch.einsum("bdhw,kd->bkhw", dense, words)


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each (h, w) map of (..., h, w) rectified and divided by its maximum, into [0, 1] (sec. 4.3); a map with
    no positive value becomes all zeros."""
    rect = maps.clamp_min(0.0)
    peak = rect.amax(dim=(-2, -1), keepdim=True)
    return rect / torch.where(peak > 0, peak, torch.ones_like(peak))


def verification_score(features: torch.Tensor, attention: torch.Tensor,
                       net: EmbeddingNet | Callable[[torch.Tensor], torch.Tensor], word: torch.Tensor) -> torch.Tensor:
    """Concept verification score (supplementary 5).

    The attention map, rectified and normalised to sum 1 (uniform where it sums to 0), weights an average
    pooling of the CNN features; the pooled feature goes through the embedding network and is compared with
    the word vector by cosine similarity. Per-concept thresholds on the score are the caller's.

    Args:
        features: (B, C, h, w) CNN features.
        attention: (B, h, w) attention maps of the concept.
        net: the embedding network, or any callable (B, C) -> (B, D) that applies it (its train/eval mode
            is left as it is).
        word: (D,) the concept's word vector.

    Returns:
        (B,) cosine similarities.
    """
    a = attention.clamp_min(0.0)
    total = a.sum(dim=(-2, -1), keepdim=True)
    uniform = torch.full_like(a, 1.0 / (a.shape[-2] * a.shape[-1]))
    weights = torch.where(total > 0, a / torch.where(total > 0, total, torch.ones_like(total)), uniform)
    pooled = torch.einsum("bchw,bhw->bc", features, weights)
    return F.cosine_similarity(net(pooled), word[None, :], dim=-1)


class RefinementNet(nn.Module):
    """Attention refinement (sec. 4.2): Conv2d 1x1 (V -> bottleneck), ReLU, Conv2d 1x1 (bottleneck -> V),
    sigmoid; (B, V, h, w) coarse maps -> (B, V, h, w) refined maps in (0, 1).

    The paper specifies two 1x1 convolutions followed by a sigmoid that learn "a non-linear combination of
    the concepts"; the ReLU between them is our reading of that. Each refined map depends on all V coarse
    maps. The paper refines 750 of its 18K input concepts but its matching loss (eq. 2) also uses refined maps
    of the others, so here every input concept gets a refined map; callers pick the ones they need.
    """

    def __init__(self, num_concepts: int, bottleneck: int):
        super().__init__()
        self.reduce = nn.Conv2d(num_concepts, bottleneck, 1)
        self.expand = nn.Conv2d(bottleneck, num_concepts, 1)

    def logits(self, coarse: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid refined maps, (B, V, h, w), for numerically stable sigmoid cross entropy."""
        return self.expand(F.relu(self.reduce(coarse)))

    def forward(self, coarse: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(coarse))
