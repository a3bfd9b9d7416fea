"""`ovseg train xpm`: XPM's teacher, cross-modal pseudo-labelling and robust student (seed 003, sec. 3.2).

1. Teacher (sec. 3.2.1): proposal network, embedding head and class-agnostic mask head on the frozen
   backbone, trained with L_GT on the base-class boxes and masks of the training images.
2. Pseudo-labelling (eq. 2, 4): for every object noun of the training images' captions, the teacher's
   proposal with the highest score v_o^T h_Emb(f_r), and its mask head's binarised mask there.
3. eta (sec. 3.2.4, footnote 2): a robust student trained on a random half of the captioned images; eta is
   the smallest mean pseudo-mask noise it estimates over the whole captioned set.
4. Students, initialised from the teacher: the robust one (L_GT + L_M with noise, eq. 6 + L_X^alpha, eq. 7)
   and, for the ablation, one without noise estimation (L_GT + eq. 5 + eq. 3).
5. Evaluation on the held-out images (never trained on): instance mask mAP@0.5 (pycocotools), constrained
   and generalised, target and base, for the three networks, and how reliability ranks pseudo-mask quality.

Target-class boxes and masks are never read: only base-class annotations are decoded, after
`assert_no_target_annotations`; target classes reach training through captions only.

Every network trains on the scalable loop (`ovseg.train.scale`): one CPU, a GPU, or N processes under
torchrun with the same global batch, resumable per stage (`<out>.resume/<stage>.pt`). Backbone features are
read per sample through the on-disk feature cache and a bounded memory layer (`ImageStore`), annotations are
decoded per sample, and every random draw of an image (its RoIs, the noise samples of eq. 6) comes from
`item_rng(seed, epoch, image id)`, so it does not depend on which process trains the image.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ovseg.core.ops.boxes import box_iou, flip_boxes, roi_align
from ovseg.core.cache import atomic_write_json, replaced_folder
from ovseg.core.models.caption_nouns import object_nouns
from ovseg.core.models import Models
from ovseg.core.methods.xpm.losses import (classification_loss, cross_modal_loss, mask_loss, mean_noise,
                                           noisy_mask_loss, proposal_loss, proposal_targets, reliability)
from ovseg.core.methods.xpm.model import XPMConfig, XPMNet, word_scores
from ovseg.train.coco import (HOLDOUT_FRACTION, SPLIT_SEED, BASE_CLASSES, CocoConceptDataset,
                              assert_no_target_annotations, fraction_of, split_image_ids)
from ovseg.train.registry import register_trainer
from ovseg.train.scale import dist
from ovseg.train.scale.cli import add_scale_arguments
from ovseg.train.scale.dist import Context, all_reduce_sum
from ovseg.train.scale.features import PyramidStore, pyramid_features
from ovseg.train.scale.loop import LoopConfig, fit, item_rng

log = logging.getLogger(__name__)

NETWORKS = ("teacher", "student_plain", "student")


@dataclass
class TrainConfig:
    coco_dir: str
    out: str
    long_side: int = 448
    channels: int = 96
    teacher_epochs: int = 8
    student_epochs: int = 6
    eta_epochs: int = 3
    eta_fraction: float = 0.5  # the subset of captioned images eta is estimated on
    batch_images: int = 4  # gradients of this many images per step
    lr: float = 1e-3
    student_lr: float = 5e-4
    weight_decay: float = 1e-4
    rois_per_image: int = 64
    positive_fraction: float = 0.25
    proposals_train: int = 100
    proposals_align: int = 100
    noise_samples: int = 8
    holdout_fraction: float = HOLDOUT_FRACTION
    seed: int = SPLIT_SEED
    ablation: bool = True  # also train the student without noise estimation
    evaluate: bool = True
    max_images: int | None = None
    fraction: float = 1.0  # the data-scaling study: this share of the training images (nested shares)
    teacher: str | None = None  # reuse this trained teacher (a teacher.pt) instead of training one
    device: str = "auto"
    amp: str = "auto"
    workers: int = 0  # DataLoader worker processes per training process
    feature_cache: bool = True  # backbone features on disk (OVSEG_CACHE_DIR/features), read per sample
    memory_cache_mb: int = 2048  # per process: features and annotations kept in memory (coco_dev's fit)
    checkpoint_every: int = 20  # steps; the training state goes to <out>.resume/<stage>.pt
    resume: bool = False


# ------------------------------------------------------------------------------------------- data

def base_annotations(dataset: CocoConceptDataset, image_id: int, input_hw: tuple[int, int]) -> dict:
    """The image's base-class instances (not crowd) at network-input scale: boxes (G, 4), labels (G,) as
    1 + index into BASE_CLASSES, masks (G, H, W) bool. Only base-class annotations are decoded."""
    import cv2

    H, W = input_hw
    h0, w0 = dataset.image_size(image_id)
    sx, sy = W / w0, H / h0  # input sides are multiples of 32: the two scales differ a little
    boxes, labels, masks = [], [], []
    for ann in dataset.annotations(image_id):
        name = dataset._cat_name[ann["category_id"]]
        if name not in BASE_CLASSES or ann.get("iscrowd", 0):
            continue
        assert_no_target_annotations([name])
        x, y, w, h = ann["bbox"]
        if w < 1 or h < 1:
            continue
        m = dataset.coco.annToMask(ann)
        m = cv2.resize(m, (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)
        boxes.append([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
        labels.append(1 + BASE_CLASSES.index(name))
        masks.append(m)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, H, W), dtype=torch.bool)}


def flip_annotations(gt: dict, width: int) -> dict:
    return {"boxes": flip_boxes(gt["boxes"], width), "labels": gt["labels"], "masks": gt["masks"].flip(-1)}


image_features = pyramid_features  # the name the curation retrain and xpm_eval import


def as_float(feats: dict) -> dict:
    return {k: v.float() for k, v in feats.items()}


def caption_nouns(dataset: CocoConceptDataset, image_id: int) -> list[str]:
    """Distinct object nouns (lemmas) of all the image's captions."""
    return list(dict.fromkeys(n.lemma for c in dataset.captions(image_id) for n in object_nouns(c)))


class ImageStore(PyramidStore):
    """What the stages read of a training image, per sample: its backbone features (plain or mirrored; through
    the on-disk feature cache, keyed by the backbone's weights, the input size and the image's bytes, and a
    bounded memory layer: `PyramidStore`), its base-class annotations (decoded when read), its input size, and
    its pseudo labels once made (`pseudo`: image id -> [plain, mirrored] or None)."""

    def __init__(self, dataset: CocoConceptDataset, long_side: int, feature_cache: bool = True,
                 memory_cache_mb: int = 2048, models: Models | None = None):
        super().__init__(dataset, long_side, feature_cache, memory_cache_mb, models)
        self.pseudo: dict[int, list | None] = {}

    def annotations(self, image_id: int, flip: bool) -> dict:
        gt = self.remember(("gt", image_id), lambda: base_annotations(self.dataset, image_id,
                                                                      self.input_hw(image_id)))
        return flip_annotations(gt, self.input_hw(image_id)[1]) if flip else gt

    def sample(self, image_id: int, flip: bool, with_pseudo: bool) -> dict:
        """One training image as a stage reads it: features, annotations, input size and (with_pseudo) its
        pseudo labels (None when it has none)."""
        pseudo = self.pseudo.get(image_id) if with_pseudo else None
        return {"feats": self.features(image_id, flip), "gt": self.annotations(image_id, flip),
                "input_hw": self.input_hw(image_id), "pseudo": pseudo[int(flip)] if pseudo else None}


def count_base_instances(dataset: CocoConceptDataset, ids: list[int]) -> int:
    """The base-class instances `base_annotations` keeps, counted without decoding a mask."""
    n = 0
    for image_id in ids:
        for ann in dataset.annotations(image_id):
            name = dataset._cat_name[ann["category_id"]]
            if name in BASE_CLASSES and not ann.get("iscrowd", 0) and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1:
                n += 1
    return n


# ------------------------------------------------------------------------------------------- RoIs

def jitter(boxes: torch.Tensor, n: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    if boxes.numel() == 0:
        return boxes
    b = boxes.repeat(n, 1)
    wh = torch.cat([b[:, 2:] - b[:, :2]] * 2, dim=1)
    return b + (torch.rand(b.shape, generator=gen) * 2 - 1) * scale * wh


def sample_rois(proposals: torch.Tensor, gt: dict, cfg: TrainConfig, input_hw, gen: torch.Generator) -> dict:
    """Training regions of one image: proposals, the ground-truth boxes and jittered copies, random boxes.
    Positives (IoU >= 0.5 with a base instance) up to `positive_fraction`, the rest background."""
    H, W = input_hw
    rnd = torch.rand((16, 4), generator=gen)
    xy = torch.stack([rnd[:, 0] * W * 0.8, rnd[:, 1] * H * 0.8], 1)
    wh = torch.stack([8 + rnd[:, 2] * (W - 8) * 0.6, 8 + rnd[:, 3] * (H - 8) * 0.6], 1)
    random_boxes = torch.cat([xy, (xy + wh).clamp(max=torch.tensor([W, H], dtype=torch.float32))], 1)
    cands = torch.cat([proposals, gt["boxes"], jitter(gt["boxes"], 4, 0.15, gen), random_boxes])
    n_pos_max = int(cfg.rois_per_image * cfg.positive_fraction)
    if gt["boxes"].numel():
        iou = box_iou(cands, gt["boxes"])
        best_iou, best = iou.max(dim=1)
    else:
        best_iou, best = torch.zeros(len(cands)), torch.zeros(len(cands), dtype=torch.long)
    pos = torch.nonzero(best_iou >= 0.5).flatten()
    neg = torch.nonzero(best_iou < 0.5).flatten()
    pos = pos[torch.randperm(len(pos), generator=gen)[:n_pos_max]]
    neg = neg[torch.randperm(len(neg), generator=gen)[: cfg.rois_per_image - len(pos)]]
    idx = torch.cat([pos, neg])
    labels = torch.zeros(len(idx), dtype=torch.long)
    if len(pos):
        labels[: len(pos)] = gt["labels"][best[pos]]
    return {"boxes": cands[idx], "labels": labels, "n_pos": len(pos), "gt_index": best[pos]}


def mask_targets(gt_masks: torch.Tensor, boxes: torch.Tensor, gt_index: torch.Tensor, size: int) -> torch.Tensor:
    """(P, size, size) binary targets: each positive box's ground-truth instance mask, RoIAligned into it."""
    if len(boxes) == 0:
        return torch.zeros((0, size, size))
    sel = gt_masks[gt_index].float()  # (P, H, W)
    out = torch.stack([roi_align(sel[i:i + 1], boxes[i:i + 1], size, 1.0)[0, 0] for i in range(len(boxes))])
    return (out >= 0.5).float()


def gt_loss(net: XPMNet, pyr: dict, gt: dict, base_vectors: torch.Tensor, cfg: TrainConfig, input_hw,
            gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """L_GT on one image: proposal loss + region classification (embedding head) + class-agnostic mask loss.
    `gt` lives on the CPU, where the RoIs are drawn from `gen`; the losses are computed on the net's device."""
    dev = base_vectors.device
    maps = net.proposal_maps(pyr)
    targets = proposal_targets(gt["boxes"].to(dev), {s: tuple(m[0].shape[-2:]) for s, m in maps.items()}, net.cfg)
    l_rpn = proposal_loss(maps, targets)
    proposals, _ = net.proposals(pyr, input_hw, post_nms=cfg.proposals_train)
    rois = sample_rois(proposals.detach().float().cpu(), gt, cfg, input_hw, gen)
    boxes = rois["boxes"].to(dev)
    scores = word_scores(net.embed(pyr, boxes), base_vectors)
    l_cls = classification_loss(scores, rois["labels"].to(dev))
    pos_boxes = rois["boxes"][: rois["n_pos"]]
    if len(pos_boxes):
        logits, _ = net.mask_and_noise(pyr, pos_boxes.to(dev), with_noise=False)
        target = mask_targets(gt["masks"], pos_boxes, rois["gt_index"], net.cfg.mask_size).to(dev)
        l_mask = mask_loss(logits, target)
    else:
        l_mask = scores.sum() * 0
    return l_rpn + l_cls + l_mask, {"proposal": l_rpn.item(), "classification": l_cls.item(), "mask": l_mask.item()}


GT_LOGS = ("proposal", "classification", "mask")
PSEUDO_LOGS = ("noise_level", "pseudo_mask", "cross_modal")


def _feats_on(feats: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True).float() for k, v in feats.items()}


def teacher_image_loss(base_vectors: torch.Tensor, cfg: TrainConfig) -> Callable:
    """L_GT of one image (a `fit_network` image loss)."""

    def image_loss(net, sample, gen):
        dev = next(net.parameters()).device
        pyr = net.pyramid(_feats_on(sample["feats"], dev))
        return gt_loss(net, pyr, sample["gt"], base_vectors.to(dev), cfg, sample["input_hw"], gen)

    return image_loss


def student_image_loss(base_vectors: torch.Tensor, vocab_vectors: torch.Tensor, cfg: TrainConfig, robust: bool,
                       eta: float | None) -> Callable:
    """L_GT, and on an image with pseudo labels L_M (eq. 6 with noise samples drawn from the image's generator
    if robust, else eq. 5) and L_X (eq. 3; weighted by alpha = eta / noise level if robust and eta is given)."""

    def image_loss(net, sample, gen):
        dev = next(net.parameters()).device
        pyr = net.pyramid(_feats_on(sample["feats"], dev))
        loss, info = gt_loss(net, pyr, sample["gt"], base_vectors.to(dev), cfg, sample["input_hw"], gen)
        p = sample["pseudo"]
        if p:
            boxes, masks = p["boxes"].to(dev), p["masks"].to(dev)
            logits, variance = net.mask_and_noise(pyr, boxes)
            emb = net.embed(pyr, boxes)
            if robust:
                xi = torch.randn((cfg.noise_samples, *logits.shape), generator=gen).to(dev, logits.dtype)
                l_m = noisy_mask_loss(logits, variance, masks, xi=xi).mean()
                noise = mean_noise(variance)
                alpha = reliability(noise, eta) if eta is not None else None
                info["noise_level"] = noise.mean().item()
            else:
                l_m, alpha = mask_loss(logits, masks), None
            l_x = cross_modal_loss(emb, vocab_vectors.to(dev), p["nouns"].to(dev), alpha)
            loss = loss + l_m + l_x
            info.update(pseudo_mask=l_m.item(), cross_modal=l_x.item())
        return loss, info

    return image_loss


# ------------------------------------------------------------------------------------------- training loop

def xpm_plan(keys: list, epochs: int, batch: int, seed: int) -> list[list[list[tuple]]]:
    """Every epoch's global batches of (image key, flip), drawn as XPM's loop always drew them: per epoch a
    shuffle of the images with random.Random(seed), then one flip draw (p = 0.5) per image as its batch comes.
    An incomplete last batch is left out; a set smaller than one batch is one batch. Every process draws the
    same plan."""
    if not keys:
        raise ValueError("no training image")
    size = min(batch, len(keys))
    per_epoch = len(keys) // size
    rng = random.Random(seed)
    plan = []
    for _ in range(epochs):
        order = list(keys)
        rng.shuffle(order)
        plan.append([[(k, rng.random() < 0.5) for k in order[b : b + size]]
                     for b in range(0, per_epoch * size, size)])
    return plan


class _ImageSource:
    """The loop's items: item((key, flip), epoch) -> (key, flip, fetch(key, flip))."""

    def __init__(self, fetch: Callable, n: int):
        self.fetch, self.n = fetch, n

    def __len__(self) -> int:
        return self.n

    def item(self, key: tuple, epoch: int):
        k, flip = key
        return k, flip, self.fetch(k, flip)


class StoreFetch:
    """A picklable fetch for DataLoader workers: `store.sample(image_id, flip, image_id in with_pseudo)`."""

    def __init__(self, store: ImageStore, with_pseudo: set | None = None):
        self.store, self.with_pseudo = store, with_pseudo or set()

    def __call__(self, image_id: int, flip: bool) -> dict:
        return self.store.sample(image_id, flip, image_id in self.with_pseudo)


def _list(items: list) -> list:
    return items


def _image_step(ctx: Context, image_loss: Callable, item_seed: int, logs: tuple[str, ...]):
    """A step's loss: the sum of this process's image losses over the global batch's image count (so the
    gradients summed over processes are those of the global batch's mean, as the one-process loop took), and
    the global batch's mean of each logged value (summed over the images that have it, over the count)."""

    def step(model, batch, epoch):
        n = torch.tensor([float(len(batch))], device=ctx.device)
        count = float(all_reduce_sum(n)[0])
        total, sums = None, torch.zeros(len(logs) + 1, dtype=torch.float64)
        for key, flip, sample in batch:
            _, gen = item_rng(item_seed, epoch, key)
            loss, info = image_loss(model, sample, gen)
            total = loss if total is None else total + loss
            sums[0] += float(loss.detach())
            for j, name in enumerate(logs, 1):
                sums[j] += info.get(name, 0.0)
        if total is None:  # an empty share of a small batch: nothing to add, but the step still takes part
            total = sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)
        sums = all_reduce_sum(sums.to(ctx.device)).cpu() / count
        return total / count, {"total": float(sums[0]), **{name: float(sums[j]) for j, name in enumerate(logs, 1)}}

    return step


def fit_network(net: XPMNet, keys: list, fetch: Callable, image_loss: Callable, *, epochs: int, lr: float,
                cfg: TrainConfig, desc: str, progress: bool, item_seed: int, logs: tuple[str, ...] = GT_LOGS,
                ctx: Context | None = None, checkpoint: str | None = None) -> dict:
    """Train `net` in place on the scalable loop: the batches and flips of `xpm_plan(keys, epochs,
    cfg.batch_images, cfg.seed)`; `fetch(key, flip)` reads an image (in DataLoader workers when cfg.workers);
    `image_loss(net, sample, gen)` -> (loss, info) of one image, its random draws from `gen` =
    item_rng(item_seed, epoch, key). AdamW, one-cycle learning rate (10% warm-up), gradients clipped at norm 10.
    With `checkpoint` the training state is written every cfg.checkpoint_every steps, and cfg.resume goes on
    from it (a finished stage's state gives its final weights at once).

    Returns the loop's record (`ovseg.train.scale.loop.fit`): per epoch the mean of "total" and each of `logs`.
    """
    ctx = ctx or Context()
    net.to(ctx.device)
    plan = xpm_plan(keys, epochs, cfg.batch_images, cfg.seed)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(plan[0]), pct_start=0.1)
    loop = LoopConfig(epochs=epochs, batch_size=len(plan[0][0]), seed=cfg.seed, workers=cfg.workers, amp=cfg.amp,
                      checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every, resume=cfg.resume,
                      clip_grad=10.0, desc=desc, progress=progress and ctx.main)
    record = fit(net, opt, sched, _ImageSource(fetch, len(keys)), _image_step(ctx, image_loss, item_seed, logs),
                 loop, ctx, collate=_list, plan=lambda epoch: plan[epoch])
    net.eval()
    return record


def _stage_checkpoint(cfg: TrainConfig, stage: str) -> str:
    return str(Path(f"{cfg.out}.resume") / f"{stage}.pt")


def train_teacher(corpus: "Corpus", cfg: TrainConfig, progress: bool, ctx: Context | None = None
                  ) -> tuple[XPMNet, dict]:
    torch.manual_seed(cfg.seed)
    base_vectors = corpus.base_vectors
    net = XPMNet(XPMConfig(channels=cfg.channels, word_dim=base_vectors.shape[1], long_side=cfg.long_side))
    record = fit_network(net, corpus.train_ids, StoreFetch(corpus.store), teacher_image_loss(base_vectors, cfg),
                         epochs=cfg.teacher_epochs, lr=cfg.lr, cfg=cfg, desc="teacher (L_GT)", progress=progress,
                         item_seed=cfg.seed, ctx=ctx, checkpoint=_stage_checkpoint(cfg, "teacher"))
    return net, record


def _shard(ids: list, ctx: Context | None) -> list:
    return ids if ctx is None else ids[ctx.rank :: ctx.world]


def _merge_shards(part: dict) -> dict:
    """Each process's dict of its shard's results, merged (one process: `part` itself)."""
    out: dict = {}
    for d in dist.gather_objects(part):
        out.update(d)
    return out


@torch.no_grad()
def pseudo_label(teacher: XPMNet, store, nouns: dict[int, list[str]], ids: list[int], vocab: list[str],
                 vocab_vectors: torch.Tensor, cfg: TrainConfig, progress: bool,
                 ctx: Context | None = None) -> tuple[dict[int, list | None], int]:
    """Eq. 2 and 4 on the captioned training images `ids` (under torchrun each process labels every world-th
    one and all get every result). -> ({image id: [plain, mirrored] pseudo labels with the aligned boxes, the
    vocabulary index of each noun, the teacher's binarised 28x28 masks and the alignment scores; or None},
    the number of pseudo labels). `store` gives `features(id, flip)` and `input_hw(id)`."""
    from tqdm import tqdm

    index = {w: i for i, w in enumerate(vocab)}
    dev = next(teacher.parameters()).device
    vectors = vocab_vectors.to(dev)
    out: dict[int, list | None] = {}
    for image_id in tqdm(_shard(ids, ctx), desc="pseudo-labels", unit="img", disable=not progress):
        words = [w for w in nouns[image_id] if w in index]
        out[image_id] = None
        if not words:
            continue
        hw = store.input_hw(image_id)
        pyr = teacher.pyramid(_feats_on(store.features(image_id, False), dev))
        boxes, _ = teacher.proposals(pyr, hw, post_nms=cfg.proposals_align)
        if len(boxes) == 0:
            continue
        idx = torch.tensor([index[w] for w in words])
        scores = teacher.embed(pyr, boxes) @ vectors[idx.to(dev)].T  # (R, O)
        best_score, best = scores.max(dim=0)
        aligned = boxes[best]
        logits, _ = teacher.mask_and_noise(pyr, aligned)
        aligned, masks, best_score = aligned.float().cpu(), (logits >= 0).cpu(), best_score.float().cpu()
        out[image_id] = [{"boxes": aligned, "nouns": idx, "masks": masks, "scores": best_score},
                         {"boxes": flip_boxes(aligned, hw[1]), "nouns": idx, "masks": masks.flip(-1),
                          "scores": best_score}]
    out = _merge_shards(out) if ctx is not None else out
    return out, sum(len(p[0]["nouns"]) for p in out.values() if p)


@dataclass
class Corpus:
    """What the stages share: the split, the per-sample reader of the training images (features, base-class
    annotations, pseudo labels), each training image's caption nouns, and the word vectors of the base classes
    and the caption vocabulary."""

    dataset: CocoConceptDataset
    train_ids: list[int]
    held_ids: list[int]
    store: ImageStore
    nouns: dict[int, list[str]]
    vocab: list[str]
    base_vectors: torch.Tensor
    vocab_vectors: torch.Tensor
    captioned: list[int]  # training images with a caption noun (after pseudo-labelling: with a pseudo label)


def train_student(teacher: XPMNet, corpus: Corpus, cfg: TrainConfig, ids: list[int], *, captioned: list[int],
                  robust: bool, eta: float | None, epochs: int, desc: str, progress: bool, stage: str,
                  ctx: Context | None = None) -> tuple[XPMNet, dict]:
    """The student g, initialised from the teacher, trained on the images `ids`: L_GT on base classes, and on
    the `captioned` ones L_M (eq. 6 if robust, else eq. 5) and L_X (eq. 3; weighted by alpha = eta / noise
    level if robust and eta is given)."""
    torch.manual_seed(cfg.seed + 1)
    net = XPMNet(XPMConfig(**{**teacher.cfg.to_dict(), "noise": robust}))
    net.load_state_dict({k: v.cpu() for k, v in teacher.state_dict().items()}, strict=False)
    loss = student_image_loss(corpus.base_vectors, corpus.vocab_vectors, cfg, robust, eta)
    logs = GT_LOGS + (PSEUDO_LOGS if robust else PSEUDO_LOGS[1:])
    record = fit_network(net, ids, StoreFetch(corpus.store, set(captioned)), loss, epochs=epochs,
                         lr=cfg.student_lr, cfg=cfg, desc=desc, progress=progress, item_seed=cfg.seed + 1,
                         logs=logs, ctx=ctx, checkpoint=_stage_checkpoint(cfg, stage))
    return net, record


@torch.no_grad()
def pixel_noise(student: XPMNet, store, ids: list[int], ctx: Context | None = None) -> dict[int, torch.Tensor]:
    """Each captioned image's pseudo masks' pixel noise variances (P, 28, 28) under `student` (under torchrun
    each process computes every world-th image's, and all get every result)."""
    out = {}
    dev = next(student.parameters()).device
    for image_id in _shard(ids, ctx):
        p = store.pseudo.get(image_id)
        if not p:
            continue
        pyr = student.pyramid(_feats_on(store.features(image_id, False), dev))
        out[image_id] = student.mask_and_noise(pyr, p[0]["boxes"].to(dev))[1].float().cpu()
    return _merge_shards(out) if ctx is not None else out


def noise_levels(student: XPMNet, store, ids: list[int], ctx: Context | None = None) -> dict[int, torch.Tensor]:
    """Each captioned image's pseudo masks' noise levels (mean pixel noise, sec. 3.2.4) under `student`."""
    return {i: mean_noise(v) for i, v in pixel_noise(student, store, ids, ctx).items()}


def noise_display_scale(variances: list[torch.Tensor]) -> float:
    """The pixel noise variance shown as 1 in noise maps: the 99th percentile over the captioned set's pseudo
    masks (the noise map is (variance - floor) / (this - floor), clipped to [0, 1])."""
    return float(np.percentile(torch.cat([v.flatten() for v in variances]).numpy(), 99))


# ------------------------------------------------------------------------------------------- the run

def _summary(records: list[dict]) -> dict:
    """A stage's loss terms in its first and last epoch (the epoch means of each step's global batch mean)."""
    if not records:
        return {}
    first, last = records[0], records[-1]
    return {("loss" if k == "total" else k): {"first": round(float(first[k]), 4), "last": round(float(last[k]), 4)}
            for k in first if k != "epoch"}


loss_summary = _summary


def split(cfg: TrainConfig, dataset: CocoConceptDataset) -> tuple[list[int], list[int]]:
    train_ids, held_ids = split_image_ids(dataset.image_ids, cfg.holdout_fraction, cfg.seed)
    train_ids = fraction_of(train_ids, cfg.fraction, cfg.seed)
    if cfg.max_images:  # a quick run: captioned images first
        train_ids = sorted(sorted(train_ids, key=lambda i: not dataset.captions(i))[: cfg.max_images])
        held_ids = sorted(held_ids, key=lambda i: not dataset.captions(i))[: max(2, cfg.max_images // 4)]
    return train_ids, held_ids


def build_corpus(cfg: TrainConfig, models: Models, progress: bool, ctx: Context | None = None) -> Corpus:
    """The split, the training images' caption nouns and the word vectors; each process computes the features
    of every world-th training image (plain and mirrored) into the feature cache, which the stages then read."""
    from tqdm import tqdm

    dataset = CocoConceptDataset(cfg.coco_dir)
    train_ids, held_ids = split(cfg, dataset)
    store = ImageStore(dataset, cfg.long_side, cfg.feature_cache, cfg.memory_cache_mb, models)
    for image_id in tqdm(_shard(train_ids, ctx), desc="features", unit="img", disable=not progress):
        for flip in (False, True):
            store.features(image_id, flip)
    dist.barrier()
    nouns = {i: caption_nouns(dataset, i) for i in train_ids}
    vocab = sorted({w for i in train_ids for w in nouns[i]})
    if not vocab:
        raise ValueError(f"no caption with an object noun among the {len(train_ids)} training images of "
                         f"{cfg.coco_dir}: XPM needs captions.json")
    return Corpus(dataset=dataset, train_ids=train_ids, held_ids=held_ids, store=store, nouns=nouns, vocab=vocab,
                  base_vectors=models.embed_words(list(BASE_CLASSES)).float().cpu(),
                  vocab_vectors=models.embed_words(vocab).float().cpu(),
                  captioned=[i for i in train_ids if nouns[i]])


def teacher_network(corpus: Corpus, cfg: TrainConfig, progress: bool, ctx: Context | None = None
                    ) -> tuple[XPMNet, dict, dict]:
    """The teacher: trained here, or the `cfg.teacher` one reused. -> (teacher, its loop record or {}, the
    reused teacher's own training.json or {})"""
    if not cfg.teacher:
        teacher, record = train_teacher(corpus, cfg, progress, ctx)
        return teacher, record, {}
    teacher, _ = XPMNet.load(cfg.teacher, ctx.device if ctx else "cpu")
    previous = Path(cfg.teacher).with_name("training.json")
    log.info("reusing the teacher %s", cfg.teacher)
    return teacher, {}, json.loads(previous.read_text()) if previous.is_file() else {}


def estimate_eta(teacher: XPMNet, corpus: Corpus, cfg: TrainConfig, progress: bool, ctx: Context | None = None
                 ) -> tuple[float, dict]:
    """Footnote 2: a robust student on a random half of the captioned set, then the smallest noise level it
    estimates over all of it. -> (eta, that student's loop record)"""
    captioned = corpus.captioned
    subset = sorted(random.Random(cfg.seed).sample(captioned, max(1, int(len(captioned) * cfg.eta_fraction))))
    eta_net, record = train_student(teacher, corpus, cfg, subset, captioned=subset, robust=True, eta=None,
                                    epochs=cfg.eta_epochs, desc="eta run (robust student, half the captions)",
                                    progress=progress, stage="eta_run", ctx=ctx)
    levels = noise_levels(eta_net, corpus.store, captioned, ctx)
    return float(torch.cat(list(levels.values())).min()), record


def reliability_scale(student: XPMNet, corpus: Corpus, ctx: Context | None = None) -> dict:
    """The shipped reliability scale: eq. 7 with eta the smallest noise level of the final student over the
    captioned set (alpha <= 1 there); the noise-map display scale: the 99th percentile pixel noise."""
    final_pixels = pixel_noise(student, corpus.store, corpus.captioned, ctx)
    levels = torch.cat([mean_noise(v) for v in final_pixels.values()])
    return {"eta": float(levels.min()), "noise_scale": noise_display_scale(list(final_pixels.values())),
            "noise_levels": {"min": float(levels.min()), "median": float(levels.median()), "max": float(levels.max())}}


class TrainView(Mapping):
    """The captioned training images as `xpm_eval` reads them ({"feats", "input_hw", "nouns", "pseudo"}), read
    from the store one image at a time."""

    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        self.ids = [i for i in corpus.train_ids if corpus.store.pseudo.get(i)]

    def __getitem__(self, image_id: int) -> dict:
        if image_id not in self.ids:
            raise KeyError(image_id)
        store = self.corpus.store
        return {"feats": as_float(store.features(image_id, False)), "input_hw": store.input_hw(image_id),
                "nouns": self.corpus.nouns[image_id], "pseudo": store.pseudo[image_id]}

    def __iter__(self):
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def _throughput(record: dict) -> dict:
    return {"images_per_s": record.get("items_per_s"), "steps": record.get("steps"),
            "processes": record.get("processes"), "device": record.get("device")}


def train(cfg: TrainConfig, progress: bool = True) -> Path | None:
    """All stages of the module docstring; writes the model folder cfg.out (teacher.pt, student.pt,
    student_plain.pt, config.json, training.json). Under torchrun every process trains and rank 0 alone
    writes (the others return None)."""
    ctx = dist.setup(cfg.device)
    try:
        return _train(cfg, ctx, progress and ctx.main)
    finally:
        dist.teardown()


def _train(cfg: TrainConfig, ctx: Context, progress: bool) -> Path | None:
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    resume_dir = Path(f"{cfg.out}.resume")
    if not cfg.resume and ctx.main and resume_dir.exists():
        shutil.rmtree(resume_dir)  # a fresh run: an older interrupted run's states are not this run's
    dist.barrier()
    models = Models(ctx.device)

    t0 = time.perf_counter()
    corpus = build_corpus(cfg, models, progress, ctx)
    seconds["features"] = time.perf_counter() - t0

    # 1. teacher on base classes
    t0 = time.perf_counter()
    teacher, teacher_record, teacher_previous = teacher_network(corpus, cfg, progress, ctx)
    if teacher_previous:
        seconds["teacher_training"] = teacher_previous.get("seconds", {}).get("teacher", 0.0)
    seconds["teacher"] = time.perf_counter() - t0

    # 2. cross-modal pseudo-labels of the caption nouns (eq. 2, 4)
    t0 = time.perf_counter()
    corpus.store.pseudo, n_pseudo = pseudo_label(teacher, corpus.store, corpus.nouns, corpus.captioned, corpus.vocab,
                                                 corpus.vocab_vectors, cfg, progress, ctx)
    corpus.captioned = [i for i in corpus.captioned if corpus.store.pseudo.get(i)]
    if not corpus.captioned:
        raise ValueError("the teacher aligned no caption noun to a region: no pseudo label to train the students on")
    seconds["pseudo_labels"] = time.perf_counter() - t0

    # 3. eta (footnote 2)
    t0 = time.perf_counter()
    eta, eta_record = estimate_eta(teacher, corpus, cfg, progress, ctx)
    seconds["eta"] = time.perf_counter() - t0

    # 4. the robust student, and the student without noise estimation for the ablation
    t0 = time.perf_counter()
    student, student_record = train_student(teacher, corpus, cfg, corpus.train_ids, captioned=corpus.captioned,
                                            robust=True, eta=eta, epochs=cfg.student_epochs, desc="robust student",
                                            progress=progress, stage="student", ctx=ctx)
    seconds["student"] = time.perf_counter() - t0
    nets = {"teacher": teacher, "student": student}
    records = {"teacher": teacher_record, "student": student_record, "eta_run": eta_record}
    if cfg.ablation:
        t0 = time.perf_counter()
        nets["student_plain"], records["student_plain"] = train_student(
            teacher, corpus, cfg, corpus.train_ids, captioned=corpus.captioned, robust=False, eta=None,
            epochs=cfg.student_epochs, desc="student without noise estimation", progress=progress,
            stage="student_plain", ctx=ctx)
        seconds["student_plain"] = time.perf_counter() - t0

    scale = reliability_scale(student, corpus, ctx)
    if not ctx.main:
        return None
    nets = {k: v.cpu() for k, v in nets.items()}
    summary = {
        "images": {"train": len(corpus.train_ids), "held_out": len(corpus.held_ids),
                   "captioned": len(corpus.captioned)},
        "vocabulary": len(corpus.vocab), "pseudo_labels": n_pseudo,
        "base_instances": count_base_instances(corpus.dataset, corpus.train_ids),
        "eta_training": eta, **scale,
        "losses": {k: _summary(r.get("epochs", [])) for k, r in records.items()},
        "throughput": {k: _throughput(r) for k, r in records.items() if r},
    }
    if cfg.teacher:
        summary["losses"]["teacher"] = teacher_previous.get("losses", {}).get("teacher", {})
        summary["teacher_from"] = str(cfg.teacher)
    extra = {"vocab": corpus.vocab, "eta": scale["eta"], "eta_training": eta, "noise_scale": scale["noise_scale"],
             "base_classes": list(BASE_CLASSES)}

    # 5. held-out evaluation
    if cfg.evaluate:
        from ovseg.train.methods.xpm_eval import evaluate_networks

        t0 = time.perf_counter()
        summary["evaluation"] = evaluate_networks(nets, corpus.dataset, TrainView(corpus), corpus.held_ids,
                                                  corpus.vocab, scale["eta"], models, cfg.long_side, progress)
        seconds["evaluation"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    summary["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    summary["torch"] = torch.__version__
    out = _save(cfg, nets, extra, summary)
    shutil.rmtree(resume_dir, ignore_errors=True)  # the run finished: nothing to resume
    return out


def _save(cfg: TrainConfig, nets: dict, extra: dict, summary: dict) -> Path:
    """Write into a fresh folder beside cfg.out, then swap it in (an interrupted run keeps the previous model)."""
    out = Path(cfg.out)
    with replaced_folder(out) as tmp:
        for name, net in nets.items():
            net.save(tmp / f"{name}.pt", extra)
        atomic_write_json(tmp / "config.json", {"train": asdict(cfg), "networks": sorted(nets), **extra})
        atomic_write_json(tmp / "training.json", summary)
    log.info("saved %s in %.0f s", out, summary["seconds"]["total"])
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coco", default="../shared/data/coco_dev", help="COCO folder (images/, instances.json, captions.json)")
    p.add_argument("--out", default="assets/checkpoints/xpm", help="model folder (replaced when done)")
    p.add_argument("--no-ablation", action="store_true", help="skip the student without noise estimation")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out instance mAP and reliability study")
    p.add_argument("--max-images", type=int, default=None, help="train on the first N training images (quick runs)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="train on this share of the training images (the data-scaling study: 0.25, 0.5, 1)")
    p.add_argument("--teacher-epochs", type=int, default=TrainConfig.teacher_epochs)
    p.add_argument("--student-epochs", type=int, default=TrainConfig.student_epochs)
    p.add_argument("--eta-epochs", type=int, default=TrainConfig.eta_epochs)
    p.add_argument("--batch-images", type=int, default=TrainConfig.batch_images,
                   help=f"global batch: images per step over all processes (default {TrainConfig.batch_images})")
    p.add_argument("--teacher", default=None,
                   help="reuse a trained teacher (path to a teacher.pt) and train only the students")
    add_scale_arguments(p, TrainConfig, features=True)


def run(args) -> Path | None:
    cfg = TrainConfig(coco_dir=args.coco, out=args.out, ablation=not args.no_ablation, evaluate=not args.no_eval,
                      max_images=args.max_images, fraction=args.fraction, teacher_epochs=args.teacher_epochs,
                      student_epochs=args.student_epochs, eta_epochs=args.eta_epochs,
                      batch_images=args.batch_images, teacher=args.teacher, device=args.device, amp=args.amp,
                      workers=args.workers, feature_cache=not args.no_feature_cache,
                      memory_cache_mb=args.memory_cache_mb, checkpoint_every=args.checkpoint_every,
                      resume=args.resume)
    return train(cfg)


register_trainer("xpm", "XPM's teacher, caption pseudo-labels and robust student", add_arguments, run,
                 distributed=True)
