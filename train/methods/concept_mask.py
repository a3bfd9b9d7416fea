"""`ovseg train concept_mask`: the three training stages of Concept Mask (ECCV 2018, sec. 4, supplementary 2-5)
on the training images of a COCO folder (DESIGN.md's split: base-class annotations only).

0. Tag corpus: per training image, its base-class labels, its captions' object nouns and the classifier's
   confident ImageNet predictions (pseudo-tags). PMI word vectors (supplementary 2.1), idf weights, and an
   affine map from the text encoder's space into the PMI space fitted on the vocabulary (for any other word).
1. Embedding network: globally pooled backbone features -> 3 x (fc, BN, ReLU) -> visual embedding, cosine loss
   to the image's soft topic embedding (sec. 4.1); then turned into 1x1 convolutions (eq. 1).
2. Refinement: two 1x1 convolutions + sigmoid over the V coarse maps, trained with the box loss on the base
   classes' boxes, the matching loss on the top-N coarse maps (eq. 2) and the spatial discrimination loss with
   the overlap-ratio matrix of base-class masks (eq. 3-4); the embedding network is fine-tuned with it.
   theta (sec. 4.4) is chosen on the held-out images with base classes left out in turn; the presence
   threshold (supplementary 5) on the held-out images' base classes (best F1).
3. Label-agnostic segmentation network: `ClassAgnosticSegmenter` with two attention channels (the attention
   maps of the image at two input sizes), trained on base-class masks.
Stand-ins: EfficientNet-Lite0 (frozen) for ResNet-50, coco_dev's ~370 training images for Stock-18K, OIVG-750
and COCO-80, and the project's segmenter (ASPP head + low-level branch) for the Inception-V2 streams.

Scale: the backbone features go through the on-disk feature cache and a bounded memory layer (`FeatureStore`;
under torchrun each process computes every N-th image's); stage 2 (and its cross-fitted copies) and stage 3 run
on the scalable loop (`ovseg.train.scale.loop`): one CPU, a GPU or N processes, each taking its share of every
global batch, resumable from `<out>.resume/<network>.pt`. Stage 1 is a small fit on pooled vectors that every
process runs whole (the same network everywhere). Rank 0 chooses theta and the thresholds and writes.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import logging
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.core.models.backbone import input_size, preprocess
from ovseg.core.cache import atomic_write_json, replaced_folder
from ovseg.core.models.caption_nouns import object_nouns
from ovseg.core.methods.concept_mask.attention import AttentionNet
from ovseg.core.methods.concept_mask.losses import (C_MATCH, N_TOP, box_loss, gamma_weights, matching_loss,
                                                    overlap_ratio, spatial_discrimination_loss)
from ovseg.core.methods.concept_mask.embedding_net import EmbeddingNet, cosine_embedding_loss, normalise_maps
from ovseg.core.models.imagenet import imagenet_classes
from ovseg.core.methods.base import upsample_map
from ovseg.core.ops.metrics import best_f1_threshold, mask_iou, soft_iou
from ovseg.core.models import Models
from ovseg.core.methods.concept_mask.pmi import TagEmbedding, fit_linear_map, idf, pmi_embedding, pmi_matrix, soft_topic
from ovseg.core.ops.segmenter import SegmenterConfig, foreground_probability, save_segmenter
from ovseg.train.coco import (HOLDOUT_FRACTION, SPLIT_SEED, BASE_CLASSES, CocoConceptDataset,
                              assert_no_target_annotations, base_training_pairs, fraction_of, split_image_ids, training_mask)
from ovseg.train.segmenter_fit import fit_segmenter, loss_summary, resized_target, training_sample
from ovseg.train.registry import register_trainer
from ovseg.train.scale import dist
from ovseg.train.scale.cli import add_scale_arguments
from ovseg.train.scale.dist import Context, all_reduce_sum
from ovseg.train.scale.features import FrozenFeatures
from ovseg.train.scale.loop import LoopConfig, fit, shuffled_batches

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    coco_dir: str
    out: str
    # The paper's two attention input sizes, 300 and 700 for a 224 px segmentation input, scaled to this
    # backbone's 448 px predictor input (long sides, multiples of 32).
    scales: tuple[int, ...] = (320, 704)
    seg_long_side: int = 448
    train_size: int = 320
    min_tag_images: int = 2  # a tag must occur in at least this many training images
    pseudo_tag_prob: float = 0.2  # ImageNet predictions at least this probable become tags
    pmi_dim: int = 128
    text_map_ridge: float = 1.0
    hidden: int = 512
    embed_epochs: int = 60
    embed_batch: int = 64
    embed_lr: float = 1e-3
    refine_bottleneck: int = 128
    refine_epochs: int = 4
    refine_batch: int = 8
    refine_lr: float = 1e-3
    match_top_n: int = N_TOP
    match_c: float = C_MATCH
    spatial_discrimination: bool = True
    theta_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    seg_epochs: int = 5
    seg_batch: int = 8
    seg_lr: float = 1e-3
    priors_to_head: bool = True
    # The paper fine-tunes the embedding network in stage 2; on ~370 images that erases what it knew of the
    # words without boxes (the target classes: pointing game 0.28 -> 0.14, presence AP 0.44 -> 0.16; see the
    # README), as c = 1e-6 leaves the matching loss no weight. Off by default, measured both ways.
    finetune_embedding: bool = False
    cross_fit: bool = True  # the segmenter trains on attention maps from networks that did not see the image
    weight_decay: float = 1e-4
    holdout_fraction: float = HOLDOUT_FRACTION
    seed: int = SPLIT_SEED
    ablation: bool = True  # also train the noSD attention, keep the stage-1 network, train the single-scale segmenter
    max_images: int | None = None
    fraction: float = 1.0  # the data-scaling study: this share of the training images (nested shares)
    # the scalable loop (`ovseg.train.scale`)
    device: str = "auto"
    amp: str = "auto"
    workers: int = 0
    feature_cache: bool = True  # backbone features on disk (~/.cache/ovseg/features), read per sample
    memory_cache_mb: int = 2048  # per process, over the disk cache
    checkpoint_every: int = 20  # steps between training-state checkpoints (<out>.resume/)
    resume: bool = False
    calibrate: bool = True  # concept verification's calibration on the held-out base classes (verification.json)

    def __post_init__(self):
        self.scales = tuple(int(s) for s in self.scales)
        self.theta_grid = tuple(float(t) for t in self.theta_grid)
        if len(self.scales) != 2 or any(s % 32 or s < 64 for s in self.scales):
            raise ValueError(f"scales must be two multiples of 32 (>= 64), got {self.scales}")


# ---------------------------------------------------------------------------------------------- corpus

def pseudo_tags(probs: torch.Tensor, min_prob: float) -> list[str]:
    """The names of the ImageNet classes the classifier gives at least `min_prob`, lower case."""
    names = imagenet_classes()
    return [names[int(i)].name.lower() for i in torch.nonzero(probs >= min_prob).flatten()]


def image_tags(dataset: CocoConceptDataset, image_id: int, probs: torch.Tensor, min_prob: float) -> list[str]:
    """An image's tags: base-class labels (never a target class: those are read from the captions only, as
    any word is), caption object nouns, ImageNet pseudo-tags. Distinct, in that order."""
    labels = [n for n in dataset.classes_present(image_id) if n in BASE_CLASSES]
    assert_no_target_annotations(labels)
    nouns = [n.lemma for c in dataset.captions(image_id) for n in object_nouns(c)]
    return list(dict.fromkeys(labels + nouns + pseudo_tags(probs, min_prob)))


def build_tag_embedding(docs: list[list[str]], cfg: TrainConfig, models: Models) -> tuple[TagEmbedding, dict]:
    """Vocabulary (tags in >= min_tag_images documents, plus every base class that occurs), PMI vectors,
    idf, and the text-encoder map (fitted on the vocabulary, ridge `text_map_ridge`)."""
    counts = Counter(t for doc in docs for t in set(doc))
    vocab = sorted(t for t, c in counts.items() if c >= cfg.min_tag_images or (t in BASE_CLASSES and c >= 1))
    m = pmi_matrix(docs, vocab)
    dim = min(cfg.pmi_dim, len(vocab))
    vectors = pmi_embedding(m, dim)
    text = models.embed_words(vocab).cpu().numpy().astype(np.float64)
    text_map = fit_linear_map(text, vectors, ridge=cfg.text_map_ridge)
    fitted = text @ text_map[:-1] + text_map[-1]
    cos = np.sum(fitted * vectors, 1) / (np.linalg.norm(fitted, axis=1) * np.linalg.norm(vectors, axis=1) + 1e-12)
    tags = TagEmbedding(vocab=vocab, vectors=vectors, idf=idf(docs, vocab), text_map=text_map)
    return tags, {"vocabulary": len(vocab), "dim": dim, "documents": len(docs),
                  "text_map_train_cosine": round(float(np.mean(cos)), 4)}


# -------------------------------------------------------------------------------------------- features

def _scaled_features(models: Models, rgb: np.ndarray, long_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """head features (1280, h, w) of the image and of its mirror image, float16, at this long side."""
    x = preprocess(rgb, input_size(rgb.shape[0], rgb.shape[1], long_side), models.device)
    with torch.no_grad():
        heads = models.backbone(torch.cat([x, x.flip(-1)])).head.float()
    return heads[0].half().cpu(), heads[1].half().cpu()


def box_grid(boxes: list[list[float]], image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """(h, w) float 0/1: the grid cells at least half covered by a box (x, y, w, h in image pixels), and for
    each box the cell with the most coverage, so that no box vanishes (G of eq. 2 at the map's resolution)."""
    H, W = image_hw
    h, w = grid_hw
    full = torch.zeros((H, W))
    out = torch.zeros((h, w))
    for x0, y0, bw, bh in boxes:
        one = torch.zeros((H, W))
        one[int(y0):int(np.ceil(y0 + bh)), int(x0):int(np.ceil(x0 + bw))] = 1.0
        cover = F.adaptive_avg_pool2d(one[None, None], (h, w))[0, 0]
        out[divmod(int(cover.argmax()), w)] = 1.0
        full = torch.maximum(full, one)
    cover = F.adaptive_avg_pool2d(full[None, None], (h, w))[0, 0]
    return torch.maximum(out, (cover >= 0.5).float())


def base_boxes(dataset: CocoConceptDataset, image_id: int) -> dict[str, list[list[float]]]:
    """{base class: [x, y, w, h] of its non-crowd instances}; no annotation of another class is kept."""
    out: dict[str, list] = {}
    for ann in dataset.annotations(image_id):
        name = dataset._cat_name[ann["category_id"]]
        if name in BASE_CLASSES and not ann.get("iscrowd", 0):
            out.setdefault(name, []).append(list(ann["bbox"]))
    assert_no_target_annotations(list(out))
    return out


# -------------------------------------------------------------------------------------------- stage 1

def train_embedding(pooled: torch.Tensor, topics: torch.Tensor, cfg: TrainConfig, progress: bool):
    """Stage 1 (sec. 4.1): EmbeddingNet on pooled features (N, C) toward soft topics (N, D). -> net, losses"""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = EmbeddingNet(pooled.shape[1], cfg.hidden, topics.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.embed_lr, weight_decay=cfg.weight_decay)
    losses = []
    net.train()
    for _ in tqdm(range(cfg.embed_epochs), desc="stage 1: embedding", unit="epoch", disable=not progress):
        order = torch.randperm(len(pooled), generator=g)
        epoch = []
        for b in range(0, len(order), cfg.embed_batch):
            idx = order[b : b + cfg.embed_batch]
            if len(idx) < 2:
                continue
            loss = cosine_embedding_loss(net(pooled[idx]), topics[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch.append(loss.item())
        losses.append(float(np.mean(epoch)))
    return net.eval(), losses


# -------------------------------------------------------------------------------------------- stage 2

class _Refining(torch.nn.Module):
    """The attention network as stage 2 trains it: the embedding's batch-norm statistics stay frozen (they were
    estimated on pooled features) whatever mode the loop sets."""

    def __init__(self, att: AttentionNet):
        super().__init__()
        self.att = att

    def train(self, mode: bool = True):
        super().train(mode)
        self.att.embed.eval()
        return self


class _KeySource:
    """Stage 2's samples as the scalable loop reads them: item(index, epoch) -> (key, sample)."""

    def __init__(self, keys: list, read):
        self.keys, self.read = keys, read

    def __len__(self) -> int:
        return len(self.keys)

    def item(self, index: int, epoch: int):
        return self.read(self.keys[index])


def refinement_plan(n: int, epochs: int, batch_size: int, seed: int) -> list[list[list[int]]]:
    """Every epoch's batches of sample indices, in the order stage 2 has always drawn them: a shuffle per epoch
    from random.Random(seed), batches of `batch_size`, the last one smaller. The same plan in every process."""
    if n == 0:
        raise ValueError("stage 2 has no training sample: no training image has a base-class box")
    return shuffled_batches(n, epochs, batch_size, seed)


def _refinement_step(ctx: Context, original: AttentionNet, gamma: torch.Tensor, box_concepts: list[int],
                     cfg: TrainConfig, spatial: bool):
    """The loss of a process's share of a batch: the sum of its samples' losses over the global batch's size
    (one process: the batch mean, as stage 2 has always had it)."""
    n_sel = min(cfg.match_top_n, original.dims["vocab"])
    gamma = gamma.to(ctx.device)

    def step(model, batch, epoch):
        att, dev = model.att, ctx.device
        losses = []
        for s in batch:
            head = s["head"].to(dev).float()[None]
            with torch.no_grad():
                coarse0 = normalise_maps(original.coarse(original.dense(head)))
            logits = att.refined_logits(att.coarse(att.dense(head)))
            ids = list(s["boxes"])
            g = torch.stack([s["boxes"][k] for k in ids]).to(dev)
            loss = box_loss(logits[0, ids], g)
            loss = loss + cfg.match_c * n_sel * matching_loss(logits, coarse0, cfg.match_top_n)
            if spatial:
                gt = torch.zeros_like(logits)
                gt[0, ids] = g
                present = torch.zeros(logits.shape[:2], dtype=torch.bool, device=dev)
                present[0, ids] = True
                loss = loss + spatial_discrimination_loss(logits, gt, present, gamma)
            losses.append(loss)
        count = torch.tensor([float(len(batch))], device=dev)
        if ctx.distributed:
            count = all_reduce_sum(count)
        if losses:
            total = torch.stack(losses).sum() / count[0]
        else:  # an empty share: a zero loss that still reaches the parameters (their gradients are summed)
            total = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        logged = total.detach().reshape(1).clone()
        if ctx.distributed:
            logged = all_reduce_sum(logged)
        return total, {"total": float(logged[0])}

    return step


def train_refinement(att: AttentionNet, original: AttentionNet, keys: list, read, gamma: torch.Tensor,
                     box_concepts: list[int], cfg: TrainConfig, spatial: bool, progress: bool,
                     ctx: Context | None = None, checkpoint: str | None = None) -> list[float]:
    """Stage 2 (sec. 4.2): refinement from scratch, and embedding fine-tuning when cfg.finetune_embedding (BN
    statistics frozen: they were estimated on pooled features). `read(key)` gives a sample {"head": (C, h, w),
    "boxes": {concept index: (h, w) G}}. Loss per sample: box loss over its box concepts + c * N_sel * matching
    loss (eq. 2: the paper sums the matching term over the N selected maps; ours is a mean) [+ spatial
    discrimination loss]; a batch's loss is its samples' mean. On the scalable loop (`ovseg.train.scale.loop`):
    batches of `refinement_plan`, each process its share, `checkpoint` and cfg.resume as in LoopConfig.
    -> the global batch loss per step"""
    ctx = ctx or Context()
    att.to(ctx.device)
    original.to(ctx.device).eval()
    dist.broadcast_state(original)  # stage 1 ran in every process: rank 0's network everywhere
    params = (list(att.embed.parameters()) if cfg.finetune_embedding else []) + list(att.refine.parameters())
    att.embed.requires_grad_(cfg.finetune_embedding)
    opt = torch.optim.AdamW(params, lr=cfg.refine_lr, weight_decay=cfg.weight_decay)
    plan = refinement_plan(len(keys), cfg.refine_epochs, cfg.refine_batch, cfg.seed)
    loop = LoopConfig(epochs=cfg.refine_epochs, batch_size=cfg.refine_batch, seed=cfg.seed, workers=cfg.workers,
                      amp=cfg.amp, checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every, resume=cfg.resume,
                      desc="stage 2: refinement" + ("" if spatial else " (no SD)"), progress=progress and ctx.main)
    record = fit(_Refining(att), opt, None, _KeySource(keys, read),
                 _refinement_step(ctx, original, gamma, box_concepts, cfg, spatial), loop, ctx,
                 collate=list, plan=lambda epoch: plan[epoch])
    return record["step_totals"]


def choose_theta(att: AttentionNet, tags: TagEmbedding, refined: list[str], held: list[dict], grid) -> dict:
    """Sec. 4.4's theta, chosen without any target class: each base class q of a held-out image is treated
    as a concept without boxes; its attention is theta * its coarse map + (1 - theta) * the refined map of
    its nearest *other* refined concept; the theta with the best mean soft IoU (eq. 5) against q's mask."""
    idx = [tags.index[n] for n in refined]
    unit = F.normalize(torch.from_numpy(tags.vectors[idx]).float(), dim=1)
    scores = {t: [] for t in grid}
    with torch.no_grad():
        for s in held:
            maps = att.maps(s["head"][None])
            coarse, ref = maps["coarse"][0], maps["refined"][0]
            for name, mask in s["masks"].items():
                q = refined.index(name)
                sims = unit @ unit[q]
                sims[q] = -2.0
                p = idx[int(sims.argmax())]
                a_q = normalise_maps(coarse[tags.index[name]])
                a_p = normalise_maps(ref[p])
                for t in grid:
                    blend = normalise_maps(t * a_q + (1 - t) * a_p)
                    scores[t].append(soft_iou(upsample_map(blend, mask.shape), mask))
    means = {t: float(np.mean(v)) if v else 0.0 for t, v in scores.items()}
    return {"theta": max(means, key=means.get), "soft_iou_by_theta": {str(t): round(v, 4) for t, v in means.items()}}


def choose_presence_threshold(att: AttentionNet, tags: TagEmbedding, held: list[dict], refined: list[str]) -> dict:
    """Supplementary 5 with one threshold for all concepts, kept in config.json (the method uses it only for a
    model without verification.json; `calibrate_verification` fits the per-concept ones): verification scores
    of every refined concept on every held-out image, positives the base classes present; the threshold with
    the best F1."""
    scores, labels = [], []
    with torch.no_grad():
        for s in held:
            head = s["head"].float()[None]
            ref = att.maps(head)["refined"][0]
            for name in refined:
                k = tags.index[name]
                w = torch.from_numpy(tags.vectors[k]).float()
                scores.append(float(att.verification(head, normalise_maps(ref[k])[None], w)[0]))
                labels.append(name in s["masks"])
    scores, labels = np.array(scores), np.array(labels)
    threshold, f1 = best_f1_threshold(scores, labels)
    return {"presence_threshold": threshold, "presence_f1_held_out_base": round(f1, 4),
            "positives": int(labels.sum()), "negatives": int((~labels).sum())}


MASK_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)


def choose_mask_threshold(model, att: AttentionNet, dataset, held_ids, feats, tags, cfg: TrainConfig,
                          channels: int) -> dict:
    """The threshold on the segmenter's foreground probability with the best mean IoU over the held-out
    images' base-class pairs (each class's own mask: crowd regions ignored, every other pixel background)."""
    model.eval()
    ious = {t: [] for t in MASK_THRESHOLDS}
    with torch.no_grad():
        for image_id in held_ids:
            names = [n for n in dataset.classes_present(image_id) if n in BASE_CLASSES and n in tags.index]
            if not names:
                continue
            rgb = dataset.load_rgb(image_id)
            x = preprocess(rgb, input_size(rgb.shape[0], rgb.shape[1], cfg.seg_long_side), torch.device("cpu"))
            refined = [att.maps(feats[image_id]["scales"][s][0][None])["refined"][0] for s in cfg.scales][-channels:]
            for name in names:
                maps = [F.interpolate(normalise_maps(r[tags.index[name]])[None, None], size=x.shape[-2:],
                                      mode="bilinear", align_corners=False) for r in refined]
                prob = foreground_probability(model(torch.cat([x] + maps, dim=1)))[0]
                prob = F.interpolate(prob[None, None], size=rgb.shape[:2], mode="bilinear", align_corners=False)[0, 0]
                target = training_mask(dataset, image_id, name)
                prob = prob.numpy()
                for t in MASK_THRESHOLDS:
                    ious[t].append(mask_iou(prob >= t, target == 1, target != 255))
    means = {t: float(np.mean(v)) if v else 0.0 for t, v in ious.items()}
    return {"threshold": max(means, key=means.get), "held_out_base_iou_by_threshold": {str(t): round(v, 4)
                                                                                     for t, v in means.items()}}


# -------------------------------------------------------------------------------------------- training

@dataclass
class Corpus:
    """What the stages share: the split, each image's backbone features (per scale, with its mirror), the tag
    embedding, and the inputs of stages 1 and 2."""

    dataset: CocoConceptDataset
    train_ids: list[int]
    held_ids: list[int]
    feats: FeatureStore  # image id -> {"hw", "scales": {long side: (head, mirrored head)}, "tags" (training)}
    tags: TagEmbedding
    tag_summary: dict
    refined: list[str]  # the base classes in the vocabulary: the concepts refinement learns from boxes
    pooled: dict[int, list]  # stage 1: image id -> [(pooled features, soft topic)] per scale and mirror
    samples: dict[int, list]  # stage 2: image id -> [(image id, scale, mirror)] (`stage2_sample` reads one)
    overlap: np.ndarray  # O(i, j) of the base-class masks
    gamma: torch.Tensor  # eq. 4's weights

    @property
    def refined_idx(self) -> list[int]:
        return [self.tags.index[n] for n in self.refined]


def split(cfg: TrainConfig, dataset: CocoConceptDataset) -> tuple[list[int], list[int]]:
    train_ids, held_ids = split_image_ids(dataset.image_ids, cfg.holdout_fraction, cfg.seed)
    train_ids = fraction_of(train_ids, cfg.fraction, cfg.seed)
    if cfg.max_images:
        train_ids, held_ids = train_ids[: cfg.max_images], held_ids[: max(2, cfg.max_images // 4)]
    return train_ids, held_ids


class FeatureStore(FrozenFeatures):
    """image id -> {"hw", "scales": {long side: (head, mirrored head)}, "tags" (training images)}, the heads
    (float16, CPU) read per call through the on-disk feature cache (keyed by the backbone's weights, the long
    sides and the image's bytes) and a bounded memory layer (`FrozenFeatures`), so a large dataset streams.
    `info`: each image's size and tags (small, held)."""

    def __init__(self, dataset: CocoConceptDataset, scales: tuple[int, ...], info: dict[int, dict],
                 feature_cache: bool = True, memory_cache_mb: int = 2048, models: Models | None = None):
        super().__init__(dataset, "concept_mask", feature_cache, memory_cache_mb, models)
        self.scales, self.info = tuple(scales), info

    def heads(self, image_id: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        def compute():
            rgb = self.dataset.load_rgb(image_id)
            out = {}
            for s in self.scales:
                plain, mirror = _scaled_features(self.models, rgb, s)
                out[f"{s}"], out[f"{s}_mirror"] = plain.numpy(), mirror.numpy()
            return out

        def cached():
            arrays = self.cached(image_id, "concept_mask", (self.scales,), compute)
            return {s: (torch.from_numpy(arrays[f"{s}"]), torch.from_numpy(arrays[f"{s}_mirror"]))
                    for s in self.scales}

        return self.remember(image_id, cached)

    def __getitem__(self, image_id: int) -> dict:
        return {**self.info[image_id], "scales": self.heads(image_id)}


def extract_features(dataset, train_ids, held_ids, cfg: TrainConfig, models: Models, progress: bool,
                     ctx: Context | None = None) -> FeatureStore:
    """Each image's size and (training images) tags, and its backbone features at each attention scale into the
    store's caches: under torchrun each process does every N-th image and the sizes and tags are gathered."""
    from tqdm import tqdm

    ctx = ctx or Context()
    store = FeatureStore(dataset, cfg.scales, {}, cfg.feature_cache, cfg.memory_cache_mb, models)
    training = set(train_ids)
    mine = (train_ids + held_ids)[ctx.rank :: ctx.world]
    info: dict[int, dict] = {}
    for image_id in tqdm(mine, desc="features", unit="img", disable=not progress):
        rgb = dataset.load_rgb(image_id)
        entry = {"hw": tuple(rgb.shape[:2])}
        if cfg.feature_cache or ctx.world == 1:
            store.info[image_id] = entry
            store.heads(image_id)  # computed once here (from this decoded image's file), then read
        if image_id in training:
            x = preprocess(rgb, input_size(rgb.shape[0], rgb.shape[1], cfg.seg_long_side), models.device)
            with torch.no_grad():
                probs = torch.softmax(models.backbone(x).logits[0].float(), 0)
            entry["tags"] = image_tags(dataset, image_id, probs, cfg.pseudo_tag_prob)
        info[image_id] = entry
    for part in dist.gather_objects(info):
        store.info.update(part)
    return store


def stage1_inputs(feats: dict, train_ids: list[int], tags: TagEmbedding) -> dict[int, list]:
    """Pooled features of every (image, scale, mirror), each toward its image's soft topic embedding."""
    pooled: dict[int, list] = {}
    for image_id in train_ids:
        t = soft_topic(feats[image_id]["tags"], tags.index, tags.vectors, tags.idf)
        if np.any(t):
            topic = torch.from_numpy(t).float()
            pooled[image_id] = [(head.float().mean(dim=(1, 2)), topic)
                                for pair in feats[image_id]["scales"].values() for head in pair]
    return pooled


def stage2_inputs(dataset, feats: FeatureStore, train_ids: list[int], tags: TagEmbedding
                  ) -> tuple[dict[int, list], np.ndarray]:
    """The stage-2 samples: every (training image, scale, mirror) with a base-class box, as keys that
    `stage2_sample` reads, and the overlap ratio O(i, j) of the base-class masks (at 1/4 size)."""
    samples: dict[int, list] = {}
    masks_small = []
    for image_id in train_ids:
        boxes = base_boxes(dataset, image_id)
        if not boxes:
            continue
        samples[image_id] = [(image_id, s, mirror) for s in feats.scales for mirror in (0, 1)]
        small = {}
        for name in boxes:
            if name in tags.index:
                m = torch.from_numpy((training_mask(dataset, image_id, name) == 1).astype(np.float32))
                small[tags.index[name]] = F.interpolate(m[None, None], scale_factor=0.25,
                                                        mode="area")[0, 0].numpy() >= 0.5
        masks_small.append(small)
    return samples, overlap_ratio(masks_small, len(tags.vocab))


def stage2_sample(corpus: "Corpus", key: tuple[int, int, int]) -> dict:
    """One stage-2 sample: {"head": (C, h, w) float16, "boxes": {concept index: (h, w) box grid G}}, the grids
    mirrored with a mirrored head."""
    image_id, scale, mirror = key
    head = corpus.feats.heads(image_id)[scale][mirror]
    grid = tuple(head.shape[-2:])
    hw = corpus.feats.info[image_id]["hw"]
    g = {corpus.tags.index[n]: box_grid(b, hw, grid) for n, b in base_boxes(corpus.dataset, image_id).items()
         if n in corpus.tags.index}
    if mirror:
        g = {k: v.flip(-1) for k, v in g.items()}
    return {"head": head, "boxes": g}


def build_corpus(cfg: TrainConfig, models: Models, progress: bool, ctx: Context | None = None
                 ) -> tuple[Corpus, float]:
    """The split, the features, the tag embedding and the stage inputs. -> (corpus, seconds of features)"""
    dataset = CocoConceptDataset(cfg.coco_dir)
    train_ids, held_ids = split(cfg, dataset)
    t0 = time.perf_counter()
    feats = extract_features(dataset, train_ids, held_ids, cfg, models, progress, ctx)
    feature_seconds = time.perf_counter() - t0
    tags, tag_summary = build_tag_embedding([feats[i]["tags"] for i in train_ids], cfg, models)
    samples, overlap = stage2_inputs(dataset, feats, train_ids, tags)
    corpus = Corpus(dataset=dataset, train_ids=train_ids, held_ids=held_ids, feats=feats, tags=tags,
                    tag_summary=tag_summary, refined=[n for n in BASE_CLASSES if n in tags.index],
                    pooled=stage1_inputs(feats, train_ids, tags), samples=samples, overlap=overlap,
                    gamma=torch.from_numpy(gamma_weights(overlap)).float())
    return corpus, feature_seconds


def fit_attention(corpus: Corpus, cfg: TrainConfig, ids: list[int], variants: list[tuple[str, bool]],
                  progress: bool, ctx: Context | None = None, stage: str = ""
                  ) -> tuple[AttentionNet, dict[str, AttentionNet], dict[str, list[float]]]:
    """Stages 1 and 2 on the images `ids`; `variants`: [(name, spatial discrimination loss on?)]; each variant's
    training state in <out>.resume/<stage><name>.pt. Every process runs stage 1 whole and its share of stage 2.
    -> (stage-1 network, {variant: refined network}, {"stage1" and each variant: losses})"""
    ids = set(ids)
    data = [x for i in sorted(ids & set(corpus.pooled)) for x in corpus.pooled[i]]
    embed_fc, embed_losses = train_embedding(torch.stack([d[0] for d in data]), torch.stack([d[1] for d in data]),
                                             cfg, progress)
    vocab_vectors = torch.from_numpy(corpus.tags.vectors).float()
    original = AttentionNet(vocab_vectors, cfg.hidden, cfg.refine_bottleneck)
    original.embed.load_state_dict(embed_fc.to_conv().state_dict())
    original.eval()
    subset = [x for i in sorted(ids & set(corpus.samples)) for x in corpus.samples[i]]
    nets, losses = {}, {"stage1": embed_losses}
    for name, spatial in variants:
        torch.manual_seed(cfg.seed)
        att = copy.deepcopy(original)
        att.refine = type(att.refine)(len(corpus.tags.vocab), cfg.refine_bottleneck)
        losses[name] = train_refinement(att, original, subset, functools.partial(stage2_sample, corpus), corpus.gamma,
                                        corpus.refined_idx, cfg, spatial, progress, ctx,
                                        _stage_checkpoint(cfg, f"{stage}{name}"))
        nets[name] = att.eval()
    return original, nets, losses


def held_out_samples(corpus: Corpus, scale: int) -> list[dict]:
    """The held-out images at one input size with their base-class masks: theta and the presence threshold are
    chosen on them."""
    held = []
    for image_id in corpus.held_ids:
        names = [n for n in corpus.dataset.classes_present(image_id) if n in BASE_CLASSES and n in corpus.tags.index]
        assert_no_target_annotations(names)
        held.append({"head": corpus.feats[image_id]["scales"][scale][0],
                     "masks": {n: training_mask(corpus.dataset, image_id, n) == 1 for n in names}})
    return held


def cross_fitted_networks(corpus: Corpus, cfg: TrainConfig, att: AttentionNet, pairs, ctx: Context | None = None
                          ) -> dict[int, AttentionNet]:
    """The attention network whose maps each training image's segmenter pairs get. The main network has seen
    every training image's boxes, so its maps there are better than on new images, and a segmenter trained on
    them learns to trust them too much. Cross-fitting: each image gets the maps of a network trained on the
    other half of the images."""
    net_for: dict[int, AttentionNet] = {i: att for i, _ in pairs}
    if cfg.cross_fit and len(corpus.train_ids) >= 4:
        order = np.random.default_rng(cfg.seed).permutation(sorted(corpus.train_ids))
        halves = [set(order[: len(order) // 2].tolist()), set(order[len(order) // 2 :].tolist())]
        for k, half in enumerate(halves):
            other = sorted(set(corpus.train_ids) - half)
            net = fit_attention(corpus, cfg, other, [("attention", True)], progress=False, ctx=ctx,
                                stage=f"cross_fit{k + 1}_")[1]["attention"]
            net_for.update({i: net for i in half})
    return net_for


def attention_priors(corpus: Corpus, cfg: TrainConfig, net_for: dict[int, AttentionNet], pairs,
                     ctx: Context | None = None) -> dict:
    """(image id, class) -> the class's normalised refined attention map at each scale (CPU). Under torchrun
    each process computes every N-th image's and every process gets them all."""
    ctx = ctx or Context()
    att_maps: dict[tuple, list[torch.Tensor]] = {}
    names_of: dict[int, list[str]] = {}
    for image_id, name in pairs:
        names_of.setdefault(image_id, []).append(name)
    with torch.no_grad():
        for image_id, names in list(names_of.items())[ctx.rank :: ctx.world]:
            heads = corpus.feats.heads(image_id)
            per_scale = [net_for[image_id].maps(heads[s][0][None].to(ctx.device))["refined"][0].cpu()
                         for s in cfg.scales]
            for name in names:
                att_maps[(image_id, name)] = [normalise_maps(r[corpus.tags.index[name]]) for r in per_scale]
    if ctx.world == 1:
        return att_maps
    return {k: v for part in dist.gather_objects(att_maps) for k, v in part.items()}


class SegmenterSamples:
    """Stage 3's training samples: RGB + the pair's attention maps (both scales, or the larger one alone) ->
    the class's mask; targets are decoded once and kept."""

    def __init__(self, corpus: Corpus, cfg: TrainConfig, att_maps: dict):
        self.corpus, self.cfg, self.att_maps = corpus, cfg, att_maps
        self.targets: dict = {}

    def __call__(self, pair, flip: bool, channels: int = 2):
        image_id, name = pair
        cfg, dataset = self.cfg, self.corpus.dataset
        rgb = dataset.load_rgb(image_id)
        x = preprocess(rgb, input_size(rgb.shape[0], rgb.shape[1], cfg.seg_long_side), torch.device("cpu"))[0]
        if pair not in self.targets:
            self.targets[pair] = resized_target(training_mask(dataset, image_id, name), cfg.train_size)
        maps = self.att_maps[pair] if channels == 2 else self.att_maps[pair][1:]
        return training_sample(x, maps, self.targets[pair].long(), cfg.train_size, flip)


def fit_segmenters(cfg: TrainConfig, pairs, samples: SegmenterSamples, progress: bool,
                   ctx: Context | None = None) -> dict:
    """Stage 3: the two-scale segmenter (and the single-scale one for the ablation), on the scalable loop
    (training states in <out>.resume/<folder>.pt). -> {folder: (model, config, losses, loop seconds)}"""
    segs = {}
    for folder, channels in [("segmenter", 2)] + ([("segmenter_single", 1)] if cfg.ablation else []):
        seg_cfg = SegmenterConfig(in_channels=3 + channels, priors_to_head=cfg.priors_to_head)
        model, losses, seconds = fit_segmenter(
            seg_cfg, pairs, functools.partial(samples, channels=channels), epochs=cfg.seg_epochs,
            batch_size=cfg.seg_batch, lr=cfg.seg_lr, weight_decay=cfg.weight_decay, seed=cfg.seed,
            rng=random.Random(cfg.seed), progress=progress, desc=f"stage 3: {folder}", ctx=ctx,
            workers=cfg.workers, amp=cfg.amp, checkpoint=_stage_checkpoint(cfg, folder),
            checkpoint_every=cfg.checkpoint_every, resume=cfg.resume)
        segs[folder] = (model.cpu(), seg_cfg, losses, seconds)
    return segs


def _stage_checkpoint(cfg: TrainConfig, stage: str) -> str:
    return str(Path(f"{cfg.out}.resume") / f"{stage}.pt")


def train(cfg: TrainConfig, progress: bool = True) -> Path | None:
    """All stages; writes the model folder described in `ovseg.core.methods.concept_mask.attention`. Under
    torchrun every process trains its share and rank 0 alone chooses the thresholds and writes (the others
    return None)."""
    ctx = dist.setup(cfg.device)
    try:
        return _train(cfg, ctx, progress and ctx.main)
    finally:
        dist.teardown()


def _train(cfg: TrainConfig, ctx: Context, progress: bool) -> Path | None:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    resume_dir = Path(f"{cfg.out}.resume")
    if not cfg.resume and ctx.main and resume_dir.exists():
        shutil.rmtree(resume_dir)  # a fresh run: an older interrupted run's states are not this run's
    dist.barrier()
    models = Models(ctx.device)
    seconds: dict[str, float] = {}

    # 0. features, tags, PMI vectors and the stage inputs
    corpus, seconds["features"] = build_corpus(cfg, models, progress, ctx)
    tags, dataset = corpus.tags, corpus.dataset

    # 1-2. embedding network and refinement (and the no-SD refinement for the ablation)
    t0 = time.perf_counter()
    variants = [("attention", True)] + ([("attention_nosd", False)] if cfg.ablation else [])
    original, trained, refine_losses = fit_attention(corpus, cfg, corpus.train_ids, variants, progress, ctx)
    embed_losses = refine_losses.pop("stage1")
    seconds["stages1-2"] = time.perf_counter() - t0

    # 3. the segmenter on base-class pairs, attention of cross-fitted networks at both scales
    att = trained["attention"]
    t0 = time.perf_counter()
    pairs = [(i, n) for i, n in base_training_pairs(dataset, corpus.train_ids) if n in tags.index]
    net_for = cross_fitted_networks(corpus, cfg, att, pairs, ctx)
    seconds["cross_fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    segs = fit_segmenters(cfg, pairs, SegmenterSamples(corpus, cfg, attention_priors(corpus, cfg, net_for, pairs, ctx)),
                          progress, ctx)
    if not ctx.main:
        return None
    original, att = original.cpu(), att.cpu()
    trained = {k: v.cpu() for k, v in trained.items()}

    # theta (sec. 4.4), the presence threshold and the mask thresholds, on held-out base classes
    held = held_out_samples(corpus, cfg.scales[1])
    theta = choose_theta(att, tags, corpus.refined, held, cfg.theta_grid)
    presence = choose_presence_threshold(att, tags, held, corpus.refined)
    mask_thresholds = {folder: choose_mask_threshold(model, att, dataset, corpus.held_ids, corpus.feats, tags, cfg,
                                                     channels)
                       for (folder, (model, *_)), channels in zip(segs.items(), (2, 1))}
    seconds["stage3"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    stage3_seconds = sum(v[3] for v in segs.values())

    out = _save(cfg, tags, original, trained, segs, corpus.refined, theta, presence, mask_thresholds, {
        "data": {"coco_dir": str(Path(cfg.coco_dir).resolve()), "train_images": len(corpus.train_ids),
                 "held_out_images": len(corpus.held_ids),
                 "held_out_ids_sha1": hashlib.sha1(json.dumps(corpus.held_ids).encode()).hexdigest(),
                 "stage2_samples": sum(len(v) for v in corpus.samples.values()), "segmenter_pairs": len(pairs),
                 "classes": "base-class labels, boxes and masks only (DESIGN.md split); captions of any word"},
        "tags": corpus.tag_summary,
        "overlap_pairs_known": int(np.isfinite(corpus.overlap).sum()),
        "stage1_loss": {"first_epoch": embed_losses[0], "last_epoch": embed_losses[-1], "epochs": len(embed_losses)},
        "stage2_loss": {k: loss_summary(v) for k, v in refine_losses.items()},
        "stage3_loss": {k: loss_summary(v[2]) for k, v in segs.items()},
        "theta": theta, "presence": presence, "mask_threshold": mask_thresholds,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "throughput": {"processes": ctx.world, "device": str(ctx.device),
                       "segmenter_pairs_per_s": round(len(pairs) * cfg.seg_epochs * len(segs) / stage3_seconds, 2)
                       if stage3_seconds else None},
        "torch": torch.__version__,
    })
    shutil.rmtree(resume_dir, ignore_errors=True)  # the run finished: nothing to resume
    if cfg.calibrate:
        calibrate_verification(out, cfg.coco_dir, progress)
    return out


def _save(cfg, tags, original, trained, segs, refined, theta, presence, mask_thresholds, summary) -> Path:
    """Write everything into a fresh folder beside cfg.out, then swap it in: an interrupted run never leaves
    a half-written model (the previous one stays until the new one is complete)."""
    out = Path(cfg.out)
    with replaced_folder(out) as tmp:
        tags.save(tmp / "tags.npz")
        for name, att in trained.items():
            att.save(tmp / f"{name}.pt")
        if cfg.ablation:
            original.save(tmp / "attention_original.pt")
        for folder, (model, seg_cfg, *_) in segs.items():
            save_segmenter(tmp / folder, model, seg_cfg, {"method": "concept_mask"})
        config = {"train": asdict(cfg), "refined_concepts": refined, "theta": theta["theta"],
                  "presence_threshold": presence["presence_threshold"], "scales": list(cfg.scales),
                  "mask_threshold": {k: v["threshold"] for k, v in mask_thresholds.items()},
                  "seg_long_side": cfg.seg_long_side}
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / "training.json", summary)
    log.info("saved %s in %.0f s", out, summary["seconds"]["total"])
    return out


def calibrate_verification(folder: str | Path, coco_dir: str | Path, progress: bool = True) -> Path:
    """Concept verification's calibration (`ovseg.core.methods.concept_mask.verification`) for the model in
    `folder`, on the base classes of coco_dev's held-out images (never trained on), through the method's own
    inference path; writes folder/verification.json. Ground truth is read for base classes only."""
    from tqdm import tqdm

    from ovseg.core.image_io import pixel_key
    from ovseg.core.methods.base import ImageState
    from ovseg.core.methods.concept_mask.method import ConceptMask
    from ovseg.core.methods.concept_mask.verification import fit_cross_fitted
    from ovseg.core.predictor import DEFAULT_LONG_SIDE
    from ovseg.train.coco import held_out_image_ids

    folder = Path(folder)
    models = Models("cpu")
    method = ConceptMask(models, checkpoint=folder, verify=False)
    dataset = CocoConceptDataset(coco_dir)
    held = sorted(held_out_image_ids(dataset.image_ids))
    concepts = list(method.model.refined_names)
    assert_no_target_annotations(concepts)
    samples = []
    for image_id in tqdm(held, desc="verification calibration", unit="img", disable=not progress):
        rgb = dataset.load_rgb(image_id)
        state = ImageState.compute(models, rgb, DEFAULT_LONG_SIDE)
        present = {c for c in dataset.classes_present(image_id) if c in concepts}
        scores = {c: method.verification(state, c) for c in concepts}
        samples.append({"key": pixel_key(rgb), "scores": scores, "present": present})
    calibration = fit_cross_fitted(samples)
    calibration.summary.update(coco_dir=str(coco_dir), held_out_images=len(held),
                               classes="base classes only (refined concepts)")
    path = folder / "verification.json"
    calibration.save(path)
    log.info("verification calibration: %s", calibration.summary)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coco", default="../shared/data/coco_dev", help="COCO folder (images/, instances.json, captions.json)")
    p.add_argument("--out", default="assets/checkpoints/concept_mask", help="model folder (replaced when done)")
    p.add_argument("--no-ablation", action="store_true",
                   help="skip the ablation parts (noSD refinement, stage-1 copy, single-scale segmenter)")
    p.add_argument("--finetune-embedding", action="store_true",
                   help="fine-tune the embedding network in stage 2 as the paper does (hurts unseen words here)")
    p.add_argument("--no-cross-fit", action="store_true",
                   help="train the segmenter on the main attention network's maps of its own training images")
    p.add_argument("--max-images", type=int, default=None, help="train on the first N training images (quick runs)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="train on this share of the training images (the data-scaling study: 0.25, 0.5, 1)")
    p.add_argument("--refine-epochs", type=int, default=TrainConfig.refine_epochs)
    p.add_argument("--seg-epochs", type=int, default=TrainConfig.seg_epochs)
    p.add_argument("--verification-only", action="store_true",
                   help="only (re)calibrate concept verification for the model already in --out (2 min)")
    p.add_argument("--no-calibration", action="store_true",
                   help="skip concept verification's calibration (2 min; the model then gates presence with the "
                        "single threshold in its config.json); `--verification-only` adds it later")
    add_scale_arguments(p, TrainConfig, features=True)


def run(args) -> Path:
    if args.verification_only:
        calibrate_verification(args.out, args.coco)
        return Path(args.out)
    cfg = TrainConfig(coco_dir=args.coco, out=args.out, ablation=not args.no_ablation, max_images=args.max_images,
                      fraction=args.fraction,
                      cross_fit=not args.no_cross_fit, finetune_embedding=args.finetune_embedding,
                      refine_epochs=args.refine_epochs, seg_epochs=args.seg_epochs, device=args.device, amp=args.amp,
                      workers=args.workers, feature_cache=not args.no_feature_cache,
                      memory_cache_mb=args.memory_cache_mb, checkpoint_every=args.checkpoint_every,
                      resume=args.resume, calibrate=not args.no_calibration)
    return train(cfg)


register_trainer("concept_mask", "Concept Mask's attention and segmentation networks", add_arguments, run,
                 distributed=True)
