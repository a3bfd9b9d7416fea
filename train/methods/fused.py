"""`ovseg train fused`: the combiner of the default method (`ovseg.core.methods.fused`).

1. Evidence: on the images every trained head held out (the default split's held-out images: no head has
   seen them), each base class's evidence maps on the working grid and its word-level scores. Only base-class
   masks are decoded (`training_mask`, after `assert_no_target_annotations`); presence labels are the base
   classes present.
2. Cross-fitting: the images are cut into folds; for each fold the experts (pixel and presence, "any word"
   and "known word") are fitted on the other folds and their mask thresholds chosen there by strict IoU; each
   fold's model then scores its own images. Those cross-fitted scores are the held-out figures in
   training.json (mask IoU per expert, presence AP, a reliability diagram of the presence probability).
3. The shipped combiner.json holds each fold's model (used on the images of that fold) and one fitted on
   every image (used on all other images).

The caption experts (`combiner.py`) are fitted on the held-out images that have captions in captions.json
(with Cap2Seg's caption priors of the checkpoint in use); training.json compares every expert on those images
("cross_fitted_captioned"), so the caption priors' worth is measured on the same pairs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.core.cache import atomic_write_bytes, atomic_write_json, replaced_folder
from ovseg.core.methods.base import ImageState
from ovseg.core.image_io import pixel_key as image_key
from ovseg.core.methods.fused.combiner import (GROUP_FEATURES, PIXEL_EXPERTS, PRESENCE_EXPERTS, Combiner, Logistic,
                                               needs_captions, pixel_features, save, word_features)
from ovseg.core.methods.fused.evidence import Evidence
from ovseg.core.models import Models
from ovseg.core.ops.metrics import average_precision, best_f1_threshold
from ovseg.train.coco import (BASE_CLASSES, HOLDOUT_FRACTION, SPLIT_SEED, CocoConceptDataset,
                              assert_no_target_annotations, split_image_ids, training_mask)
from ovseg.train.registry import register_trainer

log = logging.getLogger(__name__)

THRESHOLDS = tuple(np.round(np.arange(0.1, 0.91, 0.05), 2))


@dataclass
class TrainConfig:
    coco_dir: str
    out: str
    long_side: int = 448  # the Predictor's input size
    folds: int = 2
    pixel_fraction: float = 0.5  # share of each pair's grid pixels the pixel experts are fitted on
    l2: float = 1e-3
    holdout_fraction: float = HOLDOUT_FRACTION
    seed: int = SPLIT_SEED
    max_images: int | None = None
    evidence_file: str | None = None  # save the collected evidence here, or reuse it when it matches the images
    captions: bool = True  # fit the caption experts on the images with captions (Cap2Seg's priors)
    # also fit pixel experts that read the stripe and local priors (off: measured no better, README "fused")
    caption_pixels: bool = False
    # OVSegmentor's group evidence in the pixel experts: measured no better with the lr 2e-4 OVSegmentor
    # (cross-fitted any-word grid mIoU 0.2006 with, 0.2012 without), so off by default (`--groups` to fit it)
    groups: bool = False


# ------------------------------------------------------------------------------------------------ evidence

def grid_target(mask: np.ndarray, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A training_mask (1 object, 255 crowd, 0 elsewhere) on the working grid: (target, counted) float/bool."""
    obj = torch.from_numpy((mask == 1).astype(np.float32))[None, None]
    crowd = torch.from_numpy((mask == 255).astype(np.float32))[None, None]
    target = F.interpolate(obj, size=grid, mode="area")[0, 0] >= 0.5
    counted = F.interpolate(crowd, size=grid, mode="area")[0, 0] < 0.5
    return target.float(), counted


def collect(cfg: TrainConfig, models: Models, evidence: Evidence, dataset, ids: list[int], progress: bool) -> list[dict]:
    """Per image: its key, whether it has captions, and per base class its word scores, its presence label and
    (present classes) its evidence maps with the grid target; with the caption priors where it has captions."""
    from tqdm import tqdm

    images = []
    for image_id in tqdm(ids, desc="fused: evidence", unit="img", disable=not progress):
        rgb = dataset.load_rgb(image_id)
        state = ImageState.compute(models, rgb, cfg.long_side)
        present = [n for n in dataset.classes_present(image_id) if n in BASE_CLASSES]
        assert_no_target_annotations(present)
        captions = dataset.captions(image_id) if cfg.captions else []
        if captions:  # one pass of the entailment model for every base class
            evidence.cap2seg.caption_priors_many(state, captions, BASE_CLASSES)
        entry = {"id": image_id, "key": image_key(rgb), "captioned": bool(captions), "words": []}
        for name in BASE_CLASSES:
            ev = evidence.word(state, name, captions)
            row = {"name": name, "scores": dict(ev.scores), "present": name in present}
            if name in present:
                target, counted = grid_target(training_mask(dataset, image_id, name), ev.maps["cam"].shape)
                row.update(maps={k: v.clone() for k, v in ev.maps.items()}, target=target, counted=counted)
            entry["words"].append(row)
        state.cache.clear()
        images.append(entry)
    return images


def load_or_collect(cfg: TrainConfig, models, evidence, dataset, ids: list[int], progress: bool) -> list[dict]:
    """`collect`, or the evidence saved in `cfg.evidence_file` by an earlier run on the same images (for trying
    combiner forms without recomputing the evidence; delete the file after changing a checkpoint or the
    evidence code)."""
    path = Path(cfg.evidence_file) if cfg.evidence_file else None
    if path is not None and path.is_file():
        images = torch.load(path, weights_only=False)
        needed = maps_read(cfg)
        if [img["id"] for img in images] == list(ids) and all(
                "captioned" in img and all(needed <= set(w["maps"]) for w in img["words"] if "maps" in w)
                for img in images):
            log.info("reusing the evidence in %s", path)
            return images
        log.warning("%s holds other images (or older evidence, without caption priors or maps the experts read): "
                    "collecting again", path)
    images = collect(cfg, models, evidence, dataset, ids, progress)
    if path is not None:
        import io

        buf = io.BytesIO()
        torch.save(images, buf)
        atomic_write_bytes(path, buf.getvalue())
    return images


# ---------------------------------------------------------------------------------------------- fitting

def pixel_rows(images: list[dict], names, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for img in images:
        for w in img["words"]:
            if "maps" not in w:
                continue
            x = pixel_features(w["maps"], names)
            y = w["target"].reshape(-1)
            keep = w["counted"].reshape(-1) & (torch.rand(len(y), generator=gen) < fraction)
            xs.append(x[keep])
            ys.append(y[keep])
    return torch.cat(xs), torch.cat(ys)


def presence_rows(images: list[dict], names) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([word_features(w["scores"], names) for img in images for w in img["words"]])
    y = torch.tensor([float(w["present"]) for img in images for w in img["words"]])
    return x, y


def pair_ious(model: Logistic, images: list[dict], thresholds) -> np.ndarray:
    """(pairs, thresholds) strict IoU on the grid of each present pair's mask at each (relative) threshold."""
    rows = []
    for img in images:
        for w in img["words"]:
            if "maps" not in w:
                continue
            p = model(pixel_features(w["maps"], model.names))
            p = p / p.max().clamp_min(1e-6)  # thresholds are relative to the word's peak (`relative_mask`)
            y = w["target"].reshape(-1) > 0.5
            c = w["counted"].reshape(-1)
            row = []
            for t in thresholds:
                m = (p >= t) & c
                inter, union = float((m & y).sum()), float((m | (y & c)).sum())
                row.append(inter / union if union else 1.0)
            rows.append(row)
    return np.array(rows)


def pixel_names(expert: str, cfg: TrainConfig) -> tuple[str, ...]:
    """A pixel expert's features; without OVSegmentor's group evidence when `cfg.groups` is off."""
    names = PIXEL_EXPERTS[expert]
    return names if cfg.groups else tuple(n for n in names if n not in GROUP_FEATURES)


def maps_read(cfg: TrainConfig) -> set[str]:
    """The evidence maps the caption-free pixel experts read ("rel:cam*objectness" reads cam and objectness)."""
    return {part.removeprefix("rel:") for e in PIXEL_EXPERTS if not needs_captions(e)
            for name in pixel_names(e, cfg) for part in name.split("*")}


def usable(images: list[dict], expert: str) -> list[dict]:
    """The images an expert reads: the captioned ones for a caption expert, else all."""
    return [img for img in images if img["captioned"]] if needs_captions(expert) else images


def fit_combiner(images: list[dict], cfg: TrainConfig) -> Combiner:
    """The pixel experts (thresholds chosen by mean strict IoU on these images) and the presence experts; the
    caption experts on the captioned images (none when there are none)."""
    pixel, thresholds = {}, {}
    experts = [e for e in PIXEL_EXPERTS if usable(images, e)]
    for expert in [e for e in experts if cfg.caption_pixels or not needs_captions(e)]:
        names, images_e = pixel_names(expert, cfg), usable(images, expert)
        x, y = pixel_rows(images_e, names, cfg.pixel_fraction, cfg.seed)
        pixel[expert] = Logistic.fit(names, x, y, cfg.l2)
        ious = pair_ious(pixel[expert], images_e, THRESHOLDS).mean(0)
        thresholds[expert] = float(THRESHOLDS[int(np.argmax(ious))])
    presence, present_at = {}, {}
    for expert in experts:
        names = PRESENCE_EXPERTS[expert]
        x, y = presence_rows(usable(images, expert), names)
        presence[expert] = Logistic.fit(names, x, y, cfg.l2)
        present_at[expert] = best_f1_threshold(presence[expert](x).numpy(), y.numpy() > 0.5, decimals=3)[0]
    return Combiner(pixel, presence, thresholds, present_at)


def folds_of(images: list[dict], k: int, seed: int) -> list[list[dict]]:
    order = np.random.default_rng(seed).permutation(len(images))
    return [[images[i] for i in order[f::k]] for f in range(k)]


# ------------------------------------------------------------------------------------- cross-fitted figures

def reliability_diagram(p: np.ndarray, y: np.ndarray, bins: int = 10, weight=None) -> list[dict]:
    """Per probability bin: the rows in it, their mean predicted probability and the (weighted) share present."""
    weight = np.ones(len(p)) if weight is None else np.asarray(weight, float)
    edges = np.linspace(0, 1, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        if sel.any():
            out.append({"bin": [round(float(lo), 2), round(float(hi), 2)], "count": int(sel.sum()),
                        "mean_probability": round(float(np.average(p[sel], weights=weight[sel])), 4),
                        "observed_frequency": round(float(np.average(y[sel], weights=weight[sel])), 4)})
    return out


def cross_fitted_figures(folds: list[list[dict]], models: list[Combiner], experts) -> dict:
    """Each fold scored by the model fitted without it: strict grid mIoU of each pixel expert at its chosen
    threshold, presence AP (mean over base classes) and calibration of each presence expert, at the base rate
    and the F1 of the present verdict at the threshold each fold chose. Every expert is scored on the same
    images (give captioned folds to compare the caption experts with the others)."""
    experts = list(experts)
    ious = {e: [] for e in experts}
    presence = {e: ([], [], []) for e in experts}  # probability, label, the fold's present threshold
    names = []
    for images, combiner in zip(folds, models):
        for expert in experts:
            if expert in combiner.pixel:
                model = combiner.pixel[expert]
                ious[expert] += pair_ious(model, images, [combiner.thresholds[expert]])[:, 0].tolist()
            model = combiner.presence[expert]
            x, y = presence_rows(images, model.names)
            presence[expert][0].extend(model(x).tolist())
            presence[expert][1].extend(y.tolist())
            presence[expert][2].extend([combiner.present_at[expert]] * len(y))
        names += [w["name"] for img in images for w in img["words"]]
    names = np.array(names)
    ious = {e: v for e, v in ious.items() if v}
    out = {"images": sum(len(f) for f in folds), "pairs": len(ious[experts[0]]),
           "grid_miou": {e: round(float(np.mean(v)), 4) for e, v in ious.items()},
           "share_iou_0.5": {e: round(float(np.mean(np.array(v) >= 0.5)), 4) for e, v in ious.items()},
           "presence": {}}
    for expert, (p, y, at) in presence.items():
        p, y = np.array(p), np.array(y, dtype=bool)
        aps = [average_precision(p[names == c], y[names == c]) for c in BASE_CLASSES if y[names == c].any()]
        out["presence"][expert] = {
            "ap_mean_over_classes": round(float(np.mean(aps)), 4),
            "brier": round(float(np.mean((p - y) ** 2)), 4), "reliability": reliability_diagram(p, y),
            "f1_present": round(2 * float(((p >= np.array(at)) & y).sum())
                                / max(int((p >= np.array(at)).sum() + y.sum()), 1), 4)}
    out["presence_base_rate"] = round(float(np.mean(presence[experts[0]][1])), 4)
    return out


def plot_reliability(figures: dict) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    for expert, p in figures["presence"].items():
        r = p["reliability"]
        ax.plot([b["mean_probability"] for b in r], [b["observed_frequency"] for b in r], marker="o",
                label=f"{expert.replace('_', ' ')} expert (Brier {p['brier']:.3f})")
    ax.set_xlabel("predicted presence probability")
    ax.set_ylabel("observed frequency (held-out base classes)")
    ax.set_title("fused presence, cross-fitted")
    ax.legend(loc="upper left", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------- run

def train(cfg: TrainConfig, progress: bool = True) -> Path:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    dataset = CocoConceptDataset(cfg.coco_dir)
    _, held_ids = split_image_ids(dataset.image_ids, cfg.holdout_fraction, cfg.seed)
    held_ids = held_ids[: cfg.max_images] if cfg.max_images else held_ids
    if len(held_ids) < 2 * cfg.folds:
        raise ValueError(f"{len(held_ids)} held-out images are too few for {cfg.folds} folds")
    models = Models("cpu")
    evidence = Evidence(models, list(BASE_CLASSES))

    images = load_or_collect(cfg, models, evidence, dataset, held_ids, progress)
    t_evidence = time.perf_counter() - t_start
    folds = folds_of(images, cfg.folds, cfg.seed)
    fold_models = [fit_combiner([img for g, f in enumerate(folds) if g != k for img in f], cfg)
                   for k in range(cfg.folds)]
    plain = [e for e in PIXEL_EXPERTS if not needs_captions(e)]
    figures = cross_fitted_figures(folds, fold_models, plain)
    captioned = [[img for img in f if img["captioned"]] for f in folds]
    figures_captioned = None
    if all(captioned) and all(m.reads_captions for m in fold_models):
        figures_captioned = cross_fitted_figures(captioned, fold_models, PIXEL_EXPERTS)
    all_model = fit_combiner(images, cfg)

    summary = {
        "data": {"coco_dir": str(Path(cfg.coco_dir).resolve()), "images": len(images),
                 "held_out_ids_sha1": hashlib.sha1(json.dumps(sorted(held_ids)).encode()).hexdigest(),
                 "captioned_images": sum(img["captioned"] for img in images),
                 "present_pairs": sum("maps" in w for img in images for w in img["words"]),
                 "presence_rows": sum(len(img["words"]) for img in images),
                 "classes": "base classes only (DESIGN.md split): their masks and presence; no target class is read",
                 "images_are": "the default split's held-out images: no trained head has seen them"},
        "thresholds_all": all_model.thresholds, "present_at_all": all_model.present_at,
        "cross_fitted": figures,
        # every expert on the held-out images with captions: with and without the caption priors
        "cross_fitted_captioned": figures_captioned,
        "weights_all": {"pixel": {k: dict(zip(m.names, np.round(m.weights, 3).tolist())) for k, m in
                                  all_model.pixel.items()},
                        "presence": {k: dict(zip(m.names, np.round(m.weights, 3).tolist())) for k, m in
                                     all_model.presence.items()}},
        "seconds": {"evidence": round(t_evidence, 1), "total": round(time.perf_counter() - t_start, 1)},
        "torch": torch.__version__,
    }
    out = Path(cfg.out)
    with replaced_folder(out) as tmp:
        save(tmp, all_model, [([img["key"] for img in f], m) for f, m in zip(folds, fold_models)],
             list(BASE_CLASSES), {"train": asdict(cfg)})
        atomic_write_json(tmp / "config.json", {"train": asdict(cfg),
                                                "pixel_experts": {e: m.names for e, m in all_model.pixel.items()},
                                                "presence_experts": PRESENCE_EXPERTS})
        atomic_write_json(tmp / "training.json", summary)
        atomic_write_bytes(tmp / "reliability.png", plot_reliability(figures))
    log.info("saved %s", out)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coco", default="../shared/data/coco_dev", help="COCO folder (images/, instances.json)")
    p.add_argument("--out", default="assets/checkpoints/fused", help="model folder (replaced when done)")
    p.add_argument("--folds", type=int, default=TrainConfig.folds, help="cross-fitting folds (default 2)")
    p.add_argument("--max-images", type=int, default=None, help="only the first N held-out images (quick runs)")
    p.add_argument("--no-captions", action="store_true",
                   help="fit no caption experts (the combiner then ignores captions)")
    p.add_argument("--caption-pixels", action="store_true",
                   help="also fit pixel experts on the caption stripe and local priors (measured no better)")
    p.add_argument("--groups", action="store_true",
                   help="also fit the pixel experts on OVSegmentor's group evidence (measured no better: off by default)")
    p.add_argument("--evidence-file", default=None,
                   help="save the collected evidence to this file, or reuse it if it holds the same images")


def run(args) -> Path:
    return train(TrainConfig(coco_dir=args.coco, out=args.out, folds=args.folds, max_images=args.max_images,
                             evidence_file=args.evidence_file, captions=not args.no_captions,
                             caption_pixels=args.caption_pixels, groups=args.groups))


register_trainer("fused", "the default method's cross-fitted combiner (base classes of held-out images)",
                 add_arguments, run)
