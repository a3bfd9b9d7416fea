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


def sparse_saliency(details: dict) -> bool:
    """Whether a result's saliency priors are sparse guided-backprop maps (shown through a √), not
    cls_saliency's dense CAM priors (shown as they are)."""
    return details.get("saliency", "guided_backprop") != "cam"


def prior_overlay(image: np.ndarray, prior_map: np.ndarray, kind: str, stretch: bool = True) -> tuple[np.ndarray, str]:
    """The overlay people see for a prior of `kind`, and a note for its caption ("" or "√ scale"). stretch:
    False for a dense map of a stretched kind (cls_saliency's CAM priors)."""
    if kind in STRETCHED_KINDS and stretch:
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


def _text(out: np.ndarray, text: str, org: tuple[int, int], scale: float, rgb=(255, 255, 255)) -> None:
    """Text with a dark outline, readable on any background."""
    thick = max(1, round(scale * 2))
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, tuple(int(c) for c in rgb), thick, cv2.LINE_AA)


def _font_scale(width: int) -> float:
    return max(0.4, width / 1000.0)


def with_colour_scale(image: np.ndarray, low: str = "0", high: str = "1", title: str = "") -> np.ndarray:
    """The image with a strip below it: the heat colours from 0 to 1 and what their ends mean."""
    h, w = image.shape[:2]
    bar_h = max(14, h // 24)
    scale = _font_scale(w)
    text_h = int(30 * scale) + 8
    strip = np.full((bar_h + text_h, w, 3), 32, np.uint8)
    margin = max(4, w // 40)
    ramp = np.linspace(0.0, 1.0, max(1, w - 2 * margin))[None, :].repeat(bar_h - 4, axis=0)
    strip[2:bar_h - 2, margin:margin + ramp.shape[1]] = heatmap(ramp)
    base = bar_h + text_h - 6
    _text(strip, low, (margin, base), scale)
    (tw, _), _ = cv2.getTextSize(high, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, round(scale * 2)))
    _text(strip, high, (w - margin - tw, base), scale)
    if title:
        (tw, _), _ = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, round(scale * 2)))
        _text(strip, title, ((w - tw) // 2, base), scale)
    return np.concatenate([image, strip], axis=0)


def pseudo_label_overlay(image: np.ndarray, label, colour_scale: bool = True) -> np.ndarray:
    """One pseudo-label: its noise map as a heatmap over its box (inside the mask at full strength, around it
    fainter; the image elsewhere, dimmed), the mask's outline in its reliability colour, its reliability
    written at the box's corner, and (colour_scale) the noise colour scale in a strip below the image."""
    out = (image.astype(np.float32) * 0.6).astype(np.uint8)
    m = label.mask.astype(bool)
    if label.noise_map is not None:
        heat = heatmap_overlay(image, label.noise_map, alpha=0.6)
        near = (label.noise_map > 0) & ~m  # disagreement around the mask: pixels the other views claim
        out[near] = ((heat[near].astype(np.float32) + out[near]) / 2).astype(np.uint8)
        out[m] = heat[m]
    else:
        out[m] = image[m]
    rgb = reliability_colour(label.reliability)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, rgb, max(2, round(max(m.shape) / 200)))
    if label.reliability is not None and label.box is not None:
        x0, y0 = int(label.box[0]), int(label.box[1])
        scale = _font_scale(out.shape[1])
        text = f"reliability {label.reliability:.2f}"
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, round(scale * 2)))
        x = max(2, min(x0 + 2, out.shape[1] - tw - 4))  # inside the image, at the box's corner where it fits
        _text(out, text, (x, max(th + 4, y0 - 6)), scale, rgb)
    if label.noise_map is not None and colour_scale:
        return with_colour_scale(out, "agree", "disagree", "noise")
    return out


def side_by_side(left: np.ndarray, right: np.ndarray, left_title: str, right_title: str,
                 footer: str = "") -> np.ndarray:
    """Two equally sized images next to each other, each titled, with an optional line below."""
    scale = _font_scale(left.shape[1])
    gap = np.full((left.shape[0], max(4, left.shape[1] // 80), 3), 255, np.uint8)
    a, b = left.copy(), right.copy()
    _text(a, left_title, (8, int(32 * scale) + 4), scale * 1.2)
    _text(b, right_title, (8, int(32 * scale) + 4), scale * 1.2)
    out = np.concatenate([a, gap, b], axis=1)
    if footer:
        strip = np.full((int(40 * scale) + 12, out.shape[1], 3), 32, np.uint8)
        _text(strip, footer, (8, strip.shape[0] - 10), scale * 1.2)
        out = np.concatenate([out, strip], axis=0)
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

def with_stripe_bars(image: np.ndarray, stripes, title: str = "caption says") -> np.ndarray:
    """The image with a panel on its right: one bar per horizontal stripe (top first), as long as the share of
    the word's pixels the caption puts there (Cap2Seg's stripe distribution), with its value."""
    h, w = image.shape[:2]
    k = len(stripes)
    panel_w = max(120, w // 3)
    panel = np.full((h, panel_w, 3), 32, np.uint8)
    scale = _font_scale(w)
    edges = np.linspace(0, h, k + 1).round().astype(int)
    top = float(max(stripes)) if len(stripes) else 1.0
    for j, v in enumerate(stripes):
        y0, y1 = edges[j], edges[j + 1]
        length = int((panel_w - 16) * float(v) / max(top, 1e-6))
        colour_ = heatmap(np.array([[float(v) / max(top, 1e-6)]]))[0, 0]
        cv2.rectangle(panel, (8, y0 + 3), (8 + length, y1 - 3), tuple(int(c) for c in colour_), -1)
        cv2.line(panel, (0, y1 - 1), (panel_w, y1 - 1), (90, 90, 90), 1)
        _text(panel, f"{float(v):.2f}", (12, (y0 + y1) // 2 + int(10 * scale)), scale)
    _text(panel, title, (8, int(28 * scale) + 2), scale * 0.9)
    return np.concatenate([image, panel], axis=1)


def group_overlay(image: np.ndarray, assignment, legend) -> np.ndarray:
    """OVSegmentor's group view: every pixel tinted by the group its patch is bound to (the assignment map, any
    size, upsampled by nearest neighbour), group outlines, and a legend panel on the right: one row per group
    with its colour, its share of the image and the words it matches best."""
    h, w = image.shape[:2]
    groups = np.asarray(assignment, dtype=np.int32)
    up = cv2.resize(groups.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int32)
    out = image.astype(np.float32) * 0.45
    for k in np.unique(up):
        m = up == k
        out[m] += 0.55 * colour(int(k)).astype(np.float32)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    out = out.clip(0, 255).astype(np.uint8)
    panel_w = max(180, w // 2)
    panel = np.full((h, panel_w, 3), 32, np.uint8)
    scale = _font_scale(w) * 0.85
    row = max(14, int(26 * scale))
    _text(panel, "groups: best words", (8, row), scale)
    for i, (k, share, words) in enumerate(legend):
        y = row * (i + 2)
        if y > h - 4:
            break
        cv2.rectangle(panel, (8, y - row + 6), (8 + row - 6, y), tuple(int(c) for c in colour(int(k))), -1)
        _text(panel, f"{int(round(100 * share))}% {', '.join(words)}", (8 + row, y - 2), scale)
    return np.concatenate([out, panel], axis=1)
