"""GrabCut post-processing of a likelihood image, as Golub et al. (WACV 2020, seed 002, sec. 3.2 and 4.1
"Post-Processing with GrabCut") turn their segmenter's output P in [0, 1] into the final binary mask.

A single fixed threshold suits some images and not others, because the range of P varies per image and
per label. The paper therefore annotates each pixel relative to the image's own range: with
p_min, p_max the extremes of P and delta = p_max - p_min, the annotation image A (OpenCV's mask codes) is

    GC_FGD     (1, sure foreground)      where P >= p_min + t_fg  * delta
    GC_PR_FGD  (3, probable foreground)  where P >= p_min + t_unk * delta, and not sure foreground
    GC_BGD     (0, sure background)      where P <= p_min + t_bg  * delta, and not foreground of either kind
    GC_PR_BGD  (2, probable background)  everywhere else

and GrabCut is run from A (cv2.GC_INIT_WITH_MASK). Defaults from sec. 4.1: t_fg=0.7, t_unk=0.5,
t_bg=0.15, five iterations.

Where the paper's cases overlap (its intervals are closed at both t_bg ends, and coincide when two
thresholds are equal), the foreground cases take precedence. So the zones' foreground (GC_FGD | GC_PR_FGD)
is exactly ``P >= p_min + t_unk * delta`` for every valid configuration, and the paths that skip GrabCut
(disabled, degenerate) return that same mask: switching GrabCut off degrades to the relative threshold.

Degenerate inputs, handled without calling OpenCV where it would throw:

* a flat P (delta <= FLAT_DELTA): the relative zones are undefined; the result is the absolute
  threshold ``P >= 0.5`` (all True or all False);
* GrabCut needs colour samples on both sides to fit its two colour models: when the (downscaled) zones
  have fewer than MIN_SAMPLES foreground-ish (GC_FGD | GC_PR_FGD) or background-ish (GC_BGD | GC_PR_BGD)
  pixels, the result is the zones' foreground.

Speed: GrabCut runs on the image downscaled so that its long side is at most `max_side` (cv2.INTER_AREA
for the image, nearest neighbour for the zones); its mask is upsampled back with nearest neighbour, and
the full-resolution sure labels are then enforced (a sure-foreground pixel is always in the mask, a
sure-background pixel never), as GrabCut itself does at the resolution it runs at.

OpenCV's random number generator (which seeds GrabCut's k-means) is reset with ``cv2.setRNGSeed(0)``
before each run, so results are deterministic. numpy and OpenCV only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["GrabCutConfig", "grabcut_zones", "grabcut_refine", "FLAT_DELTA", "MIN_SAMPLES"]

# A likelihood image whose range p_max - p_min is at most this is treated as flat.
FLAT_DELTA = 1e-6
# GrabCut fits a 5-component Gaussian mixture to each side's colours (k-means initialised); fewer
# samples than components on a side is rejected by some OpenCV versions and is meaningless anyway.
MIN_SAMPLES = 5
# Tolerance on prob's [0, 1] range (float rounding in whatever produced it).
_RANGE_TOL = 1e-6


@dataclass(frozen=True)
class GrabCutConfig:
    """Thresholds and iteration count of the GrabCut post-processing (Golub et al., sec. 3.2, 4.1).

    Attributes:
        t_fg: relative threshold of sure foreground, in [0, 1].
        t_unk: relative threshold between probable background and probable foreground, in [0, 1].
        t_bg: relative threshold of sure background, in [0, 1].
        iterations: GrabCut iterations, >= 1.
        enabled: False skips GrabCut; `grabcut_refine` then returns ``P >= p_min + t_unk * delta``.

    Raises:
        ValueError: unless 0 <= t_bg <= t_unk <= t_fg <= 1 and iterations >= 1 (an int).
    """

    t_fg: float = 0.7
    t_unk: float = 0.5
    t_bg: float = 0.15
    iterations: int = 5
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("t_fg", "t_unk", "t_bg"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"GrabCutConfig.{name} must be a number in [0, 1], got {value!r}")
            if not np.isfinite(value):
                raise ValueError(f"GrabCutConfig.{name} must be a number in [0, 1], got {value!r}")
        if not (0.0 <= self.t_bg <= self.t_unk <= self.t_fg <= 1.0):
            raise ValueError(
                "GrabCutConfig thresholds must satisfy 0 <= t_bg <= t_unk <= t_fg <= 1, got "
                f"t_bg={self.t_bg}, t_unk={self.t_unk}, t_fg={self.t_fg}"
            )
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, (int, np.integer)):
            raise ValueError(f"GrabCutConfig.iterations must be an int >= 1, got {self.iterations!r}")
        if self.iterations < 1:
            raise ValueError(f"GrabCutConfig.iterations must be >= 1, got {self.iterations}")


def _check_prob(prob) -> np.ndarray:
    """prob as a float64 HxW array with finite values in [0, 1] (clipped within _RANGE_TOL)."""
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ValueError(f"prob must be a 2-D HxW likelihood image, got shape {prob.shape}")
    if not np.issubdtype(prob.dtype, np.floating):
        raise TypeError(f"prob must be a floating-point likelihood image in [0, 1], got dtype {prob.dtype}")
    if prob.size == 0:
        raise ValueError(f"prob must not be empty, got shape {prob.shape}")
    prob = prob.astype(np.float64, copy=False)
    if not np.all(np.isfinite(prob)):
        raise ValueError("prob contains NaN or infinite values")
    lo, hi = float(prob.min()), float(prob.max())
    if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
        raise ValueError(f"prob must lie in [0, 1], got values in [{lo:.6g}, {hi:.6g}]")
    return np.clip(prob, 0.0, 1.0)


def _foreground(zones: np.ndarray) -> np.ndarray:
    return (zones == cv2.GC_FGD) | (zones == cv2.GC_PR_FGD)


def grabcut_zones(prob: np.ndarray, config: GrabCutConfig = GrabCutConfig()) -> np.ndarray:
    """GrabCut's annotation image A from a likelihood image, relative to the image's own range.

    Args:
        prob: float HxW likelihood image, values in [0, 1].
        config: the thresholds t_fg, t_unk, t_bg (`enabled` and `iterations` are not used here).

    Returns:
        uint8 HxW with OpenCV's codes: cv2.GC_FGD (1) where P >= p_min + t_fg*delta; cv2.GC_PR_FGD (3)
        where P >= p_min + t_unk*delta otherwise; cv2.GC_BGD (0) where P <= p_min + t_bg*delta
        otherwise; cv2.GC_PR_BGD (2) elsewhere (delta = p_max - p_min; foreground wins ties). For a flat
        prob (delta == 0) every pixel is >= p_min and the whole image is GC_FGD; `grabcut_refine`
        treats that case separately.

    Raises:
        ValueError: prob is not 2-D, is empty, is not finite or lies outside [0, 1].
        TypeError: prob is not floating-point.
    """
    prob = _check_prob(prob)
    return _zones(prob, config)


def _zones(prob: np.ndarray, config: GrabCutConfig) -> np.ndarray:
    p_min, p_max = float(prob.min()), float(prob.max())
    delta = p_max - p_min
    zones = np.full(prob.shape, cv2.GC_PR_BGD, dtype=np.uint8)
    # Assigned from the weakest precedence to the strongest: later assignments win ties.
    zones[prob <= p_min + config.t_bg * delta] = cv2.GC_BGD
    zones[prob >= p_min + config.t_unk * delta] = cv2.GC_PR_FGD
    zones[prob >= p_min + config.t_fg * delta] = cv2.GC_FGD
    return zones


def grabcut_refine(
    image: np.ndarray,
    prob: np.ndarray,
    config: GrabCutConfig = GrabCutConfig(),
    max_side: int = 512,
) -> np.ndarray:
    """The final binary mask: GrabCut on `image`, initialised from the zones of `prob`.

    Args:
        image: uint8 HxWx3 RGB image.
        prob: float HxW likelihood image in [0, 1], the same HxW as `image`.
        config: thresholds, iterations, and whether GrabCut runs at all.
        max_side: GrabCut runs on the image downscaled so that its long side is at most this many pixels
            (not upscaled when smaller); the mask is brought back to HxW with nearest neighbour.

    Returns:
        bool HxW mask. Without GrabCut (see the module docstring): ``prob >= 0.5`` when prob is flat;
        ``prob >= p_min + t_unk * delta`` (the zones' foreground) when `config.enabled` is False or the
        zones lack foreground-ish or background-ish samples.

    Raises:
        TypeError: image is not uint8, or prob is not floating-point.
        ValueError: image is not HxWx3, its HxW differs from prob's, prob is not a valid likelihood
            image, or max_side < 1.
    """
    prob = _check_prob(prob)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an HxWx3 RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8 RGB, got dtype {image.dtype}")
    if image.shape[:2] != prob.shape:
        raise ValueError(
            f"image is {image.shape[0]}x{image.shape[1]} but prob is {prob.shape[0]}x{prob.shape[1]}; they must match"
        )
    if isinstance(max_side, bool) or not isinstance(max_side, (int, np.integer)) or max_side < 1:
        raise ValueError(f"max_side must be an int >= 1, got {max_side!r}")

    delta = float(prob.max()) - float(prob.min())
    if delta <= FLAT_DELTA:
        logger.debug("grabcut_refine: flat likelihood image (delta=%.3g), thresholding at 0.5", delta)
        return prob >= 0.5

    zones = _zones(prob, config)
    if not config.enabled:
        return _foreground(zones)

    height, width = prob.shape
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 wants (w, h)
        small_image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        small_zones = cv2.resize(zones, size, interpolation=cv2.INTER_NEAREST)
    else:
        small_image, small_zones = image, zones

    n_fg = int(np.count_nonzero(_foreground(small_zones)))
    n_bg = small_zones.size - n_fg
    if n_fg < MIN_SAMPLES or n_bg < MIN_SAMPLES:
        logger.debug("grabcut_refine: %d foreground-ish, %d background-ish pixels; skipping GrabCut", n_fg, n_bg)
        return _foreground(zones)

    bgr = np.ascontiguousarray(small_image[:, :, ::-1])
    mask = np.ascontiguousarray(small_zones, dtype=np.uint8).copy()
    bgd_model = np.zeros((1, 65), np.float64)
    fgd_model = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    cv2.grabCut(bgr, mask, None, bgd_model, fgd_model, int(config.iterations), cv2.GC_INIT_WITH_MASK)

    if mask.shape != zones.shape:
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
    result = _foreground(mask)
    # The sure labels are hard constraints: keep them at full resolution too.
    result |= zones == cv2.GC_FGD
    result &= zones != cv2.GC_BGD
    return result
