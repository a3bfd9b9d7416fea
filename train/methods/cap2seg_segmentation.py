"""Cap2Seg's segmentation model (seed 000, sec. 3.6), trained after the entailment model by `ovseg train cap2seg`.

Data: coco_dev's training split. L_seg (eq. 13) reads the base-class masks (`training_mask`, which refuses any
target class) and, on the images whose captions name no target class by exact match, their unlabelled pixels
as background. L_RS (eq. 17) reads each captioned image's occurrence and stripe distribution of every target
class *as the trained entailment model infers them from its captions*, and the image's unlabelled pixels (those
of no base class): target-class masks are never read. Two networks are trained with the same seed and data:
lambda = 0.01 (the paper's; `segmentation.pt`) and lambda = 0 (`segmentation_lrs0.pt`, the ablation).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from ovseg.core.methods.cap2seg.entailment import exact_match
from ovseg.core.methods.cap2seg.local import fuse, grid_labels, stripe_shares
from ovseg.core.methods.cap2seg.segmentation import (BACKGROUND, Cap2SegNet, SegmentationConfig, ranking_loss,
                                                     seg_loss)
from ovseg.core.models.backbone import input_size, preprocess
from ovseg.train.coco import BASE_CLASSES, TARGET_CLASSES, CocoConceptDataset, training_mask

log = logging.getLogger(__name__)


@dataclass
class SegTrainConfig:
    epochs: int = 6
    batch_images: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    long_side: int = 448
    channels: int = 128
    seed: int = 0


@dataclass
class SegSample:
    feats: dict  # c3, c4, c5 (half precision)
    labels: torch.Tensor  # (h, w) index into the seen classes, -1 ignored
    unlabelled: torch.Tensor  # (h, w) bool: Y of eq. 15
    occurrence: torch.Tensor | None  # (U,) from the captions, None without captions
    stripes: torch.Tensor | None  # (U, K)


def _downsample(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A HxW 0/1 map -> the share of each feature cell it covers (area averaging)."""
    import cv2

    return cv2.resize(mask.astype(np.float32), (hw[1], hw[0]), interpolation=cv2.INTER_AREA)


def build_samples(dataset: CocoConceptDataset, ids: list[int], models, entailment, cfg: SegTrainConfig,
                  progress: bool = True, local=None) -> tuple[list[SegSample], dict]:
    """Features, seen-class labels, Y and the caption-inferred priors of each training image: occurrence s the
    mean over its captions (as Table 1 scores an image), stripes V* = (Y_hat + V_hat) / 2 (sec. 3.5) with
    Y_hat from the local branch on the image's base-class cells, or V_hat alone without a local branch."""
    from tqdm import tqdm

    seen = [*BASE_CLASSES, BACKGROUND]
    samples, counts = [], {"images": 0, "background_images": 0, "captioned": 0, "labelled_cells": 0}
    known_vectors = models.embed_words(list(BASE_CLASSES)).float().cpu()
    unseen_vectors = models.embed_words(list(TARGET_CLASSES)).float().cpu()
    for image_id in tqdm(ids, desc="cap2seg segmentation data", unit="img", disable=not progress):
        rgb = dataset.load_rgb(image_id)
        hw_in = input_size(rgb.shape[0], rgb.shape[1], cfg.long_side)
        with torch.no_grad():
            f = models.backbone(preprocess(rgb, hw_in, models.device))
        feats = {"c3": f.c3.half().cpu(), "c4": f.c4.half().cpu(), "c5": f.c5.half().cpu()}
        h, w = f.c3.shape[-2:]
        labels = np.full((h, w), -1, np.int64)
        covered = np.zeros((h, w), np.float32)
        known_masks = {}
        for name in dataset.classes_present(image_id):
            if name not in BASE_CLASSES:
                continue  # target classes: never decoded
            target = training_mask(dataset, image_id, name)
            known_masks[BASE_CLASSES.index(name)] = target == 1
            share = _downsample(target == 1, (h, w))
            covered = np.maximum(covered, _downsample(target > 0, (h, w)))
            labels[share >= 0.5] = BASE_CLASSES.index(name)
        unlabelled = covered < 0.5
        captions = dataset.captions(image_id)
        occurrence = stripes = None
        if captions:
            counts["captioned"] += 1
            names = [c for c in TARGET_CLASSES for _ in captions]
            occ, st = entailment.predict([c for _ in TARGET_CLASSES for c in captions], names)
            occ = occ.reshape(len(TARGET_CLASSES), len(captions))
            v_hat = st.reshape(len(TARGET_CLASSES), len(captions), -1).mean(axis=1)
            occurrence = torch.from_numpy(occ.mean(axis=1)).float()
            if local is not None:
                cells = grid_labels(known_masks, local.config.grid)
                fused = []
                for u, vector in enumerate(unseen_vectors):
                    prob = local.predict(cells, known_vectors, vector)
                    y_hat = (None if prob is None
                             else stripe_shares(torch.from_numpy(prob.reshape(-1)), st.shape[-1]).numpy())
                    fused.append(fuse(y_hat, v_hat[u]))
                v_hat = np.stack(fused)
            stripes = torch.from_numpy(np.asarray(v_hat)).float()
            if not any(exact_match(c, t) > 0 for c in captions for t in TARGET_CLASSES):
                labels[unlabelled & (labels < 0)] = seen.index(BACKGROUND)
                counts["background_images"] += 1
        counts["images"] += 1
        counts["labelled_cells"] += int((labels >= 0).sum())
        samples.append(SegSample(feats, torch.from_numpy(labels), torch.from_numpy(unlabelled), occurrence, stripes))
    return samples, counts


def fit(samples: list[SegSample], seen_vectors: torch.Tensor, unseen_vectors: torch.Tensor, lambda_rs: float,
        cfg: SegTrainConfig, progress: bool = True) -> tuple[Cap2SegNet, dict]:
    """Eq. 18 by Adam: per step `batch_images` images' L_seg, and for each captioned one L_RS with a random
    other captioned image. -> (network, loss summary)."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    net = Cap2SegNet(SegmentationConfig(channels=cfg.channels, word_dim=seen_vectors.shape[1],
                                        long_side=cfg.long_side, lambda_rs=lambda_rs))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    captioned = [i for i, s in enumerate(samples) if s.occurrence is not None]
    order = list(range(len(samples)))
    history = {"seg": [], "rs": []}
    steps = cfg.epochs * ((len(order) + cfg.batch_images - 1) // cfg.batch_images)
    bar = tqdm(total=steps, desc=f"cap2seg segmentation (lambda={lambda_rs:g})", unit="step", disable=not progress)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        rng.shuffle(order)
        for start in range(0, len(order), cfg.batch_images):
            batch = order[start:start + cfg.batch_images]
            opt.zero_grad()
            l_seg = l_rs = 0.0
            for i in batch:
                s = samples[i]
                f = net(s.feats)
                loss = seg_loss(f, seen_vectors, s.labels)
                l_seg += float(loss.detach())
                if lambda_rs > 0 and s.occurrence is not None and len(captioned) > 1:
                    j = rng.choice([c for c in captioned if c != i])
                    o = samples[j]
                    rs = ranking_loss(f, net(o.feats), s.unlabelled, o.unlabelled, unseen_vectors,
                                      s.occurrence, o.occurrence, s.stripes, o.stripes)
                    l_rs += float(rs.detach())
                    loss = loss + lambda_rs * rs
                (loss / len(batch)).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            history["seg"].append(l_seg / len(batch))
            history["rs"].append(l_rs / len(batch))
            bar.update(1)
            bar.set_postfix(seg=f"{history['seg'][-1]:.3f}", rs=f"{history['rs'][-1]:.2f}")
    bar.close()

    def summary(v):
        n = max(1, len(v) // 10)
        return {"first_10pct": float(np.mean(v[:n])), "last_10pct": float(np.mean(v[-n:])), "steps": len(v)}

    return net.eval(), {"seg": summary(history["seg"]), "rs": summary(history["rs"]),
                        "seconds": round(time.perf_counter() - t0, 1)}


def train_segmentation(dataset: CocoConceptDataset, train_ids: list[int], models, entailment, local, out_dir,
                       cfg: SegTrainConfig | None = None, progress: bool = True) -> dict:
    """Both networks (lambda 0.01 and 0) into out_dir; returns the training summary. local: the local branch
    (its Y_hat joins the stripes of L_RS) or None."""
    from pathlib import Path

    cfg = cfg or SegTrainConfig()
    samples, counts = build_samples(dataset, train_ids, models, entailment, cfg, progress, local)
    counts["stripes"] = "V* = (Y_hat + V_hat) / 2" if local is not None else "V_hat (no local branch)"
    seen = [*BASE_CLASSES, BACKGROUND]
    seen_vectors = models.embed_words(seen).float().cpu()
    unseen_vectors = models.embed_words(list(TARGET_CLASSES)).float().cpu()
    summary = {"data": counts, "seen_classes": seen, "unseen_classes": list(TARGET_CLASSES),
               "config": cfg.__dict__, "networks": {}}
    for lam, name in ((0.01, "segmentation.pt"), (0.0, "segmentation_lrs0.pt")):
        net, losses = fit(samples, seen_vectors, unseen_vectors, lam, cfg, progress)
        net.save(Path(out_dir) / name, {"seen_classes": seen, "unseen_classes": list(TARGET_CLASSES),
                                        "lambda_rs": lam})
        summary["networks"][name] = {"lambda_rs": lam, "losses": losses}
        log.info("cap2seg %s: %s", name, losses)
    return summary
