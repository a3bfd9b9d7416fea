"""XPM's networks (Huynh et al., CVPR 2022, seed 003, sec. 3.2) on the frozen EfficientNet-Lite0 backbone.

The paper builds on Mask R-CNN (ResNet-50, FPN). Here, on a CPU and ~370 training images, the two-stage
detector is kept in its parts but made small:

* neck: a three-level feature pyramid (strides 8/16/32, `channels` wide) over the backbone's c3/c4/c5;
* p: a class-agnostic proposal network. An anchor-free one (FCOS-style objectness, centredness and box
  distances per location, on all three levels) stands in for the RPN: it needs no anchor tuning;
* h_Emb / g_Emb: region feature (RoIAlign 7x7 on the stride-8 level) -> two FC layers -> a vector in the word
  space; the score of word o is v_o^T h_Emb(f_r) (eq. 1); background is the zero vector (score 0);
* h_Mask / g_Mask: the class-agnostic Mask R-CNN mask head (RoIAlign 14x14, four 3x3 convolutions, a 2x
  transposed convolution, 28x28 logits);
* g_Noise (student only): a separate small network from the same region feature to the per-pixel noise
  variance of the pseudo mask (28x28), eq. 6. It predicts the log variance, as Kendall & Gal do (the paper
  follows them), clamped to [1e-4, 100]; it starts at 0.1.

The RoI heads read the stride-8 level for every box (the pyramid's top-down path carries the coarser levels
into it); boxes are the proposals themselves (no second-stage box regression).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ovseg.core.models.backbone import BackboneFeatures
from ovseg.core.ops.boxes import clip_boxes, nms, roi_align

BACKBONE_CHANNELS = {8: 40, 16: 112, 32: 320}
LOG_VAR_MIN, LOG_VAR_MAX = math.log(1e-4), math.log(100.0)


@dataclass
class XPMConfig:
    channels: int = 96
    word_dim: int = 384
    emb_hidden: int = 512
    mask_convs: int = 4
    noise_convs: int = 2
    emb_roi: int = 7
    mask_roi: int = 14
    strides: tuple[int, ...] = (8, 16, 32)
    # FCOS size ranges of the three levels: a box is the target of the level where max(l, t, r, b) falls
    size_ranges: tuple[tuple[float, float], ...] = ((0.0, 64.0), (64.0, 128.0), (128.0, 1e8))
    center_radius: float = 1.5  # positives lie within this many strides of the box centre
    noise: bool = False  # the student's g_Noise
    noise_init: float = 0.1  # the noise variance g_Noise starts from
    long_side: int = 448  # network input long side (the predictor's)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.strides = tuple(int(s) for s in self.strides)
        self.size_ranges = tuple(tuple(float(v) for v in r) for r in self.size_ranges)

    @property
    def mask_size(self) -> int:
        return 2 * self.mask_roi

    def to_dict(self) -> dict:
        return asdict(self)


def _conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


class Neck(nn.Module):
    """Feature pyramid: 1x1 laterals, top-down sums, 3x3 smoothing."""

    def __init__(self, channels: int):
        super().__init__()
        self.lateral = nn.ModuleDict({str(s): nn.Conv2d(c, channels, 1) for s, c in BACKBONE_CHANNELS.items()})
        self.smooth = nn.ModuleDict({str(s): _conv(channels, channels) for s in BACKBONE_CHANNELS})

    def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> dict[int, torch.Tensor]:
        p5 = self.lateral["32"](c5)
        p4 = self.lateral["16"](c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = self.lateral["8"](c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        return {8: self.smooth["8"](p3), 16: self.smooth["16"](p4), 32: self.smooth["32"](p5)}


class ProposalHead(nn.Module):
    """Class-agnostic, anchor-free proposals: per location an objectness logit, a centredness logit and the
    log distances (in strides) to the box's four sides; shared by the levels."""

    def __init__(self, channels: int):
        super().__init__()
        self.tower = nn.Sequential(_conv(channels, channels), nn.GroupNorm(8, channels), nn.ReLU(inplace=True),
                                   _conv(channels, channels), nn.GroupNorm(8, channels), nn.ReLU(inplace=True))
        self.objectness = _conv(channels, 1)
        self.centerness = _conv(channels, 1)
        self.distances = _conv(channels, 4)
        nn.init.constant_(self.objectness.bias, -4.6)  # prior 0.01, as focal-loss detectors start

    def forward(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.tower(p)
        return self.objectness(t)[:, 0], self.centerness(t)[:, 0], self.distances(t).clamp(max=8.0)


def level_locations(hw: tuple[int, int], stride: int, device=None) -> torch.Tensor:
    """(h*w, 2) input-pixel (x, y) of each feature cell's centre at this stride, row-major."""
    h, w = hw
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def decode_distances(locations: torch.Tensor, log_dist: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, 2) locations, (N, 4) log distances in strides (l, t, r, b) -> (N, 4) boxes."""
    d = log_dist.exp() * stride
    return torch.stack([locations[:, 0] - d[:, 0], locations[:, 1] - d[:, 1],
                        locations[:, 0] + d[:, 2], locations[:, 1] + d[:, 3]], dim=1)


class EmbeddingHead(nn.Module):
    """Region feature -> visual embedding in the word space (h_Emb / g_Emb)."""

    def __init__(self, channels: int, roi: int, hidden: int, word_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * roi * roi, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, word_dim))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class MaskHead(nn.Module):
    """Region feature (14x14) -> 28x28 map: convolutions, a 2x transposed convolution, a 1x1 output."""

    def __init__(self, channels: int, convs: int):
        super().__init__()
        layers = []
        for _ in range(convs):
            layers += [_conv(channels, channels), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(channels, channels, 2, stride=2), nn.ReLU(inplace=True), nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)[:, 0]


class XPMNet(nn.Module):
    """Teacher (noise=False) or robust student (noise=True). Input: the backbone's features of one image."""

    def __init__(self, cfg: XPMConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.neck = Neck(c)
        self.proposal = ProposalHead(c)
        self.embedding = EmbeddingHead(c, cfg.emb_roi, cfg.emb_hidden, cfg.word_dim)
        self.mask = MaskHead(c, cfg.mask_convs)
        self.noise = MaskHead(c, cfg.noise_convs) if cfg.noise else None
        if self.noise is not None:
            nn.init.constant_(self.noise.net[-1].bias, math.log(cfg.noise_init))

    # ------------------------------------------------------------------ parts
    def pyramid(self, feats: BackboneFeatures | dict) -> dict[int, torch.Tensor]:
        if isinstance(feats, dict):
            return self.neck(feats["c3"], feats["c4"], feats["c5"])
        return self.neck(feats.c3.float(), feats.c4.float(), feats.c5.float())

    def proposal_maps(self, pyr: dict[int, torch.Tensor]) -> dict[int, tuple]:
        return {s: self.proposal(pyr[s]) for s in self.cfg.strides}

    @torch.no_grad()
    def proposals(self, pyr: dict[int, torch.Tensor], input_hw: tuple[int, int], pre_nms: int = 1000,
                  post_nms: int = 100, iou_threshold: float = 0.6, min_size: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Class-agnostic boxes (K, 4) in input pixels and their scores sqrt(objectness * centredness)."""
        boxes, scores = [], []
        for s, (obj, ctr, dist) in self.proposal_maps(pyr).items():
            hw = tuple(obj.shape[-2:])
            loc = level_locations(hw, s, obj.device)
            score = (torch.sigmoid(obj[0]) * torch.sigmoid(ctr[0])).sqrt().reshape(-1)
            k = min(pre_nms, score.numel())
            top = torch.topk(score, k).indices
            b = clip_boxes(decode_distances(loc[top], dist[0].permute(1, 2, 0).reshape(-1, 4)[top], s), input_hw)
            boxes.append(b)
            scores.append(score[top])
        boxes, scores = torch.cat(boxes), torch.cat(scores)
        ok = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
        boxes, scores = boxes[ok], scores[ok]
        keep = nms(boxes, scores, iou_threshold, max_keep=post_nms)
        return boxes[keep], scores[keep]

    def region_features(self, pyr: dict[int, torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
        return roi_align(pyr[8][0], boxes, size, 1.0 / 8)

    def embed(self, pyr, boxes: torch.Tensor) -> torch.Tensor:
        """(R, word_dim) visual embeddings of the regions."""
        return self.embedding(self.region_features(pyr, boxes, self.cfg.emb_roi))

    def mask_and_noise(self, pyr, boxes: torch.Tensor,
                       with_noise: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(R, 28, 28) mask logits and, for the student unless `with_noise` is False, (R, 28, 28) noise
        variances in [1e-4, 100] (else None)."""
        f = self.region_features(pyr, boxes, self.cfg.mask_roi)
        logits = self.mask(f)
        if self.noise is None or not with_noise:
            return logits, None
        variance = self.noise(f).clamp(LOG_VAR_MIN, LOG_VAR_MAX).exp()
        return logits, variance

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Half-precision weights and the config in one file, written atomically."""
        from ovseg.core.cache import atomic_write_bytes

        buf = io.BytesIO()
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in self.state_dict().items()}
        torch.save({"config": self.cfg.to_dict(), "state": state, "extra": extra or {}}, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> tuple["XPMNet", dict]:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net = cls(XPMConfig(**blob["config"]))
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state"].items()})
        return net.to(device).eval(), blob.get("extra", {})


def word_scores(embeddings: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(R, D) region embeddings, (V, D) word vectors -> (R, 1 + V) scores with the background's 0 first."""
    s = embeddings @ vectors.T
    return torch.cat([s.new_zeros((s.shape[0], 1)), s], dim=1)

