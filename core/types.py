"""Result types of the engine, validated on construction. No heavy dependency: numpy only.

Adapters to other formats (FiftyOne labels, COCO RLE, PNG overlays) live in `ovseg.app`, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PRIOR_KINDS = (
    "attention",  # a word's attention / activation map (CAM, Concept Mask)
    "attention_refined",
    "saliency_positive",  # S+ (Golub et al.)
    "saliency_negative",  # S-
    "caption",  # caption prior (Cap2Seg)
    "local",  # a prior from the known classes around (Cap2Seg's local branch)
    "probability",  # a segmenter's foreground probability
    "noise",  # per-pixel noise map (XPM)
    "group",  # group assignment (OVSegmentor)
)


def _check_map(name: str, value: np.ndarray, dtype_kind: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(value).__name__}")
    if value.ndim != 2 or min(value.shape) < 1:
        raise ValueError(f"{name} must be a non-empty HxW array, got shape {value.shape}")
    if dtype_kind == "float" and value.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {value.dtype}")
    if dtype_kind == "bool" and value.dtype != np.bool_:
        raise TypeError(f"{name} must be bool, got {value.dtype}")
    return value


def _check_unit(name: str, value: float, allow_nan: bool = False) -> float:
    value = float(value)
    if np.isnan(value) and allow_nan:
        return value
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


@dataclass(frozen=True)
class Prior:
    """A per-pixel prior for one concept, at image size.

    map: HxW float32 in [0, 1]. kind: one of PRIOR_KINDS. score: the method's confidence for this prior in
    [0, 1] (NaN where the method has none). label: what the map is, for people (default: the kind), e.g.
    "CAM on object proposals" for one of `fused`'s evidence maps.
    """

    map: np.ndarray
    method: str
    concept: str
    kind: str
    score: float = float("nan")
    label: str = ""

    def __post_init__(self):
        _check_map("Prior.map", self.map, "float")
        if not np.isfinite(self.map).all() or self.map.min() < 0.0 or self.map.max() > 1.0:
            raise ValueError(f"Prior.map must hold finite values in [0, 1] ({self.method}/{self.concept})")
        if self.kind not in PRIOR_KINDS:
            raise ValueError(f"Prior.kind must be one of {PRIOR_KINDS}, got {self.kind!r}")
        if not self.concept:
            raise ValueError("Prior.concept must be a non-empty word")
        object.__setattr__(self, "score", _check_unit("Prior.score", self.score, allow_nan=True))
        if not self.label:
            object.__setattr__(self, "label", self.kind.replace("_", " "))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.map.shape)


@dataclass(frozen=True)
class PseudoLabel:
    """One instance pseudo-label.

    mask: HxW bool. box: (x0, y0, x1, y1) in pixels, x1 > x0 and y1 > y0 (derived from the mask when None).
    score: the method's score in [0, 1]. noise_map: optional HxW float32 in [0, 1]. reliability: optional
    in [0, 1] (XPM eq. 7).
    """

    mask: np.ndarray
    concept: str
    score: float
    method: str
    box: tuple[float, float, float, float] | None = None
    noise_map: np.ndarray | None = None
    reliability: float | None = None

    def __post_init__(self):
        _check_map("PseudoLabel.mask", self.mask, "bool")
        if not self.concept:
            raise ValueError("PseudoLabel.concept must be a non-empty word")
        object.__setattr__(self, "score", _check_unit("PseudoLabel.score", self.score))
        if self.box is None:
            object.__setattr__(self, "box", box_from_mask(self.mask))
        else:
            x0, y0, x1, y1 = (float(v) for v in self.box)
            if not (x1 > x0 and y1 > y0):
                raise ValueError(f"PseudoLabel.box must be (x0, y0, x1, y1) with x1>x0, y1>y0, got {self.box}")
            object.__setattr__(self, "box", (x0, y0, x1, y1))
        if self.noise_map is not None:
            _check_map("PseudoLabel.noise_map", self.noise_map, "float")
            if self.noise_map.shape != self.mask.shape:
                raise ValueError("PseudoLabel.noise_map must have the mask's shape")
            nm = self.noise_map
            if not np.isfinite(nm).all() or nm.min() < 0.0 or nm.max() > 1.0:
                raise ValueError("PseudoLabel.noise_map must hold finite values in [0, 1]")
        if self.reliability is not None:
            object.__setattr__(self, "reliability", _check_unit("PseudoLabel.reliability", self.reliability))


def box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight (x0, y0, x1, y1) box of a boolean mask (x1, y1 exclusive), None for an empty mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return None
    return float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)


@dataclass
class ConceptResult:
    """What one method says about one concept on the current image.

    mask: HxW bool at image size. score: presence score in [0, 1]. present: the method's verdict.
    priors: the maps that explain the mask. details: method-specific facts (proxy classes, thresholds).
    ms: wall time spent on this concept, in milliseconds.
    """

    concept: str
    method: str
    mask: np.ndarray
    score: float
    present: bool
    priors: list[Prior] = field(default_factory=list)
    pseudo_labels: list[PseudoLabel] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    ms: float = 0.0

    def __post_init__(self):
        _check_map("ConceptResult.mask", self.mask, "bool")
        self.score = _check_unit("ConceptResult.score", self.score)
        for prior in self.priors:
            if prior.shape != self.mask.shape:
                raise ValueError(f"prior {prior.kind} has shape {prior.shape}, mask has {self.mask.shape}")

    def prior(self, kind: str) -> Prior | None:
        return next((p for p in self.priors if p.kind == kind), None)


@dataclass
class Prediction:
    """All results of one `Predictor.predict` call. image_size is (height, width)."""

    image_size: tuple[int, int]
    results: list[ConceptResult]
    negatives: tuple[str, ...] = ()
    caption: str | None = None

    def get(self, concept: str, method: str | None = None) -> ConceptResult:
        for r in self.results:
            if r.concept == concept and (method is None or r.method == method):
                return r
        raise KeyError(f"no result for concept {concept!r}" + (f" and method {method!r}" if method else ""))

    def by_method(self, method: str) -> list[ConceptResult]:
        return [r for r in self.results if r.method == method]
