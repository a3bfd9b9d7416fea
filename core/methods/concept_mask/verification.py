"""Concept verification that only acts when it is sure (Concept Mask, supplementary 5; issue 17).

The verification score is a cosine between the attention-pooled image embedding and the word vector. The paper
thresholds it per concept. Here the thresholds are calibrated on base classes of images no trained part saw:

* a concept with at least MIN_POSITIVES positive images in the calibration set gets its own threshold (the one
  with the best F1 there, the paper's per-concept thresholds); any other word (every target class, any typed
  word) gets the one threshold fitted over all base concepts;
* a logistic curve P(present) = sigmoid(slope * (cosine - threshold) + intercept), fitted on the same base
  pairs, turns the cosine into a probability;
* the gate empties a mask only for a word the calibration covers (a base concept, trained with boxes) whose
  P(present) is below `gate`, the largest level at which at least GATE_PRECISION of the masks it would empty
  on the calibration set were truly absent. Any other word (every target class, any typed word) is never
  emptied: its verdict is shown, marked as uncalibrated, and its mask and maps are kept.

Two folds are fitted the way `fused` cross-fits (`ovseg.core.image_io.pixel_key` picks an image's fold): an
image of the calibration set is judged by the calibration fitted without it; any other image by the one
fitted on all. `ovseg train concept_mask` writes them to verification.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ovseg.core.ops.metrics import best_f1_threshold

MIN_POSITIVES = 3
GATE_LEVELS = (0.01, 0.02, 0.05, 0.1, 0.2)
GATE_PRECISION = 0.99


@dataclass
class Calibration:
    global_threshold: float
    thresholds: dict[str, float] = field(default_factory=dict)
    slope: float = 10.0
    intercept: float = 0.0
    gate: float = 0.0  # 0: the gate never empties a mask
    covered: list[str] = field(default_factory=list)  # the concepts the calibration set scored (gated)

    def threshold(self, concept: str) -> tuple[float, bool]:
        """(the concept's threshold, whether it is its own)."""
        if concept in self.thresholds:
            return self.thresholds[concept], True
        return self.global_threshold, False

    def probability(self, concept: str, cosine: float) -> float:
        t, _ = self.threshold(concept)
        z = self.slope * (cosine - t) + self.intercept
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    def covers(self, concept: str) -> bool:
        """Whether the calibration set scored this concept (whose gate may then empty its mask)."""
        return concept in self.covered

    def empties(self, concept: str, cosine: float) -> bool:
        """Whether the gate empties the concept's mask: only for a covered concept judged absent with
        confidence."""
        return self.covers(concept) and self.probability(concept, cosine) < self.gate

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(float(d["global_threshold"]), {k: float(v) for k, v in d.get("thresholds", {}).items()},
                   float(d["slope"]), float(d["intercept"]), float(d["gate"]), list(d.get("covered", [])))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 50) -> tuple[float, float]:
    """(slope, intercept) of a one-feature logistic regression by Newton's method (a small ridge keeps it
    finite on separable data)."""
    a, b = 1.0, 0.0
    x, y = np.asarray(x, float), np.asarray(y, float)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(a * x + b, -60, 60)))
        w = p * (1 - p)
        grad = np.array([((p - y) * x).sum() + l2 * a, (p - y).sum()])
        hess = np.array([[(w * x * x).sum() + l2, (w * x).sum()], [(w * x).sum(), w.sum() + 1e-9]])
        step = np.linalg.solve(hess, grad)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-8:
            break
    return float(a), float(b)


def fit_calibration(scores: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> Calibration:
    """Per-concept thresholds, the shared threshold, the logistic curve and the gate level from the
    verification cosines of base concepts (`scores[c]`, one per image) and whether each image shows the concept."""
    concepts = [c for c in scores if len(scores[c])]
    if not concepts:
        raise ValueError("no verification scores to calibrate on")
    all_s = np.concatenate([np.asarray(scores[c], float) for c in concepts])
    all_l = np.concatenate([np.asarray(labels[c], bool) for c in concepts])
    global_t, _ = best_f1_threshold(all_s, all_l)
    own = {c: best_f1_threshold(np.asarray(scores[c], float), np.asarray(labels[c], bool))[0]
           for c in concepts if int(np.asarray(labels[c], bool).sum()) >= MIN_POSITIVES}
    x = np.concatenate([np.asarray(scores[c], float) - own.get(c, global_t) for c in concepts])
    slope, intercept = fit_logistic(x, all_l)
    cal = Calibration(global_t, own, slope, intercept, 0.0, sorted(concepts))
    prob = 1.0 / (1.0 + np.exp(-np.clip(slope * x + intercept, -60, 60)))
    for level in GATE_LEVELS:
        fire = prob < level
        if fire.any() and float((~all_l[fire]).mean()) >= GATE_PRECISION:
            cal.gate = level
    return cal


class CalibrationSet:
    """verification.json: the calibration fitted on all images and one per fold (fitted without it)."""

    def __init__(self, all_images: Calibration, folds: list[tuple[set[str], Calibration]], summary: dict | None = None):
        self.all, self.folds, self.summary = all_images, folds, summary or {}

    def for_image(self, key: str) -> tuple[Calibration, str]:
        for k, (images, cal) in enumerate(self.folds):
            if key in images:
                return cal, f"fold {k} (cross-fitted: this image was in the calibration set)"
        return self.all, "all"

    def save(self, path: str | Path) -> None:
        from ovseg.core.cache import atomic_write_json

        atomic_write_json(Path(path), {"all": self.all.to_dict(), "summary": self.summary,
                                       "folds": [{"images": sorted(i), "calibration": c.to_dict()}
                                                 for i, c in self.folds]})

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationSet":
        blob = json.loads(Path(path).read_text())
        return cls(Calibration.from_dict(blob["all"]),
                   [(set(f["images"]), Calibration.from_dict(f["calibration"])) for f in blob["folds"]],
                   blob.get("summary", {}))


def fit_cross_fitted(samples: list[dict], folds: int = 2) -> CalibrationSet:
    """samples: {"key": pixel key, "scores": {concept: cosine}, "present": set of concepts} per calibration
    image. Fold of an image: its key's first hex digits modulo `folds`."""
    def fit(chosen):
        scores = {c: np.array([s["scores"][c] for s in chosen]) for c in samples[0]["scores"]}
        labels = {c: np.array([c in s["present"] for s in chosen]) for c in samples[0]["scores"]}
        return fit_calibration(scores, labels)

    fold_of = [int(s["key"][:8], 16) % folds for s in samples]
    parts = []
    for k in range(folds):
        inside = [s for s, f in zip(samples, fold_of) if f == k]
        outside = [s for s, f in zip(samples, fold_of) if f != k]
        if inside and outside:
            parts.append(({s["key"] for s in inside}, fit(outside)))
    everything = fit(samples)
    summary = {"images": len(samples), "concepts": len(samples[0]["scores"]),
               "own_thresholds": len(everything.thresholds), "global_threshold": round(everything.global_threshold, 4),
               "gate": everything.gate, "gate_precision": GATE_PRECISION, "min_positives": MIN_POSITIVES}
    return CalibrationSet(everything, parts, summary)
