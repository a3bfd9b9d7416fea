"""Cap2Seg's segmentation model (seed 000, sec. 3.6), trained after the entailment model by `ovseg train cap2seg`.

Data: coco_dev's training split. L_seg (eq. 13) reads the base-class masks (`training_mask`, which refuses any
target class) and, on the images whose captions name no target class by exact match, their unlabelled pixels
as background. L_RS (eq. 17) reads each captioned image's occurrence and stripe distribution of every target
class *as the trained entailment model infers them from its captions*, and the image's unlabelled pixels (those
of no base class): target-class masks are never read. Two networks are trained with the same seed and data:
lambda = 0.01 (the paper's; `segmentation.pt`) and lambda = 0 (`segmentation_lrs0.pt`, the ablation).

Scale (`ovseg.train.scale`): the backbone features go through the on-disk feature cache and a bounded memory
layer (`PyramidStore`, shared with XPM), the masks are decoded per sample, and the caption priors (a small
vector per image) are computed once, each process every N-th image's, and gathered. Training runs on the
scalable loop: each process its share of every batch, each image's L_RS partner drawn from its own generator
(`item_seed(seed, epoch, position)`), `--resume` from `<out>.resume/<network>.pt`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ovseg.core.methods.cap2seg.entailment import exact_match
from ovseg.core.methods.cap2seg.local import fuse, grid_labels, stripe_shares
from ovseg.core.methods.cap2seg.segmentation import (BACKGROUND, Cap2SegNet, SegmentationConfig, ranking_loss,
                                                     seg_loss)
from ovseg.train.coco import BASE_CLASSES, TARGET_CLASSES, CocoConceptDataset, training_mask
from ovseg.train.scale import dist
from ovseg.train.scale.dist import Context
from ovseg.train.scale.features import PyramidStore
from ovseg.train.scale.loop import LoopConfig, fit as fit_loop, item_seed, shuffled_batches

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
    workers: int = 0
    amp: str = "auto"
    feature_cache: bool = True
    memory_cache_mb: int = 2048
    checkpoint_every: int = 50
    resume: bool = False


def _downsample(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A HxW 0/1 map -> the share of each feature cell it covers (area averaging)."""
    import cv2

    return cv2.resize(mask.astype(np.float32), (hw[1], hw[0]), interpolation=cv2.INTER_AREA)


def _known_masks(dataset: CocoConceptDataset, image_id: int) -> dict[int, np.ndarray]:
    """{base-class index: its training mask (0/1, 255 = crowd)}; target classes are never decoded."""
    return {BASE_CLASSES.index(n): training_mask(dataset, image_id, n)
            for n in dataset.classes_present(image_id) if n in BASE_CLASSES}


def image_priors(dataset: CocoConceptDataset, image_id: int, entailment, local, known_vectors: torch.Tensor,
                 unseen_vectors: torch.Tensor) -> dict:
    """What L_RS and the background rule read of an image's captions: occurrence s, the mean over its captions
    (as Table 1 scores an image), stripes V* = (Y_hat + V_hat) / 2 (sec. 3.5) with Y_hat from the local branch
    on the image's base-class cells, or V_hat alone without a local branch, and whether its unlabelled pixels
    are background (its captions name no target class). None for an uncaptioned image."""
    captions = dataset.captions(image_id)
    if not captions:
        return None
    names = [c for c in TARGET_CLASSES for _ in captions]
    occ, st = entailment.predict([c for _ in TARGET_CLASSES for c in captions], names)
    occ = occ.reshape(len(TARGET_CLASSES), len(captions))
    v_hat = st.reshape(len(TARGET_CLASSES), len(captions), -1).mean(axis=1)
    if local is not None:
        cells = grid_labels({k: m == 1 for k, m in _known_masks(dataset, image_id).items()}, local.config.grid)
        fused = []
        for u, vector in enumerate(unseen_vectors):
            prob = local.predict(cells, known_vectors, vector)
            y_hat = None if prob is None else stripe_shares(torch.from_numpy(prob.reshape(-1)), st.shape[-1]).numpy()
            fused.append(fuse(y_hat, v_hat[u]))
        v_hat = np.stack(fused)
    return {"occurrence": torch.from_numpy(occ.mean(axis=1)).float(),
            "stripes": torch.from_numpy(np.asarray(v_hat)).float(),
            "background": not any(exact_match(c, t) > 0 for c in captions for t in TARGET_CLASSES)}


class SegSamples:
    """The training images as the loop reads them: sample(position) -> {"feats" (c3, c4, c5), "labels" (h, w)
    index into the seen classes (-1 ignored), "unlabelled" (h, w) bool (Y of eq. 15), "occurrence" (U,) and
    "stripes" (U, K) or None}; item(position, epoch) -> (sample, its L_RS partner's sample or None)."""

    def __init__(self, dataset: CocoConceptDataset, ids: list[int], store: PyramidStore, priors: dict[int, dict | None],
                 partners: bool, seed: int):
        self.dataset, self.ids, self.store, self.priors, self.partners, self.seed = (
            dataset, list(ids), store, priors, partners, seed)
        self.captioned = [j for j, i in enumerate(self.ids) if priors[i] is not None]

    def __len__(self) -> int:
        return len(self.ids)

    def sample(self, position: int) -> dict:
        image_id = self.ids[position]
        feats = self.store.features(image_id)
        h, w = feats["c3"].shape[-2:]
        labels = np.full((h, w), -1, np.int64)
        covered = np.zeros((h, w), np.float32)
        for index, target in _known_masks(self.dataset, image_id).items():
            covered = np.maximum(covered, _downsample(target > 0, (h, w)))
            labels[_downsample(target == 1, (h, w)) >= 0.5] = index
        unlabelled = covered < 0.5
        prior = self.priors[image_id]
        if prior is not None and prior["background"]:
            labels[unlabelled & (labels < 0)] = len(BASE_CLASSES)  # the seen class "background"
        return {"feats": feats, "labels": torch.from_numpy(labels), "unlabelled": torch.from_numpy(unlabelled),
                "occurrence": None if prior is None else prior["occurrence"],
                "stripes": None if prior is None else prior["stripes"]}

    def item(self, position: int, epoch: int) -> tuple[dict, dict | None]:
        s = self.sample(position)
        partner = None
        if self.partners and s["occurrence"] is not None and len(self.captioned) > 1:
            rng = random.Random(item_seed(self.seed, epoch, position))
            partner = self.sample(rng.choice([c for c in self.captioned if c != position]))
        return s, partner


def build_samples(dataset: CocoConceptDataset, ids: list[int], models, entailment, cfg: SegTrainConfig,
                  progress: bool = True, local=None, ctx: Context | None = None, partners: bool = True
                  ) -> tuple[SegSamples, dict]:
    """The training images' caption priors (each process every N-th image's, gathered) and their backbone
    features into the store's caches; -> (the samples, counts)."""
    from tqdm import tqdm

    ctx = ctx or Context()
    store = PyramidStore(dataset, cfg.long_side, cfg.feature_cache, cfg.memory_cache_mb, models)
    known_vectors = models.embed_words(list(BASE_CLASSES)).float().cpu()
    unseen_vectors = models.embed_words(list(TARGET_CLASSES)).float().cpu()
    mine = {}
    for image_id in tqdm(ids[ctx.rank :: ctx.world], desc="cap2seg segmentation data", unit="img",
                         disable=not progress):
        if cfg.feature_cache or ctx.world == 1:
            store.features(image_id)  # computed once here, then read from the caches
        mine[image_id] = image_priors(dataset, image_id, entailment, local, known_vectors, unseen_vectors)
    priors = {k: v for part in dist.gather_objects(mine) for k, v in part.items()}
    samples = SegSamples(dataset, ids, store, priors, partners, cfg.seed)
    counts = {"images": len(ids), "captioned": len(samples.captioned),
              "background_images": sum(1 for p in priors.values() if p is not None and p["background"])}
    return samples, counts


def _seg_step(ctx: Context, seen_vectors: torch.Tensor, unseen_vectors: torch.Tensor, lambda_rs: float):
    """Eq. 18 of a process's share of a batch: the sum over its images of L_seg + lambda * L_RS (with the
    image's partner), over the global batch's image count (one process: the batch mean)."""

    def to(feats):
        return {k: v.to(ctx.device, non_blocking=True) for k, v in feats.items()}

    def step(model, batch, epoch):
        total = sum(p.sum() for p in model.parameters()) * 0.0  # reaches every parameter, even for an empty share
        seg = rs = 0.0
        for s, partner in batch:
            f = model(to(s["feats"]))
            loss = seg_loss(f, seen_vectors, s["labels"].to(ctx.device))
            seg += float(loss.detach())
            if lambda_rs > 0 and partner is not None:
                r = ranking_loss(f, model(to(partner["feats"])), s["unlabelled"].to(ctx.device),
                                 partner["unlabelled"].to(ctx.device), unseen_vectors, s["occurrence"].to(ctx.device),
                                 partner["occurrence"].to(ctx.device), s["stripes"].to(ctx.device),
                                 partner["stripes"].to(ctx.device))
                rs += float(r.detach())
                loss = loss + lambda_rs * r
            total = total + loss
        n, seg, rs = (float(v) for v in dist.all_reduce_sum(torch.tensor([len(batch), seg, rs], dtype=torch.float64)))
        total = total / max(n, 1.0)
        return total, {"total": float(dist.all_reduce_sum(total.detach().double().reshape(1).clone())[0]),
                       "seg": seg / max(n, 1.0), "rs": rs / max(n, 1.0)}

    return step


def fit(samples: SegSamples, seen_vectors: torch.Tensor, unseen_vectors: torch.Tensor, lambda_rs: float,
        cfg: SegTrainConfig, progress: bool = True, ctx: Context | None = None, checkpoint: str | None = None
        ) -> tuple[Cap2SegNet, dict]:
    """Eq. 18 by AdamW (gradient norm clipped at 5): per step `batch_images` images' L_seg, and for each
    captioned one L_RS with a random other captioned image. On the scalable loop (see the module docstring).
    -> (network, loss summary)."""
    ctx = ctx or Context()
    torch.manual_seed(cfg.seed)
    net = Cap2SegNet(SegmentationConfig(channels=cfg.channels, word_dim=seen_vectors.shape[1],
                                        long_side=cfg.long_side, lambda_rs=lambda_rs)).to(ctx.device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    plan = shuffled_batches(len(samples), cfg.epochs, cfg.batch_images, cfg.seed)
    samples.partners = lambda_rs > 0
    loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_images, seed=cfg.seed, workers=cfg.workers,
                      amp=cfg.amp, checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every, resume=cfg.resume,
                      clip_grad=5.0, desc=f"cap2seg segmentation (lambda={lambda_rs:g})", progress=progress and ctx.main)
    record = fit_loop(net, opt, None, samples,
                      _seg_step(ctx, seen_vectors.to(ctx.device), unseen_vectors.to(ctx.device), lambda_rs),
                      loop, ctx, collate=list, plan=lambda epoch: plan[epoch])
    totals = record["step_totals"]
    n = max(1, len(totals) // 10)
    return net.eval(), {"total": {"first_10pct": float(np.mean(totals[:n])), "last_10pct": float(np.mean(totals[-n:])),
                                  "steps": len(totals)},
                        "epochs": record["epochs"], "seconds": record["seconds"],
                        "images_per_s": record["items_per_s"]}


NETWORKS = ((0.01, "segmentation.pt"), (0.0, "segmentation_lrs0.pt"))


def train_segmentation(dataset: CocoConceptDataset, train_ids: list[int], models, entailment, local,
                       cfg: SegTrainConfig | None = None, progress: bool = True, ctx: Context | None = None,
                       resume_dir: str | Path | None = None) -> tuple[dict[str, Cap2SegNet], dict]:
    """Both networks (lambda 0.01 and 0) -> ({file name: network}, the training summary). local: the local
    branch (its Y_hat joins the stripes of L_RS) or None. resume_dir: where each network's training state goes
    (`<name>.pt`)."""
    cfg = cfg or SegTrainConfig()
    samples, counts = build_samples(dataset, train_ids, models, entailment, cfg, progress, local, ctx)
    counts["stripes"] = "V* = (Y_hat + V_hat) / 2" if local is not None else "V_hat (no local branch)"
    seen = [*BASE_CLASSES, BACKGROUND]
    seen_vectors = models.embed_words(seen).float().cpu()
    unseen_vectors = models.embed_words(list(TARGET_CLASSES)).float().cpu()
    summary = {"data": counts, "seen_classes": seen, "unseen_classes": list(TARGET_CLASSES),
               "config": cfg.__dict__, "networks": {}}
    nets = {}
    for lam, name in NETWORKS:
        checkpoint = str(Path(resume_dir) / name) if resume_dir is not None else None
        nets[name], losses = fit(samples, seen_vectors, unseen_vectors, lam, cfg, progress, ctx, checkpoint)
        summary["networks"][name] = {"lambda_rs": lam, "losses": losses}
        log.info("cap2seg %s: %s", name, losses["total"])
    return nets, summary


def save_networks(nets: dict[str, Cap2SegNet], out_dir: str | Path) -> None:
    seen = [*BASE_CLASSES, BACKGROUND]
    for lam, name in NETWORKS:
        nets[name].save(Path(out_dir) / name, {"seen_classes": seen, "unseen_classes": list(TARGET_CLASSES),
                                               "lambda_rs": lam})
