"""Review and correction of a labelled dataset's pseudo-masks, one sample at a time: what ovseg-app's Review
tab calls. Every function takes the dataset's name and writes to the database at once (no unsaved state),
so closing the app loses nothing.

* `list_datasets`, `samples` (a saved view's order, "least-reliable" by default), `load` (the image and the
  sample's pseudo-masks as full-image bool masks);
* `set_verdict`: tag one pseudo-mask `approved` or `rejected` (the other verdict is removed);
* `save_correction`: replace a pseudo-mask's mask (or add a new one, method "manual") from a painted
  full-image mask, optionally under another word; it is tagged `corrected` and `approved`;
* `grabcut_from_strokes`: GrabCut on the image, started from a mask and the strokes that add to it or
  take from it (sure foreground and sure background).

Pseudo-masks are addressed by their index in the sample's `pseudo_masks` detections.
"""

from __future__ import annotations

import cv2
import numpy as np

from ovseg.core.errors import OvsegError

DEFAULT_VIEW = "least-reliable"
VERDICTS = ("approved", "rejected")
MANUAL_METHOD = "manual"
# GrabCut runs on the image downscaled to this long side (as ovseg.core.ops.grabcut does).
GRABCUT_MAX_SIDE = 512
GRABCUT_ITERATIONS = 5
# Pixels farther than this fraction of the image's long side from the mask and the foreground strokes are
# sure background, so that GrabCut refines the outline instead of growing over the whole image.
GRABCUT_MARGIN = 0.08


def list_datasets() -> list[str]:
    """The names of the FiftyOne datasets in the database, sorted."""
    from ovseg.app.curate.fo import fiftyone

    return sorted(fiftyone().list_datasets())


def _sample(name: str, sample_id: str):
    from ovseg.app.curate.fo import load_dataset

    ds = load_dataset(name)
    if not sample_id:
        raise OvsegError("pick a sample first")
    try:
        return ds[sample_id]
    except (KeyError, ValueError, TypeError) as exc:
        raise OvsegError(f"dataset {name!r} has no sample {sample_id!r}") from exc


def _detections(sample) -> list:
    from ovseg.app.curate.schema import LABEL_FIELD

    labels = sample[LABEL_FIELD] if sample.has_field(LABEL_FIELD) else None
    return list(labels.detections) if labels is not None else []


def _detection(sample, index) -> tuple[list, object]:
    dets = _detections(sample)
    if index is None or isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise OvsegError("pick a pseudo-mask first")
    if not 0 <= int(index) < len(dets):
        raise OvsegError(f"the sample has {len(dets)} pseudo-mask(s); there is no number {int(index) + 1}")
    return dets, dets[int(index)]


def _label_text(sample) -> str:
    rel = sample["reliability"] if sample.has_field("reliability") else None
    text = f"{sample['image_key']} · {sample['word']}"
    return text + (f" · reliability {rel:.2f}" if rel is not None else " · reliability –")


def samples(name: str, view: str | None = DEFAULT_VIEW) -> list[tuple[str, str]]:
    """[(sample id, "image_key · word · reliability 0.43")] in the order of the dataset's saved view `view`
    (least reliable first by default), then the samples that view leaves out (e.g. those without a
    reliability) in dataset order; the dataset's order when `view` is None or the dataset has no such view."""
    from ovseg.app.curate.fo import load_dataset

    ds = load_dataset(name)
    ordered = ds.load_saved_view(view) if view and ds.has_saved_view(view) else ds
    out, seen = [], set()
    for collection in (ordered, ds):
        for s in collection.select_fields(["image_key", "word", "reliability"]).iter_samples():
            if s.id not in seen:
                seen.add(s.id)
                out.append((s.id, _label_text(s)))
    return out


def load(name: str, sample_id: str) -> dict:
    """One sample for review: {"id", "image" (uint8 HxWx3 RGB), "word", "image_key", "filepath",
    "reliability", "masks": [{"index", "label", "method", "confidence", "reliability", "tags",
    "mask" (bool HxW)}]}, the masks in the sample's detection order."""
    from ovseg.core.image_io import load_image
    from ovseg.app.curate.schema import mask_from_detection

    s = _sample(name, sample_id)
    image = load_image(s.filepath)
    hw = image.shape[:2]
    masks = []
    for i, det in enumerate(_detections(s)):
        masks.append({"index": i, "label": det.label, "method": _get(det, "method"),
                      "confidence": det.confidence, "reliability": _get(det, "reliability"),
                      "tags": list(det.tags or []), "mask": mask_from_detection(det, hw)})
    return {"id": s.id, "image": image, "word": s["word"], "image_key": s["image_key"], "filepath": s.filepath,
            "reliability": s["reliability"] if s.has_field("reliability") else None, "masks": masks}


def _get(det, field: str):
    return det[field] if det.has_field(field) else None


def _with_verdict(tags, verdict: str, corrected: bool = False) -> list[str]:
    kept = [t for t in (tags or []) if t not in VERDICTS and (t != "corrected" or not corrected)]
    return kept + (["corrected"] if corrected else []) + [verdict]


def set_verdict(name: str, sample_id: str, index: int, verdict: str) -> list[str]:
    """Tag the sample's pseudo-mask `index` with `verdict` ("approved" or "rejected"), removing the other
    verdict; saved at once. Returns the detection's tags."""
    if verdict not in VERDICTS:
        raise OvsegError(f"a verdict is one of {', '.join(VERDICTS)}, got {verdict!r}")
    s = _sample(name, sample_id)
    _, det = _detection(s, index)
    det.tags = _with_verdict(det.tags, verdict)
    s.save()
    return list(det.tags)


def save_correction(name: str, sample_id: str, index: int | None, mask: np.ndarray, word: str | None = None) -> int:
    """Replace the mask (box and box-cropped mask) of the sample's pseudo-mask `index` with the full-image
    bool `mask`, or add a new pseudo-mask (method "manual", confidence 1) when `index` is None; its label
    becomes `word` when given (else it keeps its label; a new one takes the sample's word). The pseudo-mask
    is tagged `corrected` and `approved` (`rejected` is removed) and the sample saved at once. Returns the
    pseudo-mask's index.

    Raises:
        OvsegError: the mask is empty or not the image's size, the word is blank, the index is invalid.
    """
    from ovseg.app.curate.fo import fiftyone
    from ovseg.app.curate.schema import LABEL_FIELD, detection_from_mask

    fo = fiftyone()
    s = _sample(name, sample_id)
    mask = np.asarray(mask)
    hw = (s["image_height"], s["image_width"])
    if mask.ndim != 2 or mask.shape != hw:
        raise OvsegError(f"the mask is {'x'.join(map(str, mask.shape))} but the image is {hw[0]}x{hw[1]}")
    mask = mask.astype(bool)
    if not mask.any():
        raise OvsegError("the mask is empty: paint the object before saving (or reject the pseudo-mask)")
    if word is not None:
        word = " ".join(str(word).split())
        if not word:
            word = None
    if index is None:
        label = word or s["word"]
        new = detection_from_mask(fo, mask, label, 1.0, MANUAL_METHOD, None, present=True)
        new.tags = _with_verdict([], "approved", corrected=True)
        labels = s[LABEL_FIELD] if s.has_field(LABEL_FIELD) and s[LABEL_FIELD] is not None else fo.Detections()
        labels.detections.append(new)
        s[LABEL_FIELD] = labels
        s.save()
        return len(labels.detections) - 1
    _, det = _detection(s, index)
    fresh = detection_from_mask(fo, mask, word or det.label, det.confidence or 0.0, "x")
    det.bounding_box = fresh.bounding_box
    det.mask = fresh.mask
    det.label = word or det.label
    det.tags = _with_verdict(det.tags, "approved", corrected=True)
    s.save()
    return int(index)


def grabcut_from_strokes(image: np.ndarray, mask: np.ndarray | None, fg_strokes: np.ndarray | None = None,
                         bg_strokes: np.ndarray | None = None, iterations: int = GRABCUT_ITERATIONS,
                         max_side: int = GRABCUT_MAX_SIDE) -> np.ndarray:
    """GrabCut (cv2.GC_INIT_WITH_MASK) started from a mask and a person's strokes; returns a bool HxW mask.

    The annotation is: `fg_strokes` sure foreground, `bg_strokes` sure background (strokes win over the
    mask, background strokes over foreground ones), the mask probable foreground, the rest probable
    background within GRABCUT_MARGIN of the image's long side from the mask and the foreground strokes, and
    sure background beyond. As in `ovseg.core.ops.grabcut`, GrabCut runs on the image downscaled to `max_side`
    with OpenCV's random seed reset (deterministic), and the sure labels are enforced at full resolution.
    When either side has fewer than `ovseg.core.ops.grabcut.MIN_SAMPLES` pixels GrabCut cannot fit its colour
    models, and the annotation's foreground is returned as it is; so it is when GrabCut gives up every pixel
    (a small mask whose colours match its surroundings), so that a refinement never erases the work.

    Raises:
        OvsegError: the masks are not the image's size, or there is nothing to start from (no mask and no
            foreground stroke).
    """
    from ovseg.core.ops.grabcut import MIN_SAMPLES

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise OvsegError(f"GrabCut needs a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}")
    H, W = image.shape[:2]

    def as_mask(m, what):
        if m is None:
            return np.zeros((H, W), bool)
        m = np.asarray(m)
        if m.shape != (H, W):
            raise OvsegError(f"the {what} is {'x'.join(map(str, m.shape))} but the image is {H}x{W}")
        return m.astype(bool)

    mask, fg, bg = as_mask(mask, "mask"), as_mask(fg_strokes, "foreground strokes"), as_mask(bg_strokes,
                                                                                              "background strokes")
    start = (mask | fg) & ~bg
    if not start.any():
        raise OvsegError("nothing to refine: paint the object (or pick a pseudo-mask) first")
    radius = max(1, int(round(GRABCUT_MARGIN * max(H, W))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    near = cv2.dilate(start.astype(np.uint8), kernel).astype(bool)
    zones = np.full((H, W), cv2.GC_BGD, np.uint8)
    zones[near] = cv2.GC_PR_BGD
    zones[mask] = cv2.GC_PR_FGD
    zones[fg] = cv2.GC_FGD
    zones[bg] = cv2.GC_BGD

    scale = min(1.0, max_side / max(H, W))
    if scale < 1.0:
        size = (max(1, round(W * scale)), max(1, round(H * scale)))
        small_image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        small_zones = cv2.resize(zones, size, interpolation=cv2.INTER_NEAREST)
    else:
        small_image, small_zones = image, zones
    fg_like = (small_zones == cv2.GC_FGD) | (small_zones == cv2.GC_PR_FGD)
    n_fg = int(np.count_nonzero(fg_like))
    if n_fg < MIN_SAMPLES or small_zones.size - n_fg < MIN_SAMPLES:
        return start
    work = np.ascontiguousarray(small_zones).copy()
    bgd_model, fgd_model = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    cv2.grabCut(np.ascontiguousarray(small_image[:, :, ::-1]), work, None, bgd_model, fgd_model,
                int(iterations), cv2.GC_INIT_WITH_MASK)
    if work.shape != (H, W):
        work = cv2.resize(work, (W, H), interpolation=cv2.INTER_NEAREST)
    result = (work == cv2.GC_FGD) | (work == cv2.GC_PR_FGD)
    result |= fg & ~bg
    result &= ~bg
    return result if result.any() else start
