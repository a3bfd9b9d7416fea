"""XPM's losses (seed 003, sec. 3.2) and the proposal network's targets.

* L_GT (sec. 3.2.1): proposals (focal objectness, centredness, GIoU boxes: the anchor-free stand-in for the
  RPN's losses), region classification by the embedding head against the base-class word vectors with the
  zero background vector (background down-weighted to 0.2, sec. 4.1) and the class-agnostic mask BCE.
* L_X (eq. 3): softmax over the caption vocabulary's word vectors of each aligned region's embedding, the
  caption word as target; L_X^alpha weights each term by the region's reliability alpha (eq. 7), detached so
  that no gradient reaches g_Noise through it (sec. 4.1).
* L_M (eq. 6): the pseudo mask's BCE on logits corrupted by Gaussian noise of the predicted variance, sampled
  with the reparameterisation trick. As in the works the paper follows (Kendall & Gal 2017; Hu et al. 2020),
  the noisy likelihood is averaged over T samples inside the log: -log (1/T) sum_t sigmoid(+-(z + sigma*xi_t)).
  (A single-sample BCE outside the log would always rise with the variance, by Jensen's inequality, and drive
  every noise estimate to zero.)
* reliability (eq. 7): alpha = eta / mean pixel noise of the mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ovseg.core.methods.xpm.model import XPMConfig, level_locations

BACKGROUND_WEIGHT = 0.2  # sec. 4.1: "we also downweight the detection loss for background class to 0.2"
NOISE_SAMPLES = 8


# ------------------------------------------------------------------------------------------- proposals

def proposal_targets(gt_boxes: torch.Tensor, level_hw: dict[int, tuple[int, int]], cfg: XPMConfig) -> dict[int, dict]:
    """FCOS-style targets per level: for each location, the smallest ground-truth box that contains it, whose
    centre is within `center_radius` strides, and whose largest side distance falls in the level's range.

    Returns {stride: {"positive": (N,) bool, "distances": (N, 4) l,t,r,b pixels, "centerness": (N,)}}.
    """
    out = {}
    for (s, hw), (lo, hi) in zip(level_hw.items(), cfg.size_ranges):
        loc = level_locations(hw, s, gt_boxes.device)
        n = loc.shape[0]
        if gt_boxes.numel() == 0:
            out[s] = {"positive": torch.zeros(n, dtype=torch.bool), "distances": torch.zeros(n, 4),
                      "centerness": torch.zeros(n)}
            continue
        x, y = loc[:, 0:1], loc[:, 1:2]
        b = gt_boxes[None]
        d = torch.stack([x - b[..., 0], y - b[..., 1], b[..., 2] - x, b[..., 3] - y], dim=-1)  # (N, G, 4)
        inside = d.min(dim=-1).values > 0
        cx, cy = (b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2
        r = cfg.center_radius * s
        near = ((x - cx).abs() <= r) & ((y - cy).abs() <= r)
        reach = d.max(dim=-1).values
        fits = (reach >= lo) & (reach <= hi)
        ok = inside & near & fits
        area = ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])).expand(n, -1)
        area = torch.where(ok, area, torch.full_like(area, float("inf")))
        best = area.argmin(dim=1)
        positive = ok.any(dim=1)
        dist = d[torch.arange(n), best]
        lr, tb = dist[:, [0, 2]], dist[:, [1, 3]]
        ctr = ((lr.min(1).values / lr.max(1).values.clamp(min=1e-6))
               * (tb.min(1).values / tb.max(1).values.clamp(min=1e-6))).clamp(min=0).sqrt()
        out[s] = {"positive": positive, "distances": dist.clamp(min=1e-3), "centerness": torch.where(positive, ctr, 0)}
    return out


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Summed focal loss (Lin et al. 2017)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (a_t * (1 - p_t) ** gamma * ce).sum()


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, 4) l,t,r,b distances from the same locations -> (N,) 1 - generalised IoU."""
    pa = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    ta = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    iw = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 2], target[:, 2])
    ih = torch.minimum(pred[:, 1], target[:, 1]) + torch.minimum(pred[:, 3], target[:, 3])
    inter = iw.clamp(min=0) * ih.clamp(min=0)
    union = pa + ta - inter
    iou = inter / union.clamp(min=1e-6)
    ew = torch.maximum(pred[:, 0], target[:, 0]) + torch.maximum(pred[:, 2], target[:, 2])
    eh = torch.maximum(pred[:, 1], target[:, 1]) + torch.maximum(pred[:, 3], target[:, 3])
    enclose = (ew * eh).clamp(min=1e-6)
    return 1 - (iou - (enclose - union) / enclose)


def proposal_loss(maps: dict[int, tuple], targets: dict[int, dict]) -> torch.Tensor:
    """Focal objectness over every location (per positive) + centredness BCE and centredness-weighted GIoU
    over the positives."""
    obj_all, pos_all, ctr_logit, ctr_t, pred_d, tgt_d = [], [], [], [], [], []
    for s, (obj, ctr, dist) in maps.items():
        t = targets[s]
        pos = t["positive"]
        obj_all.append(obj[0].reshape(-1))
        pos_all.append(pos.float())
        ctr_logit.append(ctr[0].reshape(-1)[pos])
        ctr_t.append(t["centerness"][pos])
        pred_d.append(dist[0].permute(1, 2, 0).reshape(-1, 4)[pos].exp() * s)
        tgt_d.append(t["distances"][pos])
    obj_all, pos_all = torch.cat(obj_all), torch.cat(pos_all)
    n_pos = max(1.0, float(pos_all.sum()))
    loss = sigmoid_focal_loss(obj_all, pos_all) / n_pos
    ctr_logit, ctr_t = torch.cat(ctr_logit), torch.cat(ctr_t)
    if ctr_t.numel():
        loss = loss + F.binary_cross_entropy_with_logits(ctr_logit, ctr_t)
        w = ctr_t
        loss = loss + (giou_loss(torch.cat(pred_d), torch.cat(tgt_d)) * w).sum() / w.sum().clamp(min=1e-6)
    return loss


# ------------------------------------------------------------------------------------------- regions

def classification_loss(scores: torch.Tensor, labels: torch.Tensor, background_weight: float = BACKGROUND_WEIGHT) -> torch.Tensor:
    """scores (R, 1 + V) with background at column 0 (the zero vector's score), labels (R,) in [0, V]
    (0 = background). Cross-entropy with the background terms weighted by `background_weight`, normalised by
    the total weight."""
    ce = F.cross_entropy(scores, labels, reduction="none")
    w = torch.where(labels == 0, torch.full_like(ce, background_weight), torch.ones_like(ce))
    return (ce * w).sum() / w.sum().clamp(min=1e-6)


def mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 5 / Mask R-CNN: mean per-pixel BCE of (R, m, m) logits against binary targets."""
    if logits.numel() == 0:
        return logits.sum()
    return F.binary_cross_entropy_with_logits(logits, targets.float())


def noisy_mask_loss(logits: torch.Tensor, variance: torch.Tensor, targets: torch.Tensor,
                    samples: int = NOISE_SAMPLES, xi: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 6, per mask: (R,) mean over pixels of -log (1/T) sum_t sigmoid(y * (z + sqrt(var) * xi_t)),
    y = +1 on the pseudo mask and -1 off it; xi_t ~ N(0, 1) (reparameterisation: the gradient reaches the
    variance through sqrt(var) * xi). `xi` (T, R, m, m) may be given (tests)."""
    if xi is None:
        xi = torch.randn((samples, *logits.shape), device=logits.device, dtype=logits.dtype)
    y = targets.float() * 2 - 1
    noisy = logits[None] + variance.sqrt()[None] * xi
    log_lik = torch.logsumexp(F.logsigmoid(y[None] * noisy), dim=0) - math.log(xi.shape[0])
    return (-log_lik).flatten(1).mean(dim=1)


def mean_noise(variance: torch.Tensor) -> torch.Tensor:
    """(R, m, m) pixel noise -> (R,) each pseudo mask's noise level, the mean over its region (sec. 3.2.4)."""
    return variance.flatten(1).mean(dim=1)


def reliability(noise_level: torch.Tensor, eta: float) -> torch.Tensor:
    """Eq. 7: alpha = eta / noise level."""
    return eta / noise_level.clamp(min=1e-12)


def cross_modal_loss(embeddings: torch.Tensor, vocab: torch.Tensor, targets: torch.Tensor,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3 (and L_X^alpha with `weights`): -sum_o alpha_o log softmax_w(v_w^T g(f_o))[o], averaged over the
    regions. embeddings (R, D); vocab (V, D) the caption vocabulary's word vectors; targets (R,) indices
    into vocab; weights (R,) detached here, so the loss sends no gradient into whatever produced them."""
    if embeddings.shape[0] == 0:
        return embeddings.sum()
    nll = F.cross_entropy(embeddings @ vocab.T, targets, reduction="none")
    if weights is not None:
        nll = nll * weights.detach()
    return nll.mean()
