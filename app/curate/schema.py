"""How ovseg's results sit in a FiftyOne dataset (one sample per image and word), and back.

A sample is one (image, word) pair, so that every field has a fixed name whatever the vocabulary:

* `filepath`, `image_key` (the image's path relative to the source, or its COCO id), `coco_id` (COCO
  sources), `word`, `word_source` ("typed" or "caption"), `captions` (the image's captions), `ovseg_key`
  ("image_key|word", unique in the dataset);
* `pseudo_masks`: `fo.Detections`, one `Detection` per pseudo-mask: label = the word, relative box, the
  instance mask cropped to the box, `confidence` = the method's score, `reliability` (XPM's eq. 7; None for
  methods without one), `method` and `present` (the method's verdict on the word). XPM and `fused` give one per
  instance; the other methods one for their concept mask, when they judge the word present;
* heatmaps, one `fo.Heatmap` field per prior kind and method (`attention_cam`, `s_pos_cls_saliency`,
  `s_neg_cls_saliency`, `probability_xpm`, `noise_xpm`, ...), uint8 in [0, 255], at most HEATMAP_SIDE
  pixels on the long side (the App stretches them over the image);
* sort keys: `reliability` (the least reliability of the sample's pseudo-masks; unset when no method gives
  one), `score` (the best presence score), `agreement` (the least IoU between two methods' concept masks;
  unset with one method).
"""

from __future__ import annotations

import re

import numpy as np

from ovseg.core.types import ConceptResult, box_from_mask

HEATMAP_SIDE = 256
PRIOR_FIELD = {
    "attention": "attention",
    "attention_refined": "attention_refined",
    "saliency_positive": "s_pos",
    "saliency_negative": "s_neg",
    "caption": "caption_prior",
    "probability": "probability",
    "noise": "noise",
    "group": "group",
}
LABEL_FIELD = "pseudo_masks"
REVIEW_TAGS = ("approved", "rejected", "corrected")


def method_slug(spec: str) -> str:
    """A field-name-safe form of a method spec: "cls_saliency[grabcut=off]" -> "cls_saliency_grabcut_off"."""
    s = re.sub(r"[^0-9a-zA-Z]+", "_", spec).strip("_").lower()
    return s or "method"


def heatmap_field(kind: str, spec: str) -> str:
    return f"{PRIOR_FIELD.get(kind, kind)}_{method_slug(spec)}"


def sample_key(image_key: str, word: str) -> str:
    return f"{image_key}|{word}"


def heatmap_array(prior_map: np.ndarray, side: int = HEATMAP_SIDE) -> np.ndarray:
    """A [0, 1] float map -> uint8 [0, 255], area-downsampled so that its long side is at most `side`."""
    import cv2

    h, w = prior_map.shape
    scale = min(1.0, side / max(h, w))
    m = prior_map
    if scale < 1.0:
        m = cv2.resize(m, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return np.clip(np.rint(m * 255.0), 0, 255).astype(np.uint8)


def detection_from_mask(fo, mask: np.ndarray, word: str, score: float, method: str,
                        reliability: float | None = None, **attributes):
    """A FiftyOne Detection of a full-image bool mask (None when the mask is empty)."""
    box = box_from_mask(mask)
    if box is None:
        return None
    H, W = mask.shape
    x0, y0, x1, y1 = (int(v) for v in box)
    det = fo.Detection(label=word, bounding_box=[x0 / W, y0 / H, (x1 - x0) / W, (y1 - y0) / H],
                       mask=np.ascontiguousarray(mask[y0:y1, x0:x1]), confidence=float(score), method=method,
                       reliability=None if reliability is None else float(reliability), **attributes)
    return det


def mask_from_detection(det, image_hw: tuple[int, int]) -> np.ndarray:
    """The Detection's instance mask pasted at full image size (bool HxW), the inverse of
    `detection_from_mask` for the boxes it writes (pixel-aligned)."""
    import cv2

    H, W = image_hw
    out = np.zeros((H, W), bool)
    if det.mask is None:
        return out
    x, y, w, h = det.bounding_box
    x0, y0 = int(round(x * W)), int(round(y * H))
    x1, y1 = int(round((x + w) * W)), int(round((y + h) * H))
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
    if x1 <= x0 or y1 <= y0:
        return out
    m = np.asarray(det.mask).astype(bool)
    if m.shape != (y1 - y0, x1 - x0):  # a mask drawn at another resolution (the App's editor)
        m = cv2.resize(m.astype(np.uint8), (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST).astype(bool)
    out[y0:y1, x0:x1] = m
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def sample_fields(fo, results: list[tuple[str, ConceptResult]]) -> dict:
    """The fields of one (image, word) sample from each method's result on it: {spec: ConceptResult}."""
    dets, fields, reliabilities, masks = [], {}, [], []
    for spec, r in results:
        if r.pseudo_labels:
            for pl in r.pseudo_labels:
                d = detection_from_mask(fo, pl.mask, r.concept, pl.score, spec, pl.reliability, present=r.present)
                if d is not None:
                    dets.append(d)
                    if pl.reliability is not None:
                        reliabilities.append(pl.reliability)
        elif r.present:  # a word the method judges absent gets no label to review
            d = detection_from_mask(fo, r.mask, r.concept, r.score, spec, present=r.present)
            if d is not None:
                dets.append(d)
        masks.append(r.mask)
        for prior in r.priors:
            fields[heatmap_field(prior.kind, spec)] = fo.Heatmap(map=heatmap_array(prior.map), range=[0, 255])
    fields[LABEL_FIELD] = fo.Detections(detections=dets)
    fields["reliability"] = min(reliabilities) if reliabilities else None
    fields["score"] = max((r.score for _, r in results), default=0.0)
    if len(masks) >= 2:
        fields["agreement"] = min(mask_iou(a, b) for i, a in enumerate(masks) for b in masks[i + 1:])
    else:
        fields["agreement"] = None
    return fields
