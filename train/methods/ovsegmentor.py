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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.core.cache import atomic_write_json, replaced_folder
from ovseg.core.methods.ovsegmentor.method import VARIANTS
from ovseg.core.methods.ovsegmentor.model import (OVSegConfig, OVSegNet, contrastive_loss, ema_update, make_ema,
                                                  mask_consistency, patch_input)
from ovseg.core.methods.ovsegmentor.text import (caption_entities, class_prompt, entity_prompt, entity_set,
                                                 label_caption, mask_entities)
from ovseg.core.models import Models
from ovseg.train.coco import (BASE_CLASSES, HOLDOUT_FRACTION, SPLIT_SEED, CocoConceptDataset,
                              assert_no_target_annotations, split_image_ids, training_mask)
from ovseg.train.registry import register_trainer

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    coco_dir: str
    out: str
    size: int = 384  # training input (square; the paper crops 224)
    epochs: int = 40  # the paper's 40
    batch_size: int = 64
    lr: float = 5e-4
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
    ablation: bool = True
    evaluate: bool = True
    holdout_fraction: float = HOLDOUT_FRACTION
    seed: int = SPLIT_SEED
    max_images: int | None = None
    threads: int | None = None


# ------------------------------------------------------------------------------------------------ data

@dataclass
class Pairs:
    """Everything training reads, in memory: per image its patch features and the indices of its captions;
    per caption its embedding, masked token states, entity prompt embedding and entities."""

    ids: list[int]
    patches: torch.Tensor  # (N, C, h, w) float16
    captions_of: list[list[int]]
    captions: list[str]
    labelled: list[bool]  # the caption was made from base-class labels
    entities: list[list[int]]  # per caption, indices into entity_names
    entity_names: list[str]
    caption_emb: torch.Tensor  # (M, 384)
    masked_tokens: torch.Tensor  # (M, T, 384) float16
    masked_mask: torch.Tensor  # (M, T) bool
    prompt_emb: torch.Tensor  # (M, 384): h(E), zeros without entities
    entity_emb: torch.Tensor  # (E, 384): "a photo of a {e}."


def _features(models: Models, rgb: np.ndarray, size: int) -> torch.Tensor:
    from ovseg.core.models.backbone import preprocess

    x = preprocess(rgb, (size, size), models.device)
    with torch.no_grad():
        return patch_input(models.backbone(x))[0].to("cpu", torch.float16)


def build_pairs(cfg: TrainConfig, models: Models, dataset: CocoConceptDataset, ids: list[int],
                progress: bool) -> Pairs:
    from tqdm import tqdm

    rng = random.Random(cfg.seed)
    texts: list[list[str]] = []
    made: list[tuple[str, list[str]] | None] = []  # a label caption's masked form and classes
    feats = []
    kept = []
    for image_id in tqdm(ids, desc="ovsegmentor: features", unit="img", disable=not progress):
        caps = dataset.captions(image_id)
        label = None
        if not caps:
            present = [n for n in dataset.classes_present(image_id) if n in BASE_CLASSES]
            assert_no_target_annotations(present)
            if not present:
                continue  # nothing to say about it
            caption, masked, names = label_caption(present, rng)
            caps, label = [caption], (masked, names)
        feats.append(_features(models, dataset.load_rgb(image_id), cfg.size))
        texts.append(caps)
        made.append(label)
        kept.append(int(image_id))
    omega = entity_set({i: t for i, t, m in zip(kept, texts, made) if m is None}, cfg.min_entity_images)
    omega = sorted(set(omega) | {n for m in made if m is not None for n in m[1]})
    index = {e: k for k, e in enumerate(omega)}
    captions, caption_labelled, captions_of, ents, masked = [], [], [], [], []
    for caps, label in zip(texts, made):
        captions_of.append(list(range(len(captions), len(captions) + len(caps))))
        for c in caps:
            captions.append(c)
            caption_labelled.append(label is not None)
            found = label[1] if label is not None else caption_entities(c, index)
            ents.append([index[e] for e in found if e in index])
            masked.append(label[0] if label is not None else mask_entities(c, index))
    enc = models.text_encoder
    caption_emb = enc.embed(captions).float().cpu()
    tokens, token_mask = _token_states(enc, masked)
    prompt_rng = random.Random(cfg.seed + 1)
    prompts = [entity_prompt([omega[k] for k in e], prompt_rng) if e else "" for e in ents]
    with_entities = [i for i, p in enumerate(prompts) if p]
    prompt_emb = torch.zeros(len(captions), caption_emb.shape[1])
    if with_entities:
        prompt_emb[with_entities] = enc.embed([prompts[i] for i in with_entities]).float().cpu()
    entity_emb = enc.embed([class_prompt(e) for e in omega]).float().cpu() if omega else torch.zeros(0, 384)
    return Pairs(kept, torch.stack(feats), captions_of, captions, caption_labelled, ents, omega, caption_emb,
                 tokens, token_mask, prompt_emb, entity_emb)


@torch.no_grad()
def _token_states(enc, texts: list[str], batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-layer token states (M, T, D) float16 (padded to the longest) and their mask (M, T)."""
    states, masks = [], []
    for i in range(0, len(texts), batch):
        s = enc.tokens(texts[i : i + batch])
        states.append(s.last.float().cpu())
        masks.append(s.mask.bool().cpu())
    t = max(s.shape[1] for s in states)
    states = torch.cat([F.pad(s, (0, 0, 0, t - s.shape[1])) for s in states]).to(torch.float16)
    masks = torch.cat([F.pad(m, (0, t - m.shape[1])) for m in masks])
    return states, masks


# -------------------------------------------------------------------------------------------- training

def epoch_batches(pairs: Pairs, batch_size: int, rng: random.Random) -> list[list[tuple[int, int]]]:
    """Batches of (image, caption) rows: per batch, anchors in a random order, each followed by a partner
    image whose chosen caption shares an entity with the anchor's (when one exists); one caption per image
    drawn at random. Every image is an anchor once per epoch."""
    by_entity: dict[int, list[tuple[int, int]]] = {}
    for img, caps in enumerate(pairs.captions_of):
        for c in caps:
            for e in pairs.entities[c]:
                by_entity.setdefault(e, []).append((img, c))
    order = list(range(len(pairs.ids)))
    rng.shuffle(order)
    half = max(1, batch_size // 2)
    batches = []
    for start in range(0, len(order), half):
        rows = []
        for img in order[start : start + half]:
            cap = rng.choice(pairs.captions_of[img])
            rows.append((img, cap))
            shared = [e for e in pairs.entities[cap] if len(by_entity[e]) > 1]
            if shared:
                e = rng.choice(shared)
                partner = rng.choice([p for p in by_entity[e] if p[0] != img] or [None])
                if partner is not None:
                    rows.append(partner)
        batches.append(rows)
    return batches


def shared_pairs(rows: list[tuple[int, int]], pairs: Pairs, rng: random.Random) -> tuple[list, list[int]]:
    """(pairs of row positions (a, b) of different images that share an entity, that entity for each), at
    most one pair per anchor row."""
    out, ents = [], []
    for a in range(len(rows) - 1):
        b = a + 1
        ia, ca = rows[a]
        ib, cb = rows[b]
        if ia == ib:
            continue
        common = sorted(set(pairs.entities[ca]) & set(pairs.entities[cb]))
        if common:
            out.append((a, b))
            ents.append(rng.choice(common))
    return out, ents


def train_network(cfg: TrainConfig, pairs: Pairs, device: torch.device, progress: bool, desc: str) -> tuple[OVSegNet, dict]:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    config = OVSegConfig(in_channels=pairs.patches.shape[1], groups=cfg.groups, layers_before=cfg.layers_before,
                         layers_after=cfg.layers_after, pos_grid=pairs.patches.shape[-1])
    net = OVSegNet(config).to(device).train()
    ema = make_ema(net) if cfg.mask_loss else None
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(pairs.ids) / max(1, cfg.batch_size // 2))  # one per `epoch_batches` batch
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 20)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    records = []
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    step = 0
    for epoch in range(cfg.epochs):
        lam = cfg.mask_weight if (cfg.mask_loss and epoch >= int(cfg.mask_from * cfg.epochs)) else 0.0
        sums = {"contrast": 0.0, "entity": 0.0, "mask": 0.0, "total": 0.0}
        batches = epoch_batches(pairs, cfg.batch_size, rng)
        for rows in batches:
            imgs = torch.tensor([r[0] for r in rows])
            caps = torch.tensor([r[1] for r in rows])
            x = pairs.patches[imgs].float().to(device)
            flip = torch.rand(len(rows)) < 0.5
            x[flip] = x[flip].flip(-1)
            out = net(x)
            # eq. 7 over distinct images (a partner with the anchor's caption would be a false negative)
            z_i = net.image_embedding(out["groups"])
            z_t = net.text_embedding(pairs.caption_emb[caps].to(device))
            loss_c = contrastive_loss(z_i, z_t, net.logit_scale)
            loss = loss_c
            loss_e = torch.zeros(())
            if cfg.entity_loss:
                has = torch.tensor([bool(pairs.entities[c]) for c in caps.tolist()], device=device)
                z_m = net.complete(pairs.masked_tokens[caps].float().to(device), pairs.masked_mask[caps].to(device),
                                   out["groups"])
                z_e = net.text_embedding(pairs.prompt_emb[caps].to(device))
                loss_e = contrastive_loss(z_m, z_e, net.logit_scale, valid=has)
                loss = loss + loss_e
            loss_m = torch.zeros(())
            if cfg.mask_loss and lam > 0:
                couples, ents = shared_pairs(rows, pairs, rng)
                with torch.no_grad():
                    ema_out = ema(x)
                    ent = ema.text_embedding(pairs.entity_emb[ents].to(device)) if ents else None
                loss_m = mask_consistency(out, ema_out, net, ema, couples, ent if ents else [], cfg.ratio, cfg.delta)
                loss = loss + lam * loss_m
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            if ema is not None:
                ema_update(ema, net, cfg.momentum)
            step += 1
            for k, v in (("contrast", loss_c), ("entity", loss_e), ("mask", loss_m), ("total", loss)):
                sums[k] += float(v.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", epoch=epoch + 1)
        records.append({"epoch": epoch + 1, "lambda": lam, **{k: round(v / len(batches), 4) for k, v in sums.items()}})
    bar.close()
    return net.eval(), {"epochs": records, "steps": step}


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
def choose_threshold(net: OVSegNet, models: Models, images: list[dict]) -> tuple[str, float, dict]:
    """The background threshold of eq. 1 with the best mean strict IoU over the base pairs, in either form
    (`word_mask`): absolute on the score mapped to [0, 1], or relative to the word's peak on the image.
    Returns (mode, threshold, {mode: [[threshold, mean IoU], ...]})."""
    from ovseg.core.methods.ovsegmentor.method import threshold_mask

    names = sorted({n for img in images for n in img["masks"]})
    t_emb = net.text_embedding(models.text_encoder.embed([class_prompt(n) for n in names]).float().to(models.device))
    ious = {m: np.zeros(len(THRESHOLDS)) for m in MODES}
    count = 0
    for img in images:
        out = net(img["features"].to(models.device))
        scores = net.patch_scores(out, t_emb)[0]
        for n, m in img["masks"].items():  # each word's score at image size once, then every threshold
            s = F.interpolate(scores[names.index(n)][None, None], size=img["size"], mode="nearest")[0]
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


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    models = Models("cpu")
    dataset = CocoConceptDataset(cfg.coco_dir, classes=BASE_CLASSES)
    train_ids, held_ids = split_image_ids(dataset.image_ids, cfg.holdout_fraction, cfg.seed)
    if cfg.max_images:  # an even sample of the training images (captioned and not, as in the whole split)
        train_ids = train_ids[:: max(1, len(train_ids) // cfg.max_images)][: cfg.max_images]
    pairs = build_pairs(cfg, models, dataset, train_ids, progress)
    t_data = time.perf_counter() - t_start
    threshold_data = base_pairs(models, dataset, train_ids[: cfg.threshold_images])
    summary = {
        "data": {"coco_dir": str(Path(cfg.coco_dir).resolve()), "images": len(pairs.ids),
                 "train_ids_sha1": hashlib.sha1(json.dumps(sorted(pairs.ids)).encode()).hexdigest(),
                 "captioned_images": sum(not pairs.labelled[c[0]] for c in pairs.captions_of),
                 "label_captioned_images": sum(pairs.labelled[c[0]] for c in pairs.captions_of),
                 "captions": len(pairs.captions), "label_captions": sum(pairs.labelled),
                 "entities": len(pairs.entity_names),
                 "captions_with_entities": sum(bool(e) for e in pairs.entities),
                 "read": "captions, base-class labels of uncaptioned images; base masks of "
                         f"{len(threshold_data)} training images for the background threshold only"},
        "networks": {}, "seconds": {"data": round(t_data, 1)}}
    out = Path(cfg.out)
    with replaced_folder(out) as tmp:
        for variant, vcfg in variant_configs(cfg).items():
            t0 = time.perf_counter()
            net, record = train_network(vcfg, pairs, models.device, progress, f"ovsegmentor: {variant}")
            mode, threshold, curves = choose_threshold(net, models, threshold_data)
            net.save(tmp / VARIANTS[variant], {"entities": pairs.entity_names, "background_threshold": threshold,
                                               "threshold_mode": mode, "train": asdict(vcfg)})
            summary["networks"][variant] = {"file": VARIANTS[variant], "groups": vcfg.groups,
                                            "losses": {"entity": vcfg.entity_loss, "mask": vcfg.mask_loss},
                                            "background_threshold": threshold, "threshold_mode": mode,
                                            "threshold_curves_base_iou": curves,
                                            "training": record, "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_json(tmp / "config.json", {"train": asdict(cfg)})
        if cfg.evaluate:
            summary["evaluation"] = evaluate_networks(tmp, cfg, models, held_ids, progress)
        summary["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
        summary["torch"] = torch.__version__
        atomic_write_json(tmp / "training.json", summary)
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
        rows[v] = {"miou_target": round(m["concept_miou"]["target"], 4), "miou_base": round(m["concept_miou"]["base"], 4),
                   "presence_ap_target": round(m["presence_ap"]["target"], 4), "oracle_group_miou": oracle[v]}
    whole = metrics["reference"]["whole_image_mask"]["concept_miou"]
    return {"images": metrics["dataset"]["images"], "rows": rows,
            "whole_image_mask": {"target": round(whole["target"], 4), "base": round(whole["base"], 4)}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coco", default="../shared/data/coco_dev", help="COCO folder (images/, instances.json, captions.json)")
    p.add_argument("--out", default="assets/checkpoints/ovsegmentor", help="model folder (replaced when done)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--groups", type=int, default=TrainConfig.groups, help="K, the number of group tokens")
    p.add_argument("--max-images", type=int, default=None, help="an even sample of N training images (quick runs)")
    p.add_argument("--no-ablation", action="store_true", help="train the full model only (no Table 3/5 rows)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")


def run(args) -> Path:
    return train(TrainConfig(coco_dir=args.coco, out=args.out, epochs=args.epochs, groups=args.groups,
                             max_images=args.max_images, ablation=not args.no_ablation, evaluate=not args.no_eval))


register_trainer("ovsegmentor", "OVSegmentor's groups from image-caption pairs (contrast, entity completion, "
                 "mask consistency)", add_arguments, run)
