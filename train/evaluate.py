"""`ovseg eval`: the fixed evaluation protocol of DESIGN.md on a COCO folder.

For every image and every scored class present in it, each method predicts a mask from the class name alone;
IoU with the union of that class's instance masks over all pixels (strict, the headline `concept_miou`: COCO
annotates every instance of its thing classes, so a pixel outside the class's masks is not the class; only the
class's crowd regions are ignored) and, beside it, over the annotated pixels only (`concept_miou_lenient`, the
older rule, which flatters big masks); mean over (image, class) pairs, target and base apart, and their harmonic
mean. Acceptance: the share of pairs with strict IoU >= 0.5 and >= 0.75. Presence AP: every image x every
scored class, AP over images per class, averaged. Speed: median ms of `set_image` and per concept, and the CLIPSeg architecture
(transformers' default config, random weights) timed in the same run as the reference.
"""

from __future__ import annotations

import datetime
import logging
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ovseg.core.methods.cap2seg.entailment import stripe_cosine, stripe_distribution
from ovseg.core.ops.boxes import box_region
from ovseg.core.ops.metrics import (auroc, average_precision, harmonic_mean, mask_iou, precision_recall_curve,
                                    soft_iou, spearman)
from ovseg.core.predictor import Predictor
from ovseg.train.coco import BASE_CLASSES, SCORED_CLASSES, TARGET_CLASSES, CocoConceptDataset, held_out_image_ids

# Golub et al.'s ablation (seed 002, Table 3 idea): each input variant of the segmenter with and without
# GrabCut, and the project's class-discriminative saliency option, beside the training-free reference.
ABLATION = ["cam"] + [
    f"cls_saliency[variant={variant},saliency=guided_backprop,grabcut={grabcut}]"
    for variant in ("sem0c", "sem1c", "sem2c_rand", "sem2c_neg") for grabcut in ("on", "off")
] + [f"cls_saliency[variant=sem2c_neg,saliency={s},grabcut={g}]" for s in ("cam_gated", "cam") for g in ("on", "off")]


# Priors scored as attention maps (pointing game, soft IoU): CAM's and Concept Mask's coarse and refined maps.
ATTENTION_KINDS = ("attention", "attention_refined")


log = logging.getLogger(__name__)

PIXELS_PER_LABEL = 2000  # noise-map pixels sampled per pseudo-label for the pixel AUROC


class _Scores:
    """Accumulates one method's per-pair IoUs and per-class presence scores."""

    def __init__(self):
        self.iou = defaultdict(list)  # class -> strict IoUs over the pairs where the class is present
        self.iou_held_out = defaultdict(list)  # the same, on the held-out images of the training split only
        self.iou_lenient = defaultdict(list)  # class -> IoUs over the annotated pixels only
        self.scores = defaultdict(list)  # class -> presence score per image
        self.labels = defaultdict(list)
        self.held_out = defaultdict(list)  # class -> whether each presence score's image was held out
        self.captioned = defaultdict(list)  # class -> whether each presence score's image had captions given
        self.ms_concept: list[float] = []
        self.seconds = 0.0
        self.pointing = defaultdict(lambda: defaultdict(list))  # prior kind -> class -> hit (0/1) per pair
        self.soft_iou = defaultdict(lambda: defaultdict(list))  # prior kind -> class -> eq. 5 per pair
        self.precision = defaultdict(list)
        self.recall = defaultdict(list)
        self.pseudo = []  # per pseudo-label with a reliability: {"reliability", "iou", "target"}
        self.noise_scores, self.noise_wrong = [], []  # sampled pixels of pseudo-labels' boxes: noise, is wrong
        self.correlations = defaultdict(list)  # "target"/"base" -> S+/S- correlation per pair (cls_saliency)
        self.stripe_cosines = defaultdict(list)  # "<details key>/<split>" -> cosine with eq. 4 per pair (cap2seg)

    def add_presence(self, scores: dict[str, float], targets, held_out: bool = False, captioned: bool = False) -> None:
        for c, s in scores.items():
            self.scores[c].append(s)
            self.labels[c].append(c in targets.gt)
            self.held_out[c].append(held_out)
            self.captioned[c].append(captioned)

    def add_mask(self, concept: str, mask: np.ndarray, targets, held_out: bool = False) -> None:
        gt = targets.gt[concept]
        not_crowd = ~targets.crowd[concept] if concept in targets.crowd else np.ones(gt.shape, bool)
        self.iou[concept].append(mask_iou(mask, gt, not_crowd))
        if held_out:
            self.iou_held_out[concept].append(self.iou[concept][-1])
        self.iou_lenient[concept].append(mask_iou(mask, gt, targets.valid_for(concept)))
        predicted, hit = mask & not_crowd, (mask & gt & not_crowd).sum()
        self.precision[concept].append(float(hit / predicted.sum()) if predicted.any() else 0.0)
        self.recall[concept].append(float(hit / (gt & not_crowd).sum()) if (gt & not_crowd).any() else 0.0)

    def add_pseudo_labels(self, concept: str, labels, instances: list[np.ndarray], targets, rng) -> None:
        """Whether reliability ranks pseudo-masks and noise maps point at their errors: each pseudo-label with a
        reliability gets its quality, the better of its IoU with the best-matching instance of the class and
        with the class's union (a mask of a crowd is not wrong); the pixels of its box (enlarged by a quarter)
        are wrong where the mask differs from that ground truth, and their noise values are sampled (at most
        PIXELS_PER_LABEL per label) for the pixel AUROC."""
        gt = targets.gt[concept]
        valid = ~targets.crowd[concept] if concept in targets.crowd else np.ones(gt.shape, bool)
        for pl in labels:
            if pl.reliability is None:
                continue
            candidates = [gt, *instances]
            ious = [mask_iou(pl.mask, g, valid) for g in candidates]
            best = int(np.argmax(ious))
            self.pseudo.append({"reliability": float(pl.reliability), "iou": float(ious[best]),
                                "target": concept in TARGET_CLASSES})
            if pl.noise_map is None or pl.box is None:
                continue
            sl = box_region(pl.box, gt.shape, 0.25)
            ok = valid[sl].ravel()
            wrong = (pl.mask[sl] != candidates[best][sl]).ravel()[ok]
            noise = pl.noise_map[sl].ravel()[ok]
            if len(noise) > PIXELS_PER_LABEL:
                pick = rng.choice(len(noise), PIXELS_PER_LABEL, replace=False)
                noise, wrong = noise[pick], wrong[pick]
            self.noise_scores.append(noise.astype(np.float32))
            self.noise_wrong.append(wrong)

    def explanations(self) -> dict:
        """The measures of issue 17 over what was collected (empty when the method gave none)."""
        out = {}
        if self.pseudo:
            rel = np.array([p["reliability"] for p in self.pseudo])
            iou = np.array([p["iou"] for p in self.pseudo])
            order = np.argsort(rel, kind="stable")
            q = max(1, len(order) // 4)
            out["pseudo_label_reliability"] = {
                "count": len(self.pseudo), "target_count": int(sum(p["target"] for p in self.pseudo)),
                "spearman_reliability_iou": spearman(rel, iou),
                "spearman_target": spearman(rel[[p["target"] for p in self.pseudo]],
                                            iou[[p["target"] for p in self.pseudo]]),
                "mean_iou_most_reliable_25pct": float(iou[order[-q:]].mean()),
                "mean_iou_least_reliable_25pct": float(iou[order[:q]].mean()),
                "mean_iou_all": float(iou.mean())}
        if self.noise_scores:
            scores, wrong = np.concatenate(self.noise_scores), np.concatenate(self.noise_wrong)
            out["noise_map_pixels"] = {"pixels": int(len(scores)), "wrong_fraction": float(wrong.mean()),
                                       "auroc_wrong": auroc(scores, wrong),
                                       "constant_map_fraction": float(np.mean([np.ptp(n) == 0
                                                                               for n in self.noise_scores]))}
        for key, values in sorted(self.stripe_cosines.items()):
            name, split = key.split("/")
            out.setdefault("caption_stripe_cosine", {}).setdefault(name, {})[split] = {
                "mean": float(np.mean(values)), "pairs": len(values)}
        for split, values in self.correlations.items():
            if values:
                out.setdefault("saliency_correlation", {})[split] = {"median": float(np.median(values)),
                                                                     "pairs": len(values)}
        return out

    def add_attention(self, concept: str, priors, targets) -> None:
        """Concept Mask's attention measures (sec. 5.2) of each attention prior: the pointing game (the map's
        maximum inside the class's mask) and the soft IoU of eq. 5 over the valid pixels."""
        gt, valid = targets.gt[concept], targets.valid_for(concept)
        for prior in priors:
            if prior.kind not in ATTENTION_KINDS:
                continue
            peak = np.unravel_index(int(np.argmax(prior.map)), prior.map.shape)
            self.pointing[prior.kind][concept].append(float(gt[peak]))
            self.soft_iou[prior.kind][concept].append(soft_iou(prior.map, gt, valid))


def _class_mean(per_pair: dict[str, list[float]]) -> dict[str, float]:
    """Mean over classes of each class's mean (the pointing game's "mean accuracy across the concepts")."""
    return _split_mean({c: [float(np.mean(v))] for c, v in per_pair.items() if v})


def _split_mean(per_pair: dict[str, list[float]]) -> dict[str, float]:
    target = [v for c in TARGET_CLASSES for v in per_pair.get(c, [])]
    base = [v for c in BASE_CLASSES for v in per_pair.get(c, [])]
    t = float(np.mean(target)) if target else float("nan")
    b = float(np.mean(base)) if base else float("nan")
    return {"target": t, "base": b, "h": harmonic_mean(t, b)}


def _acceptance(per_pair: dict[str, list[float]]) -> dict[str, float]:
    """DESIGN.md's acceptance: the share of (image, class) pairs whose strict IoU is at least 0.5 (a mask a
    person would keep) and at least 0.75 (one they would not touch), target and base."""
    out = {}
    for split, classes in (("target", TARGET_CLASSES), ("base", BASE_CLASSES)):
        ious = np.array([v for c in classes for v in per_pair.get(c, [])])
        for bar in (0.5, 0.75):
            out[f"{split}_{bar}"] = float((ious >= bar).mean()) if len(ious) else float("nan")
    return out


def _calibration(scores: _Scores, bins: int = 5) -> dict:
    """How well the presence scores of base classes on held-out images read as probabilities: per score bin,
    the pairs in it, their mean score and the share present (a reliability diagram), and the Brier score."""
    p, y = [], []
    for c in BASE_CLASSES:
        keep = np.asarray(scores.held_out[c], dtype=bool)
        p += np.asarray(scores.scores[c], dtype=float)[keep].tolist()
        y += np.asarray(scores.labels[c], dtype=float)[keep].tolist()
    if not p:
        return {}
    p, y = np.clip(np.array(p), 0.0, 1.0), np.array(y)
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        sel = (p >= lo) & ((p < hi) if k < bins - 1 else (p <= hi))
        if sel.any():
            rows.append({"bin": [round(float(lo), 2), round(float(hi), 2)], "pairs": int(sel.sum()),
                         "mean_score": round(float(p[sel].mean()), 4), "share_present": round(float(y[sel].mean()), 4)})
    return {"brier": round(float(np.mean((p - y) ** 2)), 4), "pairs": int(len(p)), "bins": rows}


def _instance_masks(dataset: CocoConceptDataset, image_id: int, name: str) -> list[np.ndarray]:
    """The class's instance masks in the image (crowd regions excluded), for scoring only."""
    return [dataset.coco.annToMask(a).astype(bool) for a in dataset.annotations(image_id)
            if dataset._cat_name[a["category_id"]] == name and not a.get("iscrowd", 0)]


def _presence(scores: _Scores, held_out_only: bool = False, captioned_only: bool = False) -> tuple[dict, dict, dict]:
    """Presence AP per class and its target/base means; `held_out_only`: over the images training held out;
    `captioned_only`: over the images that were given captions."""
    per_class_ap, curves = {}, {}
    for c in SCORED_CLASSES:
        s, y = np.asarray(scores.scores[c]), np.asarray(scores.labels[c], dtype=bool)
        keep = np.ones(len(s), bool)
        if held_out_only:
            keep &= np.asarray(scores.held_out[c], dtype=bool)
        if captioned_only:
            keep &= np.asarray(scores.captioned[c], dtype=bool)
        s, y = s[keep], y[keep]
        if len(s) == 0 or not y.any():
            continue
        per_class_ap[c] = average_precision(s, y)
        precision, recall, _ = precision_recall_curve(s, y)
        curves[c] = (precision, recall)
    t = [per_class_ap[c] for c in TARGET_CLASSES if c in per_class_ap]
    b = [per_class_ap[c] for c in BASE_CLASSES if c in per_class_ap]
    tm = float(np.mean(t)) if t else float("nan")
    bm = float(np.mean(b)) if b else float("nan")
    return {"target": tm, "base": bm, "h": harmonic_mean(tm, bm)}, per_class_ap, curves


def clipseg_reference(runs: int = 5) -> dict:
    """Median ms of one CLIPSeg forward (transformers' default config, random weights, 1 image + 1 prompt)."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    torch.manual_seed(0)
    config = CLIPSegConfig()
    model = CLIPSegForImageSegmentation(config).eval()
    size = config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size)
    ids = torch.randint(0, config.text_config.vocab_size, (1, 8))
    times = []
    with torch.no_grad():
        for i in range(runs + 1):
            t0 = time.perf_counter()
            model(input_ids=ids, pixel_values=pixels)
            if i:  # the first run warms up
                times.append((time.perf_counter() - t0) * 1000.0)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {
        "ms_per_forward": statistics.median(times),
        "params_millions": params,
        "note": f"CLIPSeg architecture, default config, random weights, {size}x{size} input, 1 prompt, "
        f"median of {runs} runs after one warm-up; each word needs its own forward",
    }


def evaluate(
    root,
    methods: list[str],
    limit: int | None = None,
    device: str = "cpu",
    predictor: Predictor | None = None,
    progress: bool = True,
    reference: bool = True,
    base_on_held_out: bool = False,
    held_out_only: bool = False,
    captions: bool = True,
) -> tuple[dict, dict]:
    """Run the protocol; returns (metrics, pr_curves) in the layout `ovseg.app.report.write_report` takes.

    methods: method specs ("cls_saliency[variant=sem1c,grabcut=off]"); specs share each image's cached
    work, so an ablation costs little more than its most expensive member. base_on_held_out: segment
    base classes only on the held-out images of the training split (target classes on every image, as no
    trained part has seen them); the default segments every pair and reports the held-out base figure
    beside the full one. held_out_only: only the held-out images (every figure is then a held-out one).
    captions: give every method each image's captions from captions.json (one per line), as a user of the
    caption box would; the caption methods (cap2seg) read them, the others ignore them."""
    import sys

    from PIL import Image as PILImage
    from tqdm import tqdm

    from ovseg.core.errors import OvsegError

    dataset = CocoConceptDataset(root)
    ids = dataset.image_ids
    if held_out_only:
        held = held_out_image_ids(dataset.image_ids)
        ids = [i for i in ids if i in held]
    ids = ids[:limit] if limit else ids
    predictor = predictor or Predictor(device=device)
    words = list(SCORED_CLASSES)
    acc = {m: _Scores() for m in methods}
    whole = _Scores()
    set_image_ms: list[float] = []
    pairs = {"target": 0, "base": 0}
    held_out = held_out_image_ids(dataset.image_ids)
    rng = np.random.default_rng(0)
    bar = tqdm(ids, desc="eval", unit="img", disable=not progress, dynamic_ncols=True)
    skipped: list[dict] = []  # images that could not be read or decoded: {"id", "file", "why"}, in order
    for image_id in bar:
        # an image that cannot be read (missing, corrupt, not matching its annotations) is skipped and named
        try:
            targets = dataset.concept_targets(image_id)
            rgb = dataset.load_rgb(image_id)  # the masks' pixel grid: no EXIF rotation
            if rgb.shape[:2] != targets.shape:
                raise ValueError(f"its pixels are {rgb.shape[:2]}, its annotations {targets.shape}")
            predictor.set_image(rgb)
        except (OSError, ValueError, OvsegError, PILImage.DecompressionBombError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            skipped.append({"id": int(image_id), "file": str(dataset.image_path(image_id)), "why": why})
            message = f"eval: skipped image {image_id} ({skipped[-1]['file']}): {why}"
            if progress:
                bar.write(message, file=sys.stderr)
            else:
                log.warning(message)
            continue
        is_held_out = image_id in held_out
        set_image_ms.append(predictor.last_set_image_ms)
        present = [c for c in words if c in targets.gt
                   and (c in TARGET_CLASSES or is_held_out or not base_on_held_out)]
        for c in present:
            pairs["target" if c in TARGET_CLASSES else "base"] += 1
        caption = "\n".join(dataset.captions(image_id)) if captions else None
        for m in methods:
            t0 = time.perf_counter()
            # every class: presence AP
            acc[m].add_presence(predictor.presence(words, m, caption=caption or None), targets, is_held_out,
                                bool(caption))
            elapsed = time.perf_counter() - t0
            if present:  # masks only where the class is there: concept mIoU
                t0 = time.perf_counter()
                prediction = predictor.predict(present, methods=[m], caption=caption or None)
                elapsed_masks = time.perf_counter() - t0
                acc[m].ms_concept.append(elapsed_masks * 1000.0 / len(present))
                elapsed += elapsed_masks
                for result in prediction.results:
                    acc[m].add_mask(result.concept, result.mask, targets, is_held_out)
                    acc[m].add_attention(result.concept, result.priors, targets)
                    if any(pl.reliability is not None for pl in result.pseudo_labels):
                        acc[m].add_pseudo_labels(result.concept, result.pseudo_labels,
                                                 _instance_masks(dataset, image_id, result.concept), targets, rng)
                    for key in ("stripes", "fused_stripes"):  # Cap2Seg's stripe priors against eq. 4
                        if result.details.get(key):
                            gt = targets.gt[result.concept]  # non-crowd instances
                            if gt.any():
                                split = "target" if result.concept in TARGET_CLASSES else "base"
                                acc[m].stripe_cosines[f"{key}/{split}"].append(
                                    stripe_cosine(result.details[key], stripe_distribution(gt, len(result.details[key]))))
                    if "saliency_correlation" in result.details:
                        split = "target" if result.concept in TARGET_CLASSES else "base"
                        acc[m].correlations[split].append(float(result.details["saliency_correlation"]))
            acc[m].seconds += elapsed + predictor.last_set_image_ms / 1000.0
        for c in present:  # the trivial reference: every pixel is the class (what the ignore rule forgives)
            whole.add_mask(c, np.ones(targets.shape, dtype=bool), targets, is_held_out)
    bar.close()
    if len(skipped) == len(ids):  # nothing scored: no figure to report
        why = (f"every one of its {len(ids)} image(s) failed to load (first: {skipped[0]['file']}: "
               f"{skipped[0]['why']})" if skipped else "it lists no image")
        raise OvsegError(f"no image could be scored in {root}: {why}")
    listed, skipped_ids = len(ids), {s["id"] for s in skipped}
    ids = [i for i in ids if i not in skipped_ids]  # every figure below is over the images scored

    out_methods, pr_curves = {}, {}
    for m, s in acc.items():
        presence, per_class_ap, curves = _presence(s)
        pr_curves[m] = curves
        out_methods[m] = {
            # XPM trains on pseudo-labels of the training images' caption nouns, target classes included:
            # its target-class masks on those images are partly memory, the held-out images tell.
            "concept_miou": {**_split_mean(s.iou), "base_held_out": _split_mean(s.iou_held_out)["base"],
                             "target_held_out": _split_mean(s.iou_held_out)["target"]},
            "concept_miou_lenient": _split_mean(s.iou_lenient),
            "acceptance": _acceptance(s.iou),
            "presence_ap": presence,
            # A trained method has seen the training images' tags (Concept Mask: base labels and caption nouns),
            # so its presence on them is partly memory: the held-out images tell.
            "presence_ap_held_out": _presence(s, held_out_only=True)[0],
            # with captions given: the images that have some (caption methods score the others from pixels)
            "presence_ap_captioned": _presence(s, captioned_only=True)[0] if captions else None,
            # is the presence score a probability? base classes of the held-out images
            "presence_calibration_held_out_base": _calibration(s),
            "ms_per_image": statistics.median(set_image_ms),
            "ms_per_concept": statistics.median(s.ms_concept) if s.ms_concept else float("nan"),
            "images_per_second": len(ids) / s.seconds if s.seconds else float("nan"),
            "per_class_iou": {c: float(np.mean(v)) for c, v in s.iou.items()},
            "per_class_ap": per_class_ap,
            "mask_precision": _split_mean(s.precision),
            "mask_recall": _split_mean(s.recall),
        }
        explanations = s.explanations()
        if explanations:
            out_methods[m]["explanations"] = explanations
        if s.pointing:
            out_methods[m]["attention"] = {kind: {"pointing_game": _class_mean(s.pointing[kind]),
                                                  "soft_iou": _split_mean(s.soft_iou[kind])}
                                           for kind in s.pointing}
    metrics = {
        "dataset": {"root": str(Path(root).resolve()), "images": len(ids), "pairs_target": pairs["target"],
                    "pairs_base": pairs["base"], "held_out_images": len(held_out.intersection(ids)),
                    "base_on_held_out_only": base_on_held_out, "images_listed": listed,
                    "captions_given": bool(captions),
                    "skipped_images": skipped},
        "methods": out_methods,
        "reference": {
            "whole_image_mask": {"concept_miou": {**_split_mean(whole.iou),
                                                  "base_held_out": _split_mean(whole.iou_held_out)["base"]},
                                 "concept_miou_lenient": _split_mean(whole.iou_lenient)},
        },
        "environment": {
            "device": str(predictor.device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
        },
    }
    if reference:
        metrics["reference"]["clipseg_architecture"] = clipseg_reference()
    return metrics, pr_curves
