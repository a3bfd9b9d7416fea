"""Images people look at: heatmap overlays, mask overlays, and the PNG files the CLI writes."""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter

import cv2
import numpy as np
from PIL import Image

from ovseg.core.cache import atomic_write_bytes

# Distinct mask colours (RGB), one per word in order.
PALETTE = np.array(
    [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
     (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)],
    dtype=np.uint8,
)


def colour(i: int) -> np.ndarray:
    return PALETTE[i % len(PALETTE)]


def heatmap(prior_map: np.ndarray) -> np.ndarray:
    """HxW float in [0, 1] -> HxWx3 uint8 RGB (turbo colour map)."""
    u8 = np.clip(prior_map * 255.0, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)


def heatmap_overlay(image: np.ndarray, prior_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] map's colours over an HWC uint8 RGB image."""
    return cv2.addWeighted(image, 1.0 - alpha, heatmap(prior_map), alpha, 0.0)


# Guided-backprop saliency is sparse (a few edge pixels near 1, most near 0): shown through a square root so
# that its structure is visible; the stretch is monotone and the caption says so.
STRETCHED_KINDS = {"saliency_positive": "√", "saliency_negative": "√"}


def prior_overlay(image: np.ndarray, prior_map: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
    """The overlay people see for a prior of `kind`, and a note for its caption ("" or "√ scale")."""
    if kind in STRETCHED_KINDS:
        return heatmap_overlay(image, np.sqrt(prior_map)), "√ scale"
    return heatmap_overlay(image, prior_map), ""


def mask_overlay(image: np.ndarray, mask: np.ndarray, rgb=(230, 25, 75), alpha: float = 0.45) -> np.ndarray:
    """Tint the mask's pixels and draw its outline; the rest of the image is dimmed slightly."""
    out = (image.astype(np.float32) * 0.8).astype(np.uint8)
    m = mask.astype(bool)
    if m.any():
        tint = np.array(rgb, dtype=np.float32)
        out[m] = (image[m].astype(np.float32) * (1 - alpha) + tint * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        thickness = max(1, round(max(mask.shape) / 300))
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in rgb), thickness)
    return out


# A pseudo-mask whose reliability is below this is marked noisy in the app (red outline, "noisy" caption).
NOISY_BELOW = 0.5


def reliability_colour(reliability: float | None) -> tuple[int, int, int]:
    """Outline colour of a pseudo-mask: green (reliable) through yellow to red (noisy); grey if unknown."""
    if reliability is None:
        return (200, 200, 200)
    r = float(np.clip(reliability, 0.0, 1.0))
    return (int(round(255 * min(1.0, 2 * (1 - r)))), int(round(255 * min(1.0, 2 * r))), 0)


def pseudo_label_overlay(image: np.ndarray, label) -> np.ndarray:
    """One pseudo-label: its noise map as a heatmap inside its mask (the image elsewhere, dimmed), and the
    mask's outline in its reliability colour."""
    out = (image.astype(np.float32) * 0.6).astype(np.uint8)
    m = label.mask.astype(bool)
    if label.noise_map is not None:
        heat = heatmap_overlay(image, label.noise_map, alpha=0.6)
        out[m] = heat[m]
    else:
        out[m] = image[m]
    rgb = reliability_colour(label.reliability)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, rgb, max(2, round(max(m.shape) / 200)))
    return out


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def save_png(path, array: np.ndarray):
    """Write an HxW (bool or uint8) or HxWx3 uint8 array as PNG, atomically. Bool masks become 0/255."""
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    return atomic_write_bytes(path, png_bytes(array))


def slug(text: str) -> str:
    """A file-name-safe form of a word: 'teddy bear' -> 'teddy_bear'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "word"


def file_stems(texts) -> dict[str, str]:
    """A distinct, readable file-name stem per text (word or method spec), whatever their order: its
    letters and digits in any script, lower-cased, joined by '_' ('собака' -> 'собака',
    'teddy bear' -> 'teddy_bear', 'cam[threshold=0.9]' -> 'cam_threshold_0_9'); where two texts share that
    stem ('hot-dog', 'hot dog'), or it is empty ('???'), each gets a short hash of the text itself after it
    ('hot_dog-5f1c2a'). Texts are taken once each."""
    texts = list(dict.fromkeys(texts))
    plain = {t: re.sub(r"[\W_]+", "_", t.lower()).strip("_")[:60] for t in texts}
    shared = Counter(plain.values())
    stems = {}
    for t in texts:
        stem = plain[t]
        if not stem or shared[stem] > 1:
            stem = f"{stem or 'word'}-{hashlib.sha1(t.encode('utf-8')).hexdigest()[:6]}"
        stems[t] = stem
    if len(set(stems.values())) < len(stems):  # a hashed stem equal to another text's plain one: number them
        stems = {t: f"{s}-{i}" for i, (t, s) in enumerate(stems.items())}
    return stems
