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
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ovseg.core.models.backbone import input_size, preprocess
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


def image_features(models: Models, rgb: np.ndarray, long_side: int, flip: bool) -> dict:
    hw = input_size(rgb.shape[0], rgb.shape[1], long_side)
    x = preprocess(rgb, hw, models.device)
    if flip:
        x = x.flip(-1)
    with torch.no_grad():
        f = models.backbone(x)
    return {"c3": f.c3.half(), "c4": f.c4.half(), "c5": f.c5.half()}


def as_float(feats: dict) -> dict:
    return {k: v.float() for k, v in feats.items()}


def caption_nouns(dataset: CocoConceptDataset, image_id: int) -> list[str]:
    """Distinct object nouns (lemmas) of all the image's captions."""
    return list(dict.fromkeys(n.lemma for c in dataset.captions(image_id) for n in object_nouns(c)))


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
    """L_GT on one image: proposal loss + region classification (embedding head) + class-agnostic mask loss."""
    maps = net.proposal_maps(pyr)
    targets = proposal_targets(gt["boxes"], {s: tuple(m[0].shape[-2:]) for s, m in maps.items()}, net.cfg)
    l_rpn = proposal_loss(maps, targets)
    proposals, _ = net.proposals(pyr, input_hw, post_nms=cfg.proposals_train)
    rois = sample_rois(proposals, gt, cfg, input_hw, gen)
    scores = word_scores(net.embed(pyr, rois["boxes"]), base_vectors)
    l_cls = classification_loss(scores, rois["labels"])
    pos_boxes = rois["boxes"][: rois["n_pos"]]
    if len(pos_boxes):
        logits, _ = net.mask_and_noise(pyr, pos_boxes, with_noise=False)
        l_mask = mask_loss(logits, mask_targets(gt["masks"], pos_boxes, rois["gt_index"], net.cfg.mask_size))
    else:
        l_mask = scores.sum() * 0
    return l_rpn + l_cls + l_mask, {"proposal": l_rpn.item(), "classification": l_cls.item(), "mask": l_mask.item()}


# ------------------------------------------------------------------------------------------- training loops

def _optimizer(net: XPMNet, lr: float, weight_decay: float):
    return torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def fit_network(net: XPMNet, ids: list[int], step_loss, epochs: int, lr: float, cfg: TrainConfig, desc: str,
                progress: bool) -> list[dict]:
    """Shared loop: each step sums `step_loss(image_id, flip)` over `batch_images` images; cosine decay."""
    from tqdm import tqdm

    rng = random.Random(cfg.seed)
    opt = _optimizer(net, lr, cfg.weight_decay)
    steps = epochs * max(1, len(ids) // cfg.batch_images)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    history, step = [], 0
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress)
    net.train()
    for _ in range(epochs):
        order = ids[:]
        rng.shuffle(order)
        for k in range(0, len(order) - cfg.batch_images + 1, cfg.batch_images):
            opt.zero_grad(set_to_none=True)
            parts: dict[str, float] = {}
            total = 0.0
            for image_id in order[k:k + cfg.batch_images]:
                loss, info = step_loss(image_id, rng.random() < 0.5)
                (loss / cfg.batch_images).backward()
                total += loss.item() / cfg.batch_images
                for key, v in info.items():
                    parts[key] = parts.get(key, 0.0) + v / cfg.batch_images
            torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            opt.step()
            sched.step()
            step += 1
            history.append({"loss": total, **parts})
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}")
            if step >= steps:
                break
    bar.close()
    net.eval()
    return history


def train_teacher(data: dict, ids: list[int], base_vectors, cfg: TrainConfig, progress: bool) -> tuple[XPMNet, list]:
    torch.manual_seed(cfg.seed)
    net = XPMNet(XPMConfig(channels=cfg.channels, word_dim=base_vectors.shape[1], long_side=cfg.long_side))
    gen = torch.Generator().manual_seed(cfg.seed)

    def step(image_id, flip):
        d = data[image_id]
        pyr = net.pyramid(as_float(d["feats"][flip]))
        return gt_loss(net, pyr, d["gt"][flip], base_vectors, cfg, d["input_hw"], gen)

    return net, fit_network(net, ids, step, cfg.teacher_epochs, cfg.lr, cfg, "teacher (L_GT)", progress)


@torch.no_grad()
def pseudo_label(teacher: XPMNet, data: dict, ids: list[int], vocab: list[str], vocab_vectors: torch.Tensor,
                 cfg: TrainConfig, progress: bool) -> int:
    """Eq. 2 and 4 on every captioned training image: stores data[id]["pseudo"][flip] with the aligned boxes,
    the vocabulary index of each noun, the teacher's binarised 28x28 masks and the alignment scores."""
    from tqdm import tqdm

    index = {w: i for i, w in enumerate(vocab)}
    n = 0
    for image_id in tqdm(ids, desc="pseudo-labels", unit="img", disable=not progress):
        d = data[image_id]
        nouns = [w for w in d["nouns"] if w in index]
        if not nouns:
            d["pseudo"] = None
            continue
        pyr = teacher.pyramid(as_float(d["feats"][0]))
        boxes, _ = teacher.proposals(pyr, d["input_hw"], post_nms=cfg.proposals_align)
        if len(boxes) == 0:
            d["pseudo"] = None
            continue
        idx = torch.tensor([index[w] for w in nouns])
        scores = teacher.embed(pyr, boxes) @ vocab_vectors[idx].T  # (R, O)
        best_score, best = scores.max(dim=0)
        aligned = boxes[best]
        logits, _ = teacher.mask_and_noise(pyr, aligned)
        masks = logits >= 0
        W = d["input_hw"][1]
        d["pseudo"] = [{"boxes": aligned, "nouns": idx, "masks": masks, "scores": best_score},
                       {"boxes": flip_boxes(aligned, W), "nouns": idx, "masks": masks.flip(-1), "scores": best_score}]
        n += len(nouns)
    return n


@dataclass
class Corpus:
    """What the stages share: the split, each training image's features (plain and mirrored), base-class
    annotations and caption nouns, and the word vectors of the base classes and the caption vocabulary."""

    dataset: CocoConceptDataset
    train_ids: list[int]
    held_ids: list[int]
    data: dict[int, dict]  # image id -> {"input_hw", "feats": [plain, mirrored], "gt": [...], "nouns", "pseudo"}
    vocab: list[str]
    base_vectors: torch.Tensor
    vocab_vectors: torch.Tensor
    captioned: list[int]  # training images with a caption noun (after pseudo-labelling: with a pseudo label)


def train_student(teacher: XPMNet, corpus: Corpus, cfg: TrainConfig, ids: list[int], *, captioned: list[int],
                  robust: bool, eta: float | None, epochs: int, desc: str, progress: bool) -> tuple[XPMNet, list]:
    """The student g, initialised from the teacher, trained on the images `ids`: L_GT on base classes, and on
    the `captioned` ones L_M (eq. 6 if robust, else eq. 5) and L_X (eq. 3; weighted by alpha = eta / noise
    level if robust and eta is given)."""
    data, base_vectors, vocab_vectors = corpus.data, corpus.base_vectors, corpus.vocab_vectors
    torch.manual_seed(cfg.seed + 1)
    net = XPMNet(XPMConfig(**{**teacher.cfg.to_dict(), "noise": robust}))
    net.load_state_dict(teacher.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    with_pseudo = set(captioned)

    def step(image_id, flip):
        d = data[image_id]
        pyr = net.pyramid(as_float(d["feats"][flip]))
        loss, info = gt_loss(net, pyr, d["gt"][flip], base_vectors, cfg, d["input_hw"], gen)
        p = d.get("pseudo")
        if image_id in with_pseudo and p:
            p = p[flip]
            logits, variance = net.mask_and_noise(pyr, p["boxes"])
            emb = net.embed(pyr, p["boxes"])
            if robust:
                l_m = noisy_mask_loss(logits, variance, p["masks"], cfg.noise_samples).mean()
                noise = mean_noise(variance)
                alpha = reliability(noise, eta) if eta is not None else None
                info["noise_level"] = noise.mean().item()
            else:
                l_m, alpha = mask_loss(logits, p["masks"]), None
            l_x = cross_modal_loss(emb, vocab_vectors, p["nouns"], alpha)
            loss = loss + l_m + l_x
            info.update(pseudo_mask=l_m.item(), cross_modal=l_x.item())
        return loss, info

    return net, fit_network(net, ids, step, epochs, cfg.student_lr, cfg, desc, progress)


@torch.no_grad()
def pixel_noise(student: XPMNet, data: dict, ids: list[int]) -> dict[int, torch.Tensor]:
    """Each captioned image's pseudo masks' pixel noise variances (P, 28, 28) under `student`."""
    out = {}
    for image_id in ids:
        p = data[image_id].get("pseudo")
        if not p:
            continue
        pyr = student.pyramid(as_float(data[image_id]["feats"][0]))
        _, out[image_id] = student.mask_and_noise(pyr, p[0]["boxes"])
    return out


def noise_levels(student: XPMNet, data: dict, ids: list[int]) -> dict[int, torch.Tensor]:
    """Each captioned image's pseudo masks' noise levels (mean pixel noise, sec. 3.2.4) under `student`."""
    return {i: mean_noise(v) for i, v in pixel_noise(student, data, ids).items()}


def noise_display_scale(variances: list[torch.Tensor]) -> float:
    """The pixel noise variance shown as 1 in noise maps: the 99th percentile over the captioned set's pseudo
    masks (the noise map is (variance - floor) / (this - floor), clipped to [0, 1])."""
    return float(np.percentile(torch.cat([v.flatten() for v in variances]).numpy(), 99))


# ------------------------------------------------------------------------------------------- the run

def _summary(history: list[dict]) -> dict:
    if not history:
        return {}
    keys = history[0].keys()
    n = max(1, len(history) // 10)
    return {k: {"first": round(float(np.mean([h.get(k, 0) for h in history[:n]])), 4),
                "last": round(float(np.mean([h.get(k, 0) for h in history[-n:]])), 4)} for k in keys}


def split(cfg: TrainConfig, dataset: CocoConceptDataset) -> tuple[list[int], list[int]]:
    train_ids, held_ids = split_image_ids(dataset.image_ids, cfg.holdout_fraction, cfg.seed)
    train_ids = fraction_of(train_ids, cfg.fraction, cfg.seed)
    if cfg.max_images:  # a quick run: captioned images first
        train_ids = sorted(sorted(train_ids, key=lambda i: not dataset.captions(i))[: cfg.max_images])
        held_ids = sorted(held_ids, key=lambda i: not dataset.captions(i))[: max(2, cfg.max_images // 4)]
    return train_ids, held_ids


def build_corpus(cfg: TrainConfig, models: Models, progress: bool) -> Corpus:
    """Features, base-class annotations and caption nouns of every training image, and the word vectors."""
    from tqdm import tqdm

    dataset = CocoConceptDataset(cfg.coco_dir)
    train_ids, held_ids = split(cfg, dataset)
    data: dict[int, dict] = {}
    for image_id in tqdm(train_ids, desc="features", unit="img", disable=not progress):
        rgb = dataset.load_rgb(image_id)
        hw = input_size(rgb.shape[0], rgb.shape[1], cfg.long_side)
        gt = base_annotations(dataset, image_id, hw)
        data[image_id] = {"input_hw": hw,
                          "feats": [image_features(models, rgb, cfg.long_side, f) for f in (False, True)],
                          "gt": [gt, flip_annotations(gt, hw[1])], "nouns": caption_nouns(dataset, image_id)}
    vocab = sorted({w for i in train_ids for w in data[i]["nouns"]})
    if not vocab:
        raise ValueError(f"no caption with an object noun among the {len(train_ids)} training images of "
                         f"{cfg.coco_dir}: XPM needs captions.json")
    return Corpus(dataset=dataset, train_ids=train_ids, held_ids=held_ids, data=data, vocab=vocab,
                  base_vectors=models.embed_words(list(BASE_CLASSES)).float().cpu(),
                  vocab_vectors=models.embed_words(vocab).float().cpu(),
                  captioned=[i for i in train_ids if data[i]["nouns"]])


def teacher_network(corpus: Corpus, cfg: TrainConfig, progress: bool) -> tuple[XPMNet, list, dict]:
    """The teacher: trained here, or the `cfg.teacher` one reused. -> (teacher, loss history, the reused
    teacher's own training.json or {})"""
    if not cfg.teacher:
        teacher, history = train_teacher(corpus.data, corpus.train_ids, corpus.base_vectors, cfg, progress)
        return teacher, history, {}
    teacher, _ = XPMNet.load(cfg.teacher)
    previous = Path(cfg.teacher).with_name("training.json")
    log.info("reusing the teacher %s", cfg.teacher)
    return teacher, [], json.loads(previous.read_text()) if previous.is_file() else {}


def estimate_eta(teacher: XPMNet, corpus: Corpus, cfg: TrainConfig, progress: bool) -> tuple[float, list]:
    """Footnote 2: a robust student on a random half of the captioned set, then the smallest noise level it
    estimates over all of it. -> (eta, that student's loss history)"""
    captioned = corpus.captioned
    subset = sorted(random.Random(cfg.seed).sample(captioned, max(1, int(len(captioned) * cfg.eta_fraction))))
    eta_net, history = train_student(teacher, corpus, cfg, subset, captioned=subset, robust=True, eta=None,
                                     epochs=cfg.eta_epochs, desc="eta run (robust student, half the captions)",
                                     progress=progress)
    levels = noise_levels(eta_net, corpus.data, captioned)
    return float(torch.cat(list(levels.values())).min()), history


def reliability_scale(student: XPMNet, corpus: Corpus) -> dict:
    """The shipped reliability scale: eq. 7 with eta the smallest noise level of the final student over the
    captioned set (alpha <= 1 there); the noise-map display scale: the 99th percentile pixel noise."""
    final_pixels = pixel_noise(student, corpus.data, corpus.captioned)
    levels = torch.cat([mean_noise(v) for v in final_pixels.values()])
    return {"eta": float(levels.min()), "noise_scale": noise_display_scale(list(final_pixels.values())),
            "noise_levels": {"min": float(levels.min()), "median": float(levels.median()), "max": float(levels.max())}}


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """All stages of the module docstring; writes the model folder cfg.out (teacher.pt, student.pt,
    student_plain.pt, config.json, training.json)."""
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    models = Models("cpu")

    t0 = time.perf_counter()
    corpus = build_corpus(cfg, models, progress)
    seconds["features"] = time.perf_counter() - t0

    # 1. teacher on base classes
    t0 = time.perf_counter()
    teacher, teacher_hist, teacher_record = teacher_network(corpus, cfg, progress)
    if teacher_record:
        seconds["teacher_training"] = teacher_record.get("seconds", {}).get("teacher", 0.0)
    seconds["teacher"] = time.perf_counter() - t0

    # 2. cross-modal pseudo-labels of the caption nouns (eq. 2, 4)
    t0 = time.perf_counter()
    n_pseudo = pseudo_label(teacher, corpus.data, corpus.captioned, corpus.vocab, corpus.vocab_vectors, cfg, progress)
    corpus.captioned = [i for i in corpus.captioned if corpus.data[i].get("pseudo")]
    seconds["pseudo_labels"] = time.perf_counter() - t0

    # 3. eta (footnote 2)
    t0 = time.perf_counter()
    eta, eta_hist = estimate_eta(teacher, corpus, cfg, progress)
    seconds["eta"] = time.perf_counter() - t0

    # 4. the robust student, and the student without noise estimation for the ablation
    t0 = time.perf_counter()
    student, student_hist = train_student(teacher, corpus, cfg, corpus.train_ids, captioned=corpus.captioned,
                                          robust=True, eta=eta, epochs=cfg.student_epochs, desc="robust student",
                                          progress=progress)
    seconds["student"] = time.perf_counter() - t0
    nets = {"teacher": teacher, "student": student}
    hists = {"teacher": teacher_hist, "student": student_hist, "eta_run": eta_hist}
    if cfg.ablation:
        t0 = time.perf_counter()
        nets["student_plain"], hists["student_plain"] = train_student(
            teacher, corpus, cfg, corpus.train_ids, captioned=corpus.captioned, robust=False, eta=None,
            epochs=cfg.student_epochs, desc="student without noise estimation", progress=progress)
        seconds["student_plain"] = time.perf_counter() - t0

    scale = reliability_scale(student, corpus)
    summary = {
        "images": {"train": len(corpus.train_ids), "held_out": len(corpus.held_ids),
                   "captioned": len(corpus.captioned)},
        "vocabulary": len(corpus.vocab), "pseudo_labels": n_pseudo,
        "base_instances": int(sum(len(corpus.data[i]["gt"][0]["labels"]) for i in corpus.train_ids)),
        "eta_training": eta, **scale,
        "losses": {k: _summary(v) for k, v in hists.items()},
    }
    if cfg.teacher:
        summary["losses"]["teacher"] = teacher_record.get("losses", {}).get("teacher", {})
        summary["teacher_from"] = str(cfg.teacher)
    extra = {"vocab": corpus.vocab, "eta": scale["eta"], "eta_training": eta, "noise_scale": scale["noise_scale"],
             "base_classes": list(BASE_CLASSES)}

    # 5. held-out evaluation
    if cfg.evaluate:
        from ovseg.train.methods.xpm_eval import evaluate_networks

        t0 = time.perf_counter()
        summary["evaluation"] = evaluate_networks(nets, corpus.dataset, corpus.train_ids, corpus.held_ids,
                                                  corpus.data, corpus.vocab, scale["eta"], models, cfg.long_side,
                                                  progress)
        seconds["evaluation"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    summary["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    summary["torch"] = torch.__version__
    return _save(cfg, nets, extra, summary)


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
    p.add_argument("--teacher", default=None,
                   help="reuse a trained teacher (path to a teacher.pt) and train only the students")


def run(args) -> Path:
    cfg = TrainConfig(coco_dir=args.coco, out=args.out, ablation=not args.no_ablation, evaluate=not args.no_eval,
                      max_images=args.max_images, fraction=args.fraction, teacher_epochs=args.teacher_epochs,
                      student_epochs=args.student_epochs, eta_epochs=args.eta_epochs, teacher=args.teacher)
    return train(cfg)


register_trainer("xpm", "XPM's teacher, caption pseudo-labels and robust student", add_arguments, run)
