"""Evaluation metrics: mask IoU with an ignore region, presence average precision, harmonic mean.

numpy only. Conventions:

* masks are boolean HxW arrays; a `valid` mask (bool HxW) restricts the pixels that count, everything
  outside it is ignored (COCO "things" only: unlabelled pixels are not background);
* `average_precision` and `precision_recall_curve` follow scikit-learn's `average_precision_score` and
  `precision_recall_curve` (non-interpolated AP, equal scores grouped into one threshold), without the
  dependency.
"""

from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["mask_iou", "average_precision", "precision_recall_curve", "harmonic_mean"]


def _as_mask(array, name: str) -> np.ndarray:
    mask = np.asarray(array)
    if mask.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean mask, got dtype {mask.dtype}; threshold it first (e.g. probs > 0.5)")
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D HxW mask, got shape {mask.shape}")
    return mask


def soft_iou(attention: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Concept Mask's soft IoU of an attention map in [0, 1] (eq. 5): sum(a * G) / sum(max(a, G)) over the
    valid pixels (all when `valid` is None); 0.0 when both are empty there."""
    a, g = np.asarray(attention, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    if valid is not None:
        a, g = a[valid], g[valid]
    den = np.maximum(a, g).sum()
    return float((a * g).sum() / den) if den > 0 else 0.0


def mask_iou(pred, gt, valid=None) -> float:
    """Intersection over union of two boolean masks, counted over the valid pixels only.

    Args:
        pred: bool HxW predicted mask.
        gt: bool HxW ground-truth mask.
        valid: bool HxW, or None for "every pixel counts". Pixels where `valid` is False are ignored
            in both the intersection and the union.

    Returns:
        |P & G & V| / |(P | G) & V| as a float in [0, 1]. When the union is empty (neither mask has a
        valid pixel) the prediction agrees perfectly with the ground truth, and the result is 1.0.

    Raises:
        TypeError: a mask is not boolean.
        ValueError: a mask is not 2-D, or the shapes differ.
    """
    pred = _as_mask(pred, "pred")
    gt = _as_mask(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got pred {pred.shape} and gt {gt.shape}")
    if valid is not None:
        valid = _as_mask(valid, "valid")
        if valid.shape != gt.shape:
            raise ValueError(f"valid must have the masks' shape {gt.shape}, got {valid.shape}")
        pred = pred & valid
        gt = gt & valid
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & gt)) / union


def _validated_scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim > 1:
        raise ValueError(f"scores must be a 1-D sequence of numbers, got shape {scores.shape}")
    scores = scores.reshape(-1)
    labels_arr = np.asarray(labels)
    if labels_arr.ndim > 1:
        raise ValueError(f"labels must be a 1-D sequence, got shape {labels_arr.shape}")
    labels_arr = labels_arr.reshape(-1)
    if labels_arr.shape != scores.shape:
        raise ValueError(f"scores and labels must have the same length, got {scores.size} and {labels_arr.size}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite (found NaN or inf)")
    if labels_arr.dtype != np.bool_:
        uniques = np.unique(labels_arr)
        if not np.all(np.isin(uniques, (0, 1))):
            raise ValueError(f"labels must be boolean or 0/1, got values {uniques[:10].tolist()}")
        labels_arr = labels_arr.astype(bool)
    return scores, labels_arr


def _cumulative_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True/false positive counts at each distinct threshold, thresholds in decreasing order."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores = scores[order]
    labels = labels[order]
    # The last index of each run of equal scores: predictions with equal scores enter together.
    distinct = np.where(np.diff(scores))[0]
    threshold_idxs = np.r_[distinct, scores.size - 1]
    tps = np.cumsum(labels, dtype=np.int64)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    return tps, fps, scores[threshold_idxs]


def precision_recall_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score threshold (predict positive when score >= threshold).

    Same layout as `sklearn.metrics.precision_recall_curve`: `thresholds` increasing (the distinct
    scores), `precision` and `recall` one longer than `thresholds`, ending with the point
    (precision=1, recall=0) that has no threshold. Recall is therefore non-increasing.

    Args:
        scores: 1-D float scores (finite), higher means "more likely positive".
        labels: 1-D bool or 0/1 labels, same length.

    Returns:
        (precision float64 [n+1] in [0, 1], recall float64 [n+1] in [0, 1], thresholds float64 [n]).
        With no positive label, recall is undefined and returned as NaN (precision is 0 there), matching
        `average_precision` returning NaN.

    Raises:
        ValueError: empty input, lengths differ, non-finite scores or labels other than 0/1.
    """
    scores, labels = _validated_scores_labels(scores, labels)
    if scores.size == 0:
        raise ValueError("precision_recall_curve needs at least one score")
    tps, fps, thresholds = _cumulative_counts(scores, labels)
    precision = tps / (tps + fps)
    if tps[-1] == 0:
        logger.debug("precision_recall_curve: no positive label, recall set to NaN")
        recall = np.full(tps.shape, np.nan)
    else:
        recall = tps / tps[-1]
    # Reverse so that recall is decreasing, then append the (precision=1, recall=0) end point.
    return (
        np.r_[precision[::-1], 1.0],
        np.r_[recall[::-1], 0.0],
        thresholds[::-1].copy(),
    )


def average_precision(scores, labels) -> float:
    """Non-interpolated average precision, as `sklearn.metrics.average_precision_score`.

    AP = sum_n (R_n - R_{n-1}) * P_n over the distinct score thresholds taken in decreasing order, with
    R_0 = 0; all predictions sharing a score enter at the same threshold.

    Args:
        scores: 1-D float scores (finite).
        labels: 1-D bool or 0/1 labels, same length.

    Returns:
        AP in [0, 1]; NaN when there is no positive label (including empty input).
    """
    scores, labels = _validated_scores_labels(scores, labels)
    if scores.size == 0 or not labels.any():
        return float("nan")
    tps, fps, _ = _cumulative_counts(scores, labels)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    delta_recall = np.diff(np.r_[0.0, recall])
    return float(np.sum(delta_recall * precision))


def best_f1_threshold(scores, labels, decimals: int | None = None, default: float = 0.5) -> tuple[float, float]:
    """(threshold, F1) of the rule "present where score >= threshold" with the best F1 over the distinct scores
    (rounded to `decimals` when given, fewer to try); ties go to the lowest threshold. `default` (F1 0) when
    there is no score. Concept Mask's per-concept presence thresholds (supplementary 5) are chosen this way."""
    scores, labels = _validated_scores_labels(scores, labels)
    candidates = np.unique(np.round(scores, decimals) if decimals is not None else scores)
    best_t, best_f1 = float(default), -1.0
    for t in candidates:
        pred = scores >= t
        f1 = 2.0 * float((pred & labels).sum()) / max(int(pred.sum() + labels.sum()), 1)
        if f1 > best_f1:
            best_t, best_f1 = float(t), f1
    return best_t, max(best_f1, 0.0)


def auroc(scores, labels) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative (ties
    count one half; the Mann-Whitney U statistic). NaN without both classes."""
    from scipy.stats import rankdata

    scores, labels = _validated_scores_labels(scores, labels)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equally long 1-D samples (NaN when either is constant or has
    fewer than 3 values)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"spearman needs equally long samples, got {a.size} and {b.size}")
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def harmonic_mean(a: float, b: float) -> float:
    """Harmonic mean 2ab / (a + b) of two non-negative scores (e.g. target and base mIoU).

    Returns NaN if either is NaN, 0.0 if either is 0.

    Raises:
        ValueError: a score is negative.
    """
    a = float(a)
    b = float(b)
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    if a < 0 or b < 0:
        raise ValueError(f"harmonic_mean needs non-negative scores, got {a} and {b}")
    if a == 0 or b == 0:
        return 0.0
    return 2.0 * a * b / (a + b)
