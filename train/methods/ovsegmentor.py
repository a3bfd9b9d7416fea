"""`ovseg train ovsegmentor`: OVSegmentor (seed 004, sec. 3.2) from image-caption pairs only.

1. Pairs: each training image of the default split with its captions (captions.json); an image without one
   gets captions made from its base-class labels ("a photo of a person and dog."), never naming a target class
   (`assert_no_target_annotations`). No mask is read for training.
2. Patch features: the frozen backbone on each image resized to `size` x `size`, at stride 32, kept in memory
   in half precision (a flipped copy is the augmentation).
3. Text: the frozen MiniLM's caption embeddings, the token states of the captions with their entities masked,
   the entity prompts, and one prompt per entity (for sub-group selection).
4. Training: L_contrast + L_entity + lambda L_mask (eq. 13); lambda = 0 for the first 3/4 of the epochs and
   `mask_weight` after (the paper: 0 for 30 of 40 epochs, then 0.1); the EMA model (momentum 0.99) gives the
   mask targets. Half of each batch are anchors and half their partners, an image sharing an entity.
5. The background threshold of eq. 1: chosen by strict IoU on the base classes of `threshold_images` training
   images (their base masks are read here, after training).
6. With `--ablation` (the default), the paper's Table 3 rows (contrast only, + entity, + mask) and Table 5's
   K = 16 are trained the same way; with `evaluate`, every network is scored on the held-out images:
   strict target and base mIoU (as `ovseg eval`), and the oracle-group mIoU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.core.cache import atomic_write_json, cache_dir, replaced_folder
from ovseg.core.methods.ovsegmentor.method import VARIANTS
from ovseg.core.methods.ovsegmentor.model import (OVSegConfig, OVSegNet, contrastive_loss, ema_update, make_ema,
                                                  mask_consistency, patch_input)
from ovseg.core.methods.ovsegmentor.text import (caption_entities, class_prompt, entity_prompt, entity_set,
                                                 label_caption, mask_entities)
from ovseg.core.models import Models
from ovseg.train.coco import (BASE_CLASSES, HOLDOUT_FRACTION, SPLIT_SEED, CocoConceptDataset,
                              assert_no_target_annotations, fraction_of, split_image_ids, training_mask)
from ovseg.train.registry import register_trainer
from ovseg.train.scale import dist
from ovseg.train.scale.corpora import CocoCorpus, Corpus, open_corpus
from ovseg.train.scale.dist import Context, all_reduce_sum, gather_rows
from ovseg.train.scale.features import FeatureCache, module_fingerprint
from ovseg.train.scale.cli import add_scale_arguments
from ovseg.train.scale.loop import LoopConfig, fit, item_rng, item_seed, steps_per_epoch

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    coco_dir: str
    out: str
    size: int = 384  # training input (square; the paper crops 224)
    epochs: int = 40  # the paper's 40
    batch_size: int = 32  # anchor images per step, each with its partner (up to 64 rows)
    lr: float = 2e-4  # 5e-4 stalled: contrast loss 1.9 after 40 epochs against 0.67 (runs of 2026-12-03)
    weight_decay: float = 0.05
    groups: int = 8
    layers_before: int = 1
    layers_after: int = 1
    entity_loss: bool = True
    mask_loss: bool = True
    mask_weight: float = 0.1  # lambda after the warm-up
    mask_from: float = 0.75  # share of the epochs with lambda = 0 (the paper: 30 of 40)
    ratio: float = 0.5  # r
    delta: float = 0.65
    momentum: float = 0.99
    min_entity_images: int = 5
    threshold_images: int = 120
    vocabulary: str = "negatives"  # eq. 1's competing words at inference and for the threshold (method.competitors)
    ablation: bool = True
    evaluate: bool = True
    holdout_fraction: float = HOLDOUT_FRACTION
    seed: int = SPLIT_SEED
    max_images: int | None = None
    fraction: float = 1.0  # train on this share of the training images (nested: 0.25 is inside 0.5)
    threads: int | None = None
    data: str | None = None  # an image-caption corpus to train on (default: coco_dir's training split)
    device: str = "auto"
    amp: str = "auto"
    workers: int = 0
    feature_cache: bool = True
    memory_cache_mb: int = 1024  # per process: features kept in memory (coco_dev's fit; a large corpus streams)
    checkpoint_every: int = 20
    resume: bool = False

    def __post_init__(self):
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.batch_size < 2:
            raise ValueError(f"the contrastive loss needs a batch of at least 2 images, got {self.batch_size}")


# ------------------------------------------------------------------------------------------------ data

@dataclass
class TextIndex:
    """The text of every training image, computed once (text only, no features): per image its caption
    indices; per caption the caption, its masked form, its entity prompt and its entities."""

    captions_of: list[list[int]]
    captions: list[str]
    labelled: list[bool]  # the caption was made from base-class labels
    masked: list[str]
    prompts: list[str]  # h(E), "" without entities
    entities: list[list[int]]  # per caption, indices into entity_names
    entity_names: list[str]
    keys: list[str]  # per image, the corpus key
    corpus_index: list[int]  # per image, its index in the corpus

    def by_entity(self) -> dict[int, list[tuple[int, int]]]:
        out: dict[int, list[tuple[int, int]]] = {}
        for img, caps in enumerate(self.captions_of):
            for c in caps:
                for e in self.entities[c]:
                    out.setdefault(e, []).append((img, c))
        return out


def build_text_index(cfg: TrainConfig, corpus: Corpus, progress: bool) -> TextIndex:
    """Captions of each corpus image; an image without one gets a caption made from its base-class labels
    (never naming a target class); an image with neither is left out. Ω from the real captions, plus the
    label captions' classes."""
    from tqdm import tqdm

    rng = random.Random(cfg.seed)
    texts, made, keys, kept = [], [], [], []
    for i in tqdm(range(len(corpus)), desc="ovsegmentor: captions", unit="img", disable=not progress,
                  mininterval=2.0):
        caps = corpus.captions(i)
        label = None
        if not caps:
            labels = corpus.labels(i)
            present = [n for n in labels or () if n in BASE_CLASSES]
            assert_no_target_annotations(present)
            if not present:
                continue  # nothing to say about it
            caption, masked, names = label_caption(present, rng)
            caps, label = [caption], (masked, names)
        texts.append(caps)
        made.append(label)
        keys.append(corpus.key(i))
        kept.append(i)
    if not kept:
        raise ValueError(f"{corpus.describe()}: no image has a caption or a base-class label to make one from")
    omega = entity_set({k: t for k, t, m in zip(keys, texts, made) if m is None}, cfg.min_entity_images)
    omega = sorted(set(omega) | {n for m in made if m is not None for n in m[1]})
    index = {e: k for k, e in enumerate(omega)}
    out = TextIndex([], [], [], [], [], [], omega, keys, kept)
    for caps, label in zip(texts, made):
        out.captions_of.append(list(range(len(out.captions), len(out.captions) + len(caps))))
        for c in caps:
            found = label[1] if label is not None else caption_entities(c, index)
            ents = [index[e] for e in found if e in index]
            out.captions.append(c)
            out.labelled.append(label is not None)
            out.entities.append(ents)
            out.masked.append(label[0] if label is not None else mask_entities(c, index))
            prompt_rng = random.Random(item_seed(cfg.seed, -1, len(out.prompts)))
            out.prompts.append(entity_prompt([omega[k] for k in ents], prompt_rng) if ents else "")
    return out


class PairSource:
    """The training items: item i is anchor image i with one of its captions and, when one exists, a partner
    image whose caption shares an entity with it (eq. 10-12's pair). Each row's patch features (the frozen
    backbone at `size` x `size`, stride 32) and text states (the frozen MiniLM) are computed when the item is
    read, through the optional on-disk `FeatureCache`; every random choice comes from `item_rng`. The frozen
    models load lazily in each process (DataLoader workers included)."""

    def __init__(self, cfg: TrainConfig, corpus: Corpus, text: TextIndex, entity_emb: torch.Tensor,
                 models: Models | None = None):
        self.cfg, self.corpus, self.text, self.entity_emb = cfg, corpus, text, entity_emb
        self.groups = cfg.groups  # K of the network being trained: the Gumbel draws' last dimension
        self._by_entity = text.by_entity()
        self._models = models
        root = cache_dir() / "features" if cfg.feature_cache else None
        self.image_cache = FeatureCache(root, f"ovsegmentor-patches-{cfg.size}")
        self.text_cache = FeatureCache(root, "ovsegmentor-text")
        self._memory: OrderedDict = OrderedDict()  # (kind, index) -> value, at most memory_cache_mb
        self._memory_bytes = 0

    def __getstate__(self):
        return {**self.__dict__, "_models": None, "_memory": OrderedDict(), "_memory_bytes": 0}

    def _remember(self, key, compute):
        """A bounded in-memory layer over the disk cache (least recently used out first): a small corpus
        stays in memory, a large one streams from disk."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        value = compute()
        size = sum(t.numel() * t.element_size() for t in (value.values() if isinstance(value, dict) else [value]))
        budget = self.cfg.memory_cache_mb * 2**20
        if size <= budget:
            self._memory[key] = value
            self._memory_bytes += size
            while self._memory_bytes > budget:
                _, old = self._memory.popitem(last=False)
                self._memory_bytes -= sum(t.numel() * t.element_size()
                                          for t in (old.values() if isinstance(old, dict) else [old]))
        return value

    @property
    def models(self) -> Models:
        if self._models is None:
            self._models = Models("cpu")
        return self._models

    def __len__(self) -> int:
        return len(self.text.captions_of)

    def patches(self, img: int) -> torch.Tensor:
        """(C, h, w) float16 patch features of image `img`."""
        from ovseg.core.models.backbone import preprocess

        m, corpus_i = self.models, self.text.corpus_index[img]

        def compute():
            x = preprocess(self.corpus.load_rgb(corpus_i), (self.cfg.size, self.cfg.size), m.device)
            with torch.no_grad():
                return {"patches": patch_input(m.backbone(x))[0].to("cpu", torch.float16).numpy()}

        def cached():
            parts = ("patches", module_fingerprint(m.backbone), self.cfg.size, self.corpus.fingerprint(corpus_i))
            return torch.from_numpy(self.image_cache.get(parts, compute)["patches"])

        return self._remember(("patches", img), cached)

    def text_states(self, cap: int) -> dict[str, torch.Tensor]:
        enc = self.models.text_encoder
        caption, masked, prompt = self.text.captions[cap], self.text.masked[cap], self.text.prompts[cap]

        def compute():
            with torch.no_grad():
                embs = enc.embed([caption] + ([prompt] if prompt else []))
                states = enc.tokens([masked])
            return {"caption": embs[0].cpu().numpy(),
                    "prompt": (embs[1] if prompt else torch.zeros_like(embs[0])).cpu().numpy(),
                    "tokens": states.last[0].to("cpu", torch.float16).numpy()}

        def cached():
            parts = ("text", module_fingerprint(enc.model), caption, masked, prompt)
            return {k: torch.from_numpy(v) for k, v in self.text_cache.get(parts, compute).items()}

        return self._remember(("text", cap), cached)

    def row(self, img: int, cap: int, rng: random.Random, gen: torch.Generator) -> dict:
        x = self.patches(img)
        if rng.random() < 0.5:
            x = x.flip(-1)
        h, w = x.shape[-2:]
        return {"patches": x, **self.text_states(cap), "has_entity": bool(self.text.entities[cap]),
                "noise": torch.rand((h * w, self.groups), generator=gen)}

    def item(self, i: int, epoch: int) -> dict:
        rng, gen = item_rng(self.cfg.seed, epoch, i)
        cap = rng.choice(self.text.captions_of[i])
        rows = [self.row(i, cap, rng, gen)]
        entity = None
        shared = [e for e in self.text.entities[cap] if len(self._by_entity[e]) > 1]
        if shared:
            e = rng.choice(shared)
            partners = [p for p in self._by_entity[e] if p[0] != i]
            if partners:
                img, pcap = rng.choice(partners)
                rows.append(self.row(img, pcap, rng, gen))
                entity = e
        return {"rows": rows, "entity": entity}


def collate(items: list[dict]) -> dict:
    """Items -> one batch: rows stacked (anchors and partners), token states padded, and the (anchor row,
    partner row, entity) triples of the pairs."""
    rows, pairs = [], []
    for it in items:
        if it["entity"] is not None:
            pairs.append((len(rows), len(rows) + 1, it["entity"]))
        rows.extend(it["rows"])
    t = max(r["tokens"].shape[0] for r in rows)
    tokens = torch.stack([F.pad(r["tokens"].float(), (0, 0, 0, t - r["tokens"].shape[0])) for r in rows])
    token_mask = torch.stack([torch.arange(t) < r["tokens"].shape[0] for r in rows])
    return {"patches": torch.stack([r["patches"] for r in rows]).float(),
            "noise": torch.stack([r["noise"] for r in rows]),
            "caption": torch.stack([r["caption"] for r in rows]), "prompt": torch.stack([r["prompt"] for r in rows]),
            "has_entity": torch.tensor([r["has_entity"] for r in rows]), "tokens": tokens, "token_mask": token_mask,
            "pairs": pairs}


# -------------------------------------------------------------------------------------------- training

def make_step(cfg: TrainConfig, ctx: Context, ema: OVSegNet | None, entity_emb: torch.Tensor):
    """eq. 13 for one batch, normalised for the global batch: the contrastive terms over every process's rows
    (gathered), the mask term summed over this process's pairs and divided by the pairs of all processes."""
    mask_start = int(cfg.mask_from * cfg.epochs)

    def step(net: OVSegNet, b: dict, epoch: int):
        dev = ctx.device
        lam = cfg.mask_weight if (cfg.mask_loss and epoch >= mask_start) else 0.0
        x = b["patches"].to(dev, non_blocking=True)
        out = net(x, noise=b["noise"].to(dev))
        z_i, valid = gather_rows(net.image_embedding(out["groups"]))
        z_t, _ = gather_rows(net.text_embedding(b["caption"].to(dev)))
        loss_c = contrastive_loss(z_i, z_t, net.logit_scale, valid=valid)
        loss = loss_c / ctx.world
        loss_e = torch.zeros((), device=dev)
        if cfg.entity_loss:
            z_m, _ = gather_rows(net.complete(b["tokens"].to(dev), b["token_mask"].to(dev), out["groups"]))
            z_e, _ = gather_rows(net.text_embedding(b["prompt"].to(dev)))
            has, _ = gather_rows(b["has_entity"].to(dev, torch.float32)[:, None])
            loss_e = contrastive_loss(z_m, z_e, net.logit_scale, valid=valid & has[:, 0].bool())
            loss = loss + loss_e / ctx.world
        mask_mean = 0.0
        if lam > 0:
            pairs = b["pairs"]
            count = all_reduce_sum(torch.tensor([float(len(pairs))], device=dev))
            if pairs:
                with torch.no_grad():
                    ema_out = ema(x)
                    ent = ema.text_embedding(entity_emb[[p[2] for p in pairs]].to(dev))
                loss_m = mask_consistency(out, ema_out, net, ema, [p[:2] for p in pairs], ent, cfg.ratio,
                                          cfg.delta) * len(pairs)  # the sum over this process's pairs
            else:
                loss_m = out["groups"].sum() * 0.0
            if count.item() > 0:
                loss = loss + lam * loss_m / count
                mask_mean = float(all_reduce_sum(loss_m.detach().reshape(1).clone()) / count)
        total = float(loss_c.detach()) + float(loss_e.detach()) + lam * mask_mean
        return loss, {"contrast": float(loss_c.detach()), "entity": float(loss_e.detach()), "mask": mask_mean,
                      "total": total, "lambda": lam}

    return step


def train_network(cfg: TrainConfig, source: PairSource, ctx: Context, progress: bool, desc: str,
                  checkpoint: Path | None) -> tuple[OVSegNet, dict]:
    torch.manual_seed(cfg.seed)
    source.groups = cfg.groups  # the ablation's networks share one source; K = 16 needs 16 draws a patch
    c_in = 1280 + 320 + 112
    grid = cfg.size // 32
    config = OVSegConfig(in_channels=c_in, groups=cfg.groups, layers_before=cfg.layers_before,
                         layers_after=cfg.layers_after, pos_grid=grid)
    net = OVSegNet(config).to(ctx.device).train()
    ema = make_ema(net) if cfg.mask_loss else None
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps_per_epoch(len(source), cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 20)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, workers=cfg.workers, amp=cfg.amp,
                      checkpoint=str(checkpoint) if checkpoint else None, checkpoint_every=cfg.checkpoint_every,
                      resume=cfg.resume, clip_grad=5.0, desc=desc, progress=progress)
    record = fit(net, opt, sched, source, make_step(cfg, ctx, ema, source.entity_emb), loop, ctx, collate=collate,
                 after_step=(lambda: ema_update(ema, net, cfg.momentum)) if ema is not None else None,
                 extra={"ema": ema} if ema is not None else None)
    record.pop("step_totals")  # the per-epoch means are the record here
    return net.eval(), record


# ------------------------------------------------------------------------------------ thresholds, scores

@torch.no_grad()
def base_pairs(models: Models, dataset: CocoConceptDataset, ids: list[int], long_side: int = 448) -> list[dict]:
    """Per training image (base classes only): its backbone features at the Predictor's size and each present
    base class's training mask."""
    from ovseg.core.methods.base import ImageState

    out = []
    for image_id in ids:
        present = [n for n in dataset.classes_present(image_id) if n in BASE_CLASSES]
        assert_no_target_annotations(present)
        if not present:
            continue
        state = ImageState.compute(models, dataset.load_rgb(image_id), long_side)
        out.append({"features": patch_input(state.features), "size": state.size,
                    "masks": {n: training_mask(dataset, image_id, n) for n in present}})
    return out


THRESHOLDS = tuple(np.round(np.arange(0.05, 0.96, 0.025), 3))
MODES = ("absolute", "relative")


@torch.no_grad()
def choose_threshold(net: OVSegNet, models: Models, images: list[dict], entities: list[str],
                     vocabulary: str) -> tuple[str, float, dict]:
    """The background threshold of eq. 1 with the best mean strict IoU over the base pairs, in either form
    (`word_mask`): absolute on the score mapped to [0, 1], or relative to the word's peak on the image. Each
    base class competes as at inference (`competitors`): with no word ("negatives": `ovseg eval` gives none),
    with the image's other base classes ("typed", as `ovseg eval` types every class present), and with the
    entity set too ("entities").
    Returns (mode, threshold, {mode: [[threshold, mean IoU], ...]})."""
    from ovseg.core.methods.ovsegmentor.method import competition_scores, competitors, threshold_mask

    names = sorted({n for img in images for n in img["masks"]})
    vocab = list(dict.fromkeys(names + (list(entities) if vocabulary == "entities" else [])))
    index = {w: i for i, w in enumerate(vocab)}
    t_emb = net.text_embedding(models.text_encoder.embed([class_prompt(n) for n in vocab]).float().to(models.device))
    ious = {m: np.zeros(len(THRESHOLDS)) for m in MODES}
    count = 0
    for img in images:
        scores = net.patch_scores(net(img["features"].to(models.device)), t_emb)[0]  # (V, h, w)
        typed = list(img["masks"])
        for n, m in img["masks"].items():  # each word's scores at image size once, then every threshold
            rows = [index[n]] + [index[r] for r in competitors(n, (), typed, entities, vocabulary)]
            s = F.interpolate(competition_scores(scores[rows])[None], size=img["size"], mode="nearest")[0]
            gt, valid = m == 1, m != 255
            for mode in MODES:
                for k, t in enumerate(THRESHOLDS):
                    pred = threshold_mask(s, float(t), mode).cpu().numpy() & valid
                    union = (pred | gt).sum()
                    ious[mode][k] += (pred & gt).sum() / union if union else 1.0
            count += 1
    best = max(((mode, k) for mode in MODES for k in range(len(THRESHOLDS))), key=lambda mk: ious[mk[0]][mk[1]])
    curves = {mode: [[float(t), round(float(v / max(count, 1)), 4)] for t, v in zip(THRESHOLDS, ious[mode])]
              for mode in MODES}
    return best[0], float(THRESHOLDS[best[1]]), curves


def calibrate(folder: str | Path, coco_dir: str, vocabulary: str, threshold_images: int = TrainConfig.threshold_images,
              seed: int = SPLIT_SEED) -> dict:
    """Choose every network's background threshold again for `vocabulary` (on the base masks of the first
    `threshold_images` training images, as training does) and rewrite the network files and training.json in
    place: `ovseg train ovsegmentor --calibrate-only`."""
    folder = Path(folder)
    models = Models("cpu")
    dataset = CocoConceptDataset(coco_dir, classes=BASE_CLASSES)
    train_ids, _ = split_image_ids(dataset.image_ids, HOLDOUT_FRACTION, seed)
    images = base_pairs(models, dataset, train_ids[:threshold_images])
    summary_path = folder / "training.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"networks": {}}
    out = {}
    for variant, file in VARIANTS.items():
        if not (folder / file).is_file():
            continue
        net, extra = OVSegNet.load(folder / file, models.device)
        entities = list(extra.get("entities", []))
        mode, threshold, curves = choose_threshold(net, models, images, entities, vocabulary)
        net.save(folder / file, {**extra, "background_threshold": threshold, "threshold_mode": mode,
                                 "vocabulary": vocabulary})
        out[variant] = {"background_threshold": threshold, "threshold_mode": mode, "vocabulary": vocabulary}
        summary.setdefault("networks", {}).setdefault(variant, {}).update(
            {**out[variant], "threshold_curves_base_iou": curves})
    if not out:
        raise ValueError(f"{folder} holds no OVSegmentor network ({', '.join(VARIANTS.values())})")
    if "evaluation" in summary:  # its figures were measured with the old thresholds: measure again
        cfg = TrainConfig(coco_dir=coco_dir, out=str(folder), seed=seed, ablation=len(out) > 1)
        _, held_ids = split_image_ids(dataset.image_ids, HOLDOUT_FRACTION, seed)
        summary["evaluation"] = evaluate_networks(folder, cfg, models, held_ids, progress=True)
    summary["calibrated"] = {"vocabulary": vocabulary, "threshold_images": len(images)}
    atomic_write_json(summary_path, summary)
    return out


@torch.no_grad()
def oracle_groups(folder: Path, variants, coco_dir: str, ids: list[int], models: Models) -> dict:
    """Oracle-group mIoU on held-out images, per variant: for each image and present class, the best strict IoU
    of a single group's region (the arg max of the binding assignment, at image size); target and base classes
    apart. Each image is decoded and run through the backbone once for every variant."""
    from ovseg.core.methods.base import ImageState
    from ovseg.core.methods.ovsegmentor.method import OVSegmentor
    from ovseg.core.ops.metrics import mask_iou
    from ovseg.train.coco import TARGET_CLASSES

    dataset = CocoConceptDataset(coco_dir, image_ids=ids)  # ground truth read for scoring only
    methods = {v: OVSegmentor(models, checkpoint=folder, variant=v) for v in variants}
    per = {v: {"target": {}, "base": {}} for v in methods}
    for image_id in ids:
        targets = dataset.concept_targets(image_id)
        if not targets.gt:
            continue
        state = ImageState.compute(models, dataset.load_rgb(image_id), 448)
        for v, method in methods.items():
            assign = torch.from_numpy(method.groups(state)["assignment"].astype(np.int64))
            up = F.interpolate(assign[None, None].float(), size=state.size, mode="nearest")[0, 0].long().numpy()
            for c, gt in targets.gt.items():
                valid = ~targets.crowd[c] if c in targets.crowd else None
                best = max(mask_iou(up == k, gt, valid) for k in np.unique(up))
                per[v]["target" if c in TARGET_CLASSES else "base"].setdefault(c, []).append(best)
    return {v: {split: round(float(np.mean([np.mean(x) for x in d.values()])), 4) if d else None
                for split, d in splits.items()} for v, splits in per.items()}


# -------------------------------------------------------------------------------------------------- run

def variant_configs(cfg: TrainConfig) -> dict[str, TrainConfig]:
    rows = {"full": cfg}
    if cfg.ablation:
        rows.update(contrast=replace(cfg, entity_loss=False, mask_loss=False),
                    entity=replace(cfg, mask_loss=False),
                    mask=replace(cfg, entity_loss=False),
                    k16=replace(cfg, groups=16))
    return rows


def training_corpus(cfg: TrainConfig, dataset: CocoConceptDataset, train_ids: list[int]) -> Corpus:
    """The pairs to train on: `cfg.data` (any corpus `open_corpus` reads; when it is `coco_dir` itself, only
    the images outside the default held-out split), else the COCO folder's training split; then `max_images` (an even
    sample) or `fraction` (the first share of a seeded permutation, so smaller shares are inside larger ones)."""
    if cfg.data is None:
        corpus: Corpus = CocoCorpus(dataset, train_ids)
    else:
        corpus = open_corpus(cfg.data)
        if isinstance(corpus, CocoCorpus) and Path(cfg.data).resolve() == Path(cfg.coco_dir).resolve():
            train_ids, _ = split_image_ids(corpus.ids, cfg.holdout_fraction, cfg.seed)  # never its held-out part
            corpus = CocoCorpus(corpus.dataset, train_ids)
    keep = list(range(len(corpus)))
    if cfg.max_images:
        keep = keep[:: max(1, len(keep) // cfg.max_images)][: cfg.max_images]
    elif cfg.fraction < 1.0:
        keep = fraction_of(keep, cfg.fraction, cfg.seed)
    return corpus if len(keep) == len(corpus) else _Subset(corpus, keep)


class _Subset(Corpus):
    def __init__(self, corpus: Corpus, keep: list[int]):
        self.corpus, self.keep = corpus, keep

    def __len__(self) -> int:
        return len(self.keep)

    def key(self, i: int) -> str:
        return self.corpus.key(self.keep[i])

    def captions(self, i: int) -> list[str]:
        return self.corpus.captions(self.keep[i])

    def image_bytes(self, i: int) -> bytes:
        return self.corpus.image_bytes(self.keep[i])

    def labels(self, i: int) -> list[str] | None:
        return self.corpus.labels(self.keep[i])

    def load_rgb(self, i: int) -> np.ndarray:
        return self.corpus.load_rgb(self.keep[i])

    def describe(self) -> str:
        return f"{self.corpus.describe()}, {len(self.keep)} of them"


def train(cfg: TrainConfig, progress: bool = True) -> Path | None:
    """Train every network (the full model, and with `ablation` the Table 3/5 rows) and write the folder; under
    torchrun each process trains its share of every batch and rank 0 alone chooses thresholds, evaluates
    and writes."""
    ctx = dist.setup(cfg.device)
    try:
        return _train(cfg, ctx, progress and ctx.main)
    finally:
        dist.teardown()


def _train(cfg: TrainConfig, ctx: Context, progress: bool) -> Path | None:
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    models = Models(ctx.device)
    dataset = CocoConceptDataset(cfg.coco_dir, classes=BASE_CLASSES)
    train_ids, held_ids = split_image_ids(dataset.image_ids, cfg.holdout_fraction, cfg.seed)
    corpus = training_corpus(cfg, dataset, train_ids)
    text = build_text_index(cfg, corpus, progress)
    names = text.entity_names
    entity_emb = models.text_encoder.embed([class_prompt(e) for e in names]).float().cpu() if names else \
        torch.zeros(0, 384)
    source = PairSource(cfg, corpus, text, entity_emb, models if ctx.device.type == "cpu" else None)
    t_data = time.perf_counter() - t_start
    out = Path(cfg.out)
    resume_dir = out.with_name(out.name + ".resume")
    nets = {}
    for variant, vcfg in variant_configs(cfg).items():
        t0 = time.perf_counter()
        net, record = train_network(vcfg, source, ctx, progress, f"ovsegmentor: {variant}",
                                    resume_dir / f"{variant}.pt")
        nets[variant] = (vcfg, net, record, time.perf_counter() - t0)
    if not ctx.main:
        return None
    threshold_data = base_pairs(models, dataset, train_ids[: cfg.threshold_images])
    keys_sha1 = hashlib.sha1(json.dumps(sorted(text.keys)).encode()).hexdigest()
    summary = {
        "data": {"source": cfg.data or str(Path(cfg.coco_dir).resolve()), "corpus": corpus.describe(),
                 "images": len(text.keys), "fraction": cfg.fraction, "train_ids_sha1": keys_sha1,
                 "captioned_images": sum(not text.labelled[c[0]] for c in text.captions_of),
                 "label_captioned_images": sum(text.labelled[c[0]] for c in text.captions_of),
                 "captions": len(text.captions), "label_captions": sum(text.labelled),
                 "entities": len(names), "captions_with_entities": sum(bool(e) for e in text.entities),
                 "read": "captions, base-class labels of uncaptioned images; base masks of "
                         f"{len(threshold_data)} training images for the background threshold only"},
        "networks": {}, "seconds": {"text": round(t_data, 1)}}
    with replaced_folder(out) as tmp:
        for variant, (vcfg, net, record, seconds) in nets.items():
            mode, threshold, curves = choose_threshold(net, models, threshold_data, names, cfg.vocabulary)
            net.save(tmp / VARIANTS[variant], {"entities": names, "background_threshold": threshold,
                                               "threshold_mode": mode, "vocabulary": cfg.vocabulary,
                                               "train": asdict(vcfg)})
            summary["networks"][variant] = {"file": VARIANTS[variant], "groups": vcfg.groups,
                                            "losses": {"entity": vcfg.entity_loss, "mask": vcfg.mask_loss},
                                            "background_threshold": threshold, "threshold_mode": mode,
                                            "vocabulary": cfg.vocabulary, "threshold_curves_base_iou": curves,
                                            "training": record, "seconds": round(seconds, 1)}
        atomic_write_json(tmp / "config.json", {"train": asdict(cfg)})
        if cfg.evaluate:
            summary["evaluation"] = evaluate_networks(tmp, cfg, models, held_ids, progress)
        summary["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
        summary["torch"] = torch.__version__
        atomic_write_json(tmp / "training.json", summary)
    import shutil

    shutil.rmtree(resume_dir, ignore_errors=True)  # the run finished: nothing to resume
    log.info("saved %s", out)
    return out


def evaluate_networks(folder: Path, cfg: TrainConfig, models: Models, held_ids: list[int], progress: bool) -> dict:
    """Every network on the held-out images: `ovseg eval`'s strict mIoU and presence AP, and oracle groups."""
    from ovseg.core.predictor import Predictor
    from ovseg.train.evaluate import evaluate

    specs = {v: f"ovsegmentor[checkpoint={folder},variant={v}]" for v in variant_configs(cfg)}
    predictor = Predictor(models=models, methods=list(specs.values()))
    metrics, _ = evaluate(cfg.coco_dir, list(specs.values()), predictor=predictor, progress=progress,
                          reference=False, held_out_only=True, captions=False)
    oracle = oracle_groups(folder, list(specs), cfg.coco_dir, held_ids, models)
    rows = {}
    for v, spec in specs.items():
        m = metrics["methods"][spec]
        rows[v] = {"miou_target": round(m["concept_miou"]["target"], 4),
                   "miou_base": round(m["concept_miou"]["base"], 4),
                   "presence_ap_target": round(m["presence_ap"]["target"], 4), "oracle_group_miou": oracle[v]}
    whole = metrics["reference"]["whole_image_mask"]["concept_miou"]
    return {"images": metrics["dataset"]["images"], "rows": rows,
            "whole_image_mask": {"target": round(whole["target"], 4), "base": round(whole["base"], 4)}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig
    p.add_argument("--coco", default="../shared/data/coco_dev",
                   help="COCO folder (images/, instances.json, captions.json): the training pairs unless --data is "
                        "given, the base masks of the background threshold, and the held-out evaluation")
    p.add_argument("--data", default=None,
                   help="train on this image-caption corpus instead: a COCO folder, a captions.jsonl / .csv file "
                        "(or a folder with one), or WebDataset .tar shards (a file, a folder or a glob)")
    p.add_argument("--out", default="assets/checkpoints/ovsegmentor", help="model folder (replaced when done)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"anchor images per step over all processes, each with its partner (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--groups", type=int, default=d.groups, help="K, the number of group tokens")
    p.add_argument("--max-images", type=int, default=None, help="an even sample of N training images (quick runs)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="train on this share of the training images (the data-scaling study: 0.25, 0.5, 1)")
    p.add_argument("--threshold-images", type=int, default=d.threshold_images,
                   help="training images whose base masks choose the background threshold "
                        f"(default {d.threshold_images})")
    p.add_argument("--vocabulary", default=d.vocabulary, choices=("negatives", "typed", "entities"),
                   help="the words a typed word competes with in eq. 1: the negatives, also the other typed words, "
                        f"or also the entity set (default {d.vocabulary})")
    p.add_argument("--calibrate-only", action="store_true",
                   help="only choose the background thresholds of the networks in --out again (for --vocabulary), "
                        "and redo their held-out evaluation if training.json has one")
    p.add_argument("--no-ablation", action="store_true", help="train the full model only (no Table 3/5 rows)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    add_scale_arguments(p, d, features=True)


def run(args) -> Path | None:
    if args.calibrate_only:
        calibrate(args.out, args.coco, args.vocabulary, args.threshold_images)
        return Path(args.out)
    return train(TrainConfig(coco_dir=args.coco, data=args.data, out=args.out, epochs=args.epochs,
                             vocabulary=args.vocabulary,
                             batch_size=args.batch_size, lr=args.lr, groups=args.groups, max_images=args.max_images,
                             fraction=args.fraction, threshold_images=args.threshold_images,
                             ablation=not args.no_ablation, evaluate=not args.no_eval, device=args.device,
                             amp=args.amp, workers=args.workers, feature_cache=not args.no_feature_cache,
                             memory_cache_mb=args.memory_cache_mb,
                             checkpoint_every=args.checkpoint_every, resume=args.resume))


register_trainer("ovsegmentor", "OVSegmentor's groups from image-caption pairs (contrast, entity completion, "
                 "mask consistency)", add_arguments, run, distributed=True)
