"""Training losses of the attention refinement stage of Concept Mask (ECCV 2018, sec. 4.2; threshold from
supplementary 4).

- box loss: sigmoid cross entropy between a concept's refined map and its bounding-box mask G;
- matching loss: the refined maps of the N concepts with the highest coarse activation are pulled toward
  their coarse maps binarised at 0.2 (learning without forgetting for concepts without boxes);
- spatial discrimination loss: a concept i's ground truth is a negative for each concept j whose masks rarely
  overlap i's (mask overlap ratio O(i, j), eq. 3), weighted by gamma_ij (eq. 4).
All take refined-map logits (pre-sigmoid) for numerically stable cross entropy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

N_TOP = 800  # N in eq. 2: matching loss on the top-N coarse maps
C_MATCH = 1e-6  # c in eq. 2
MATCH_THRESHOLD = 0.2  # binarisation threshold of the coarse maps (supplementary 4)
OVERLAP_LIMIT = 0.5  # eq. 4: pairs with O(i, j) >= 0.5 get no spatial discrimination


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(values * weights) / sum(weights); 0 (still differentiable in `values`) when the weights sum to 0."""
    total = weights.sum()
    return (values * weights).sum() / torch.where(total > 0, total, torch.ones_like(total))


def box_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """First term of eq. 2: sigmoid cross entropy between refined-map logits (B, h, w) and the box mask G
    (1 inside a box of the concept, 0 outside), mean over the pixels where `valid` (same shape) is true."""
    bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    if valid is None:
        return bce.mean()
    return _masked_mean(bce, valid.to(bce.dtype))


def matching_loss(logits: torch.Tensor, coarse: torch.Tensor, top_n: int = N_TOP,
                  threshold: float = MATCH_THRESHOLD) -> torch.Tensor:
    """Second term of eq. 2 without c.

    Per image, the `top_n` concepts whose coarse maps have the highest maximum (all V if fewer) are
    selected; their refined maps are trained by sigmoid cross entropy toward B(alpha0) = coarse >= threshold.
    The loss is the mean over the selected (image, concept, pixel) entries. Eq. 2 sums over the N maps; this
    mean makes the scale independent of N, h and w, so `c` in `multitask_loss` weighs it accordingly.

    Args:
        logits: (B, V, h, w) refined-map logits.
        coarse: (B, V, h, w) coarse attention maps, already normalised to [0, 1]; used as targets only.
    """
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, not {top_n}")
    v, h, w = coarse.shape[1:]
    idx = coarse.amax(dim=(-2, -1)).topk(min(top_n, v), dim=1).indices  # (B, k)
    idx = idx[:, :, None, None].expand(-1, -1, h, w)
    target = (coarse.detach().gather(1, idx) >= threshold).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits.gather(1, idx), target)


def multitask_loss(box: torch.Tensor, matching: torch.Tensor, c: float = C_MATCH) -> torch.Tensor:
    """Eq. 2: box + c * matching (the paper's c = 1e-6)."""
    return box + c * matching


def overlap_ratio(masks_per_image: list[dict[int, np.ndarray]], num_concepts: int) -> np.ndarray:
    """Mask overlap ratio O (eq. 3), (V, V) float64, not symmetric.

    O(i, j) = sum_n |a_n(i) & a_n(j)| / sum_n |a_n(i)|, both sums over the images n that contain both i and j
    (to avoid the effect of incomplete annotation). NaN (unknown) where i and j never co-occur or where i's
    masks in those images are all empty. The diagonal is 1 for the concepts that occur, NaN for the others.

    Args:
        masks_per_image: per image, {concept index: (H, W) bool mask} for the concepts it contains.
        num_concepts: V.
    """
    inter = np.zeros((num_concepts, num_concepts), dtype=np.float64)
    area = np.zeros((num_concepts, num_concepts), dtype=np.float64)  # area[i, j]: sum of |a_n(i)| over n with i, j
    both = np.zeros((num_concepts, num_concepts), dtype=bool)
    for masks in masks_per_image:
        if not masks:
            continue
        ids = np.array(sorted(int(k) for k in masks), dtype=np.int64)
        if ids[0] < 0 or ids[-1] >= num_concepts:
            raise ValueError(f"concept indices must be in [0, {num_concepts}), got {ids.tolist()}")
        flat = np.stack([np.asarray(masks[int(k)], dtype=bool).ravel() for k in ids]).astype(np.float64)
        cell = np.ix_(ids, ids)
        inter[cell] += flat @ flat.T
        area[cell] += flat.sum(axis=1)[:, None]
        both[cell] = True
    out = np.full((num_concepts, num_concepts), np.nan)
    known = both & (area > 0)
    out[known] = inter[known] / area[known]
    occurs = np.diag(both)
    out[np.flatnonzero(occurs), np.flatnonzero(occurs)] = 1.0
    return out


def gamma_weights(overlap: np.ndarray) -> np.ndarray:
    """Eq. 4: gamma_ij = 1 - O(i, j) where O(i, j) < 0.5, else 0; also 0 where O is NaN (the pair never
    co-occurred: no evidence that it does not overlap) and on the diagonal.

    Literal eq. 4: for a part inside a whole (face in person), O(person, face) is small, so the person's pixels,
    the face's own included, become weighted negatives for face; the paper does not discuss this case."""
    overlap = np.asarray(overlap, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        gamma = np.where(overlap < OVERLAP_LIMIT, 1.0 - overlap, 0.0)
    np.fill_diagonal(gamma, 0.0)
    return gamma


def spatial_discrimination_loss(logits: torch.Tensor, gt: torch.Tensor, present: torch.Tensor,
                                gamma: torch.Tensor) -> torch.Tensor:
    """Spatial discrimination loss (sec. 4.2).

    For each image, each present concept i, each concept j != i with gamma_ij > 0 and each pixel where
    gt_i = 1, the term gamma_ij * BCE(logit_j, 0) = gamma_ij * softplus(logit_j). The loss is the mean of these
    terms over all such (image, i, j, pixel) entries; 0, with a gradient path to `logits`, when there are none.

    Args:
        logits: (B, V, h, w) refined-map logits.
        gt: (B, V, h, w) binary masks of the concepts present.
        present: (B, V) bool.
        gamma: (V, V) weights from `gamma_weights` (a tensor or an array).
    """
    b, v = logits.shape[:2]
    gamma = torch.as_tensor(gamma, dtype=logits.dtype, device=logits.device).clone()
    gamma.fill_diagonal_(0.0)
    g = (gt.to(logits.dtype) * present.to(logits.dtype)[:, :, None, None]).reshape(b, v, -1)  # (B, V, P)
    neg = F.softplus(logits).reshape(b, v, -1)  # BCE against target 0
    pair = torch.bmm(g, neg.transpose(1, 2))  # (B, V_i, V_j): sum over pixels with gt_i = 1 of BCE(logit_j, 0)
    total = (gamma * pair).sum()
    count = ((gamma > 0).to(logits.dtype) * g.sum(dim=-1)[:, :, None]).sum()
    return total / torch.where(count > 0, count, torch.ones_like(count))
