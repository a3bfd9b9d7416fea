"""Cap2Seg's segmentation model for unseen classes (seed 000, sec. 3.6).

psi(.) maps an image to a feature map f (h x w x d) in the word space; a pixel's class is the softmax over class
word vectors of f(i, j)^T w_c (eq. 12), with the vectors fixed (the packaged MiniLM's, for the paper's word2vec).
Training (eq. 18): L = L_seg + lambda * L_RS, lambda = 0.01:

* L_seg (eq. 13): cross-entropy over the seen classes on the pixels annotated with one;
* L_RS (eq. 17): for a pair of images and each unseen class c_u, the mean score f^T w_{c_u} over each image's
  unlabelled pixels Y_k in horizontal stripe k, weighted by the caption-inferred stripe distribution p_k of
  c_u in that image, is pushed up in the image whose caption makes c_u more likely (occurrence s, eq. 2) and
  down in the other (I(s_1, s_2) = +1 or -1). No unseen-class mask is ever read.

Stand-ins (README): psi is a small head on the frozen EfficientNet-Lite0 (a three-level pyramid of c3/c4/c5 at
stride 8, two 3x3 convolutions, a 1x1 projection to the 384-d word space) for the paper's DeepLab. COCO annotates
only "thing" classes, so the seen set also holds a *background* class (the text vector of "background"), trained
on the unlabelled pixels of the training images whose captions name no unseen class (elsewhere unlabelled pixels
may be an unseen object, so L_seg ignores them and L_RS reads them). Inference (eq. 14): each pixel goes to the
arg max over the candidate classes: the typed words and background (ZSL), plus the seen classes (GZSL, the
engine's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


BACKGROUND = "background"
BACKBONE_CHANNELS = {"c3": 40, "c4": 112, "c5": 320}


@dataclass
class SegmentationConfig:
    channels: int = 128
    word_dim: int = 384
    long_side: int = 448
    lambda_rs: float = 0.01  # eq. 18's lambda (the paper's value)
    k: int = 5  # horizontal stripes (sec. 3.3.2)


class Cap2SegNet(nn.Module):
    """psi: backbone features (c3, c4, c5) -> f (1, word_dim, h, w) at stride 8."""

    def __init__(self, config: SegmentationConfig | None = None):
        super().__init__()
        self.config = config or SegmentationConfig()
        c = self.config.channels
        self.lateral = nn.ModuleDict({k: nn.Conv2d(ch, c, 1) for k, ch in BACKBONE_CHANNELS.items()})
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.ReLU(inplace=True))
        self.project = nn.Conv2d(c, self.config.word_dim, 1)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        size = feats["c3"].shape[-2:]
        x = sum(F.interpolate(self.lateral[k](feats[k].float()), size=size, mode="bilinear", align_corners=False)
                if k != "c3" else self.lateral[k](feats[k].float()) for k in BACKBONE_CHANNELS)
        return self.project(self.body(x))

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Half-precision weights and the config in one file, written atomically."""
        from ovseg.core.methods.cap2seg.weights import save_half

        save_half(self, path, extra)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> tuple["Cap2SegNet", dict]:
        from ovseg.core.methods.cap2seg.weights import load_half

        return load_half(cls, SegmentationConfig, path, "cap2seg segmentation network", device)


def backbone_dict(features) -> dict[str, torch.Tensor]:
    """The three backbone levels psi reads, from `BackboneFeatures` or a dict."""
    if isinstance(features, dict):
        return {k: features[k] for k in BACKBONE_CHANNELS}
    return {k: getattr(features, k) for k in BACKBONE_CHANNELS}


def class_scores(f: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """f (1, D, h, w) or (D, h, w), class vectors (C, D) -> (C, h, w) scores f(i, j)^T w_c (eq. 12's logits)."""
    if f.dim() == 4:
        f = f[0]
    return torch.einsum("dhw,cd->chw", f, vectors.to(f.dtype))


def seg_loss(f: torch.Tensor, seen_vectors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 13, averaged over the labelled pixels: labels (h, w) hold an index into seen_vectors, or -1 where the
    pixel belongs to no seen class (ignored). Zero (with a graph) when no pixel is labelled."""
    scores = class_scores(f, seen_vectors)  # (C, h, w)
    valid = labels >= 0
    if not valid.any():
        return scores.sum() * 0.0
    return F.cross_entropy(scores.permute(1, 2, 0)[valid], labels[valid])


def stripe_means(score: torch.Tensor, unlabelled: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """score (h, w) of one class, unlabelled (h, w) bool -> (mean score over the unlabelled pixels of each of k
    horizontal stripes (k,), whether the stripe has any (k,) bool). Stripe j holds rows [j*h/k, (j+1)*h/k)."""
    h = score.shape[0]
    edges = [round(j * h / k) for j in range(k + 1)]
    means, has = [], []
    for j in range(k):
        s, m = score[edges[j]:edges[j + 1]], unlabelled[edges[j]:edges[j + 1]]
        n = m.sum()
        has.append(n > 0)
        means.append((s * m).sum() / n.clamp_min(1))
    return torch.stack(means), torch.stack(has)


def ranking_loss(f1: torch.Tensor, f2: torch.Tensor, y1: torch.Tensor, y2: torch.Tensor, unseen: torch.Tensor,
                 s1: torch.Tensor, s2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Eq. 17 for one image pair. f1, f2: (1, D, h, w) features; y1, y2: (h, w) bool, the unlabelled pixels Y;
    unseen: (U, D) the unseen classes' vectors; s1, s2: (U,) occurrence probabilities; p1, p2: (U, K) stripe
    distributions. I(s1, s2) = +1 where s1 > s2, -1 otherwise (the paper's indicator); a class with s1 == s2
    tells nothing and is left out. Stripes without unlabelled pixels contribute nothing."""
    k = p1.shape[1]
    sc1, sc2 = class_scores(f1, unseen), class_scores(f2, unseen)
    total = f1.sum() * 0.0
    for u in range(unseen.shape[0]):
        if float(s1[u]) == float(s2[u]):
            continue
        sign = 1.0 if float(s1[u]) > float(s2[u]) else -1.0
        m1, _ = stripe_means(sc1[u], y1, k)
        m2, _ = stripe_means(sc2[u], y2, k)
        total = total - sign * ((p1[u] * m1).sum() - (p2[u] * m2).sum())
    return total


def pixel_labels(scores: torch.Tensor) -> torch.Tensor:
    """Eq. 14: (C, h, w) scores -> (h, w) the arg max class index per pixel."""
    return scores.argmax(dim=0)
