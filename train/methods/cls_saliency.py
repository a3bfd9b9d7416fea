"""`ovseg train cls_saliency`: the class-agnostic segmenter with attention channels of Golub et al.
(seed 002, sec. 3.2), trained on the base classes of a COCO folder only.

For every (image, base class present) pair of the training images: the class name's proxy labels and
guided-backprop saliency maps S+ and S- (cached on disk, so a second run does not recompute them), the image
normalised as the classifier expects, and the class's instance mask as the target (crowd regions ignored).
Variants (the paper's ablation): sem0c (RGB only), sem1c (RGB + S+), sem2c_rand (S- from random labels),
sem2c_neg (S- from the classifier's top unrelated labels: the method). `--saliency cam_gated` trains on
S+/S- gated by the labels' class activation maps instead (the project's class-discriminative option, not the
paper's); its checkpoint folder is <variant>-cam_gated; `--saliency cam` trains on the labels' class
activation maps themselves (dense priors; folder <variant>-cam).

It runs on `ovseg.train.scale` like every scalable trainer: `--device cuda`, `--amp`, `--workers`, and under
`torchrun --nproc_per_node=N` each process computes the saliency maps of every N-th image and then trains on
its share of every batch (N processes train the weights of one); rank 0 alone writes. The training state goes
to <out>/<folder>.resume/ every `--checkpoint-every` steps, and `--resume` goes on from it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ovseg.core.models.backbone import input_size, preprocess
from ovseg.core.cache import atomic_write_bytes, atomic_write_json, cache_dir
from ovseg.core.methods.cls_saliency.method import checkpoint_name
from ovseg.core.models import Models
from ovseg.core.methods.cls_saliency.proxy_labels import K, proxy_labels
from ovseg.core.methods.cls_saliency.saliency import (SALIENCY_MODES, cam_gate, cam_prior, class_activation, guided_net,
                                                      label_saliency, mean_saliency)
from ovseg.core.ops.segmenter import SegmenterConfig, save_segmenter
from ovseg.train.coco import (HOLDOUT_FRACTION, SPLIT_SEED, CocoConceptDataset, base_training_pairs, fraction_of,
                              split_image_ids, training_mask)
from ovseg.train.scale import dist
from ovseg.train.scale.cli import add_scale_arguments
from ovseg.train.segmenter_fit import fit_segmenter, loss_summary, resized_target, training_sample
from ovseg.train.registry import register_trainer

log = logging.getLogger(__name__)

VARIANTS = {  # name -> (input channels, negatives)
    "sem0c": (3, "none"),
    "sem1c": (4, "none"),
    "sem2c_rand": (5, "random"),
    "sem2c_neg": (5, "classifier"),
}


@dataclass
class TrainConfig:
    coco_dir: str
    out: str
    variant: str = "sem2c_neg"
    mapper: str = "wordnet"
    long_side: int = 448  # the predictor's input size: saliency maps are computed where they are used
    train_size: int = 320  # pairs are resized to train_size x train_size squares to batch them
    epochs: int = 6
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    holdout_fraction: float = HOLDOUT_FRACTION
    seed: int = SPLIT_SEED
    max_pairs: int | None = None
    train_backbone: str = "stem"
    saliency: str = "guided_backprop"  # or "cam_gated" (not the paper's; see ovseg.core.methods.cls_saliency.saliency.cam_gate)
    priors_to_head: bool = False  # see SegmenterConfig.priors_to_head
    fraction: float = 1.0  # the data-scaling study: this share of the training images (nested shares)
    device: str = "auto"
    amp: str = "auto"
    workers: int = 0  # DataLoader worker processes per training process
    checkpoint_every: int = 20  # steps between training-state checkpoints
    resume: bool = False

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if self.saliency not in SALIENCY_MODES:
            raise ValueError(f"saliency must be one of {SALIENCY_MODES}, got {self.saliency!r}")


class SaliencyCache:
    """S+ and S- of (image, class) pairs, as float16 .npy files under `root`: S+ once per pair, shared by
    every variant; S- per kind of negatives ("classifier", "random")."""

    def __init__(self, root: Path, models: Models, mapper: str, long_side: int):
        self.root = Path(root) / f"{mapper}-k{K}-{long_side}"
        self.models, self.mapper, self.long_side = models, mapper, long_side

    def path(self, kind: str, image_id: int, name: str) -> Path:
        """kind: "pos", or "neg-classifier" / "neg-random"."""
        return self.root / kind / f"{image_id}_{name.replace(' ', '_')}.npy"

    def get_image(self, image_id: int, names: list[str], negatives: str, rgb_loader) -> dict[str, dict]:
        """{name: {"pos": S+, "neg": S- (when negatives is not "none")}} for the classes of one image. The
        image is decoded, and label maps computed, only for what is not cached yet; labels several classes
        share (the negatives) are computed once."""
        kinds = ["pos"] + ([f"neg-{negatives}"] if negatives != "none" else [])
        out: dict[str, dict] = {name: {} for name in names}
        missing = []
        for name in names:
            for kind in kinds:
                path = self.path(kind, image_id, name)
                if path.is_file():
                    out[name][kind.split("-")[0]] = np.load(path)
                elif name not in missing:
                    missing.append(name)
        if missing:
            rgb = rgb_loader()
            x = preprocess(rgb, input_size(rgb.shape[0], rgb.shape[1], self.long_side), self.models.device)
            with torch.no_grad():
                probs = torch.softmax(self.models.backbone(x).logits[0], 0)
            cache: dict = {}
            for name in missing:
                proxies = proxy_labels(self.models, name, probs, self.mapper, K, negatives, seed=image_id)
                for kind, labels in (("pos", proxies.positive), (f"neg-{negatives}", proxies.negative)):
                    if kind not in kinds or kind.split("-")[0] in out[name]:
                        continue
                    maps = label_saliency(guided_net(self.models), cache, x, labels)
                    arr = mean_saliency(maps, labels, tuple(x.shape[-2:])).cpu().numpy().astype(np.float16)
                    buf = io.BytesIO()
                    np.save(buf, arr)
                    atomic_write_bytes(self.path(kind, image_id, name), buf.getvalue())
                    out[name][kind.split("-")[0]] = arr
        return out


class CachedPriors:
    """{(image_id, name): {"pos": S+, "neg": S-}} read from a SaliencyCache's files when asked (they must be
    there: `SaliencyCache.get_image` made them)."""

    def __init__(self, cache: SaliencyCache, negatives: str):
        self.cache, self.kinds = cache, ["pos"] + ([f"neg-{negatives}"] if negatives != "none" else [])

    def __getitem__(self, pair: tuple[int, str]) -> dict:
        image_id, name = pair
        return {kind.split("-")[0]: np.load(self.cache.path(kind, image_id, name)) for kind in self.kinds}


def gate_entries(models: Models, cfg: TrainConfig, dataset, image_id: int, names: list[str], negatives: str,
                  entries: dict) -> None:
    """Replace the cached guided-backprop S+/S- of an image's pairs by their CAM-gated versions, or by the
    labels' CAM itself when cfg.saliency is "cam" (the same proxy labels as the cache used: same mapper, K,
    negatives and seed)."""
    rgb = dataset.load_rgb(image_id)
    x = preprocess(rgb, input_size(rgb.shape[0], rgb.shape[1], cfg.long_side), models.device)
    with torch.no_grad():
        feats = models.backbone(x)
    probs = torch.softmax(feats.logits[0].float(), 0)
    head, fc = feats.head[0].float(), models.backbone.classifier.weight
    for name in names:
        proxies = proxy_labels(models, name, probs, cfg.mapper, K, negatives, seed=image_id)
        entry = entries[(image_id, name)]
        for key, labels in (("pos", proxies.positive), ("neg", proxies.negative)):
            if key in entry:
                activation = class_activation(head, fc, labels)
                if cfg.saliency == "cam":
                    gated = cam_prior(activation, entry[key].shape)
                else:
                    gated = cam_gate(torch.from_numpy(entry[key].astype(np.float32)).to(activation.device),
                                     activation)
                entry[key] = gated.cpu().numpy().astype(np.float16)


TARGET_CACHE_PAIRS = 20_000  # up to this many pairs, resized targets (100 KB each at 320 px) stay in memory


def _sample(dataset, image_id, name, entry, cfg: TrainConfig, in_channels: int, flip: bool, targets: dict | None):
    """-> (in_channels, S, S) input and (S, S) long target at the training size. `targets` (None: decode every
    time) keeps each pair's resized target, so its annotations are decoded once, not once per epoch."""
    rgb = dataset.load_rgb(image_id)
    x = preprocess(rgb, input_size(rgb.shape[0], rgb.shape[1], cfg.long_side), torch.device("cpu"))[0]
    priors = [torch.from_numpy(entry[k].astype(np.float32)) for k in ("pos", "neg")[: in_channels - 3]]
    target = None if targets is None else targets.get((image_id, name))
    if target is None:
        target = resized_target(training_mask(dataset, image_id, name), cfg.train_size)
        if targets is not None:
            targets[(image_id, name)] = target
    return training_sample(x, priors, target.long(), cfg.train_size, flip)


def train(cfg: TrainConfig, progress: bool = True) -> Path | None:
    """Train one variant; write weights.pt, config.json and training.json into cfg.out/<variant>/ (rank 0;
    other torchrun processes return None)."""
    ctx = dist.setup(cfg.device)
    try:
        return _train(cfg, ctx, progress and ctx.main)
    finally:
        dist.teardown()


def _train(cfg: TrainConfig, ctx: dist.Context, progress: bool) -> Path | None:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    in_channels, negatives = VARIANTS[cfg.variant]
    dataset = CocoConceptDataset(cfg.coco_dir)
    train_ids, held_ids = split_image_ids(dataset.image_ids, cfg.holdout_fraction, cfg.seed)
    train_ids = fraction_of(train_ids, cfg.fraction, cfg.seed)
    pairs = base_training_pairs(dataset, train_ids)
    if cfg.max_pairs:
        pairs = rng.sample(pairs, min(cfg.max_pairs, len(pairs)))
    if not pairs:
        raise ValueError(f"no (image, base class) pair to train on in {cfg.coco_dir}")

    models = Models(ctx.device)
    cache = SaliencyCache(cache_dir() / "saliency", models, cfg.mapper, cfg.long_side)
    by_image: dict[int, list[str]] = {}
    for image_id, name in pairs:
        by_image.setdefault(image_id, []).append(name)
    kind = negatives if in_channels == 5 else "none"
    t0 = time.perf_counter()
    # Each process computes the maps of every world-th image into the shared cache, then all read them all.
    mine = list(by_image.items())[ctx.rank :: ctx.world]
    for image_id, names in tqdm(mine, desc="saliency maps", unit="img", disable=not progress):
        cache.get_image(image_id, names, kind, lambda i=image_id: dataset.load_rgb(i))
    dist.barrier()
    if cfg.saliency == "guided_backprop":  # read per sample from the cache: nothing dataset-sized in memory
        entries = CachedPriors(cache, kind)
    else:  # the CAM-based priors are made from the cached maps here, in memory (coco_dev-sized runs)
        entries = {}
        for image_id, names in by_image.items():
            got = cache.get_image(image_id, names, kind, lambda i=image_id: dataset.load_rgb(i))
            entries.update({(image_id, n): e for n, e in got.items()})
    if cfg.saliency in ("cam_gated", "cam"):
        for image_id, names in tqdm(by_image.items(), desc=f"{cfg.saliency} priors", unit="img", disable=not progress):
            gate_entries(models, cfg, dataset, image_id, names, negatives, entries)
    saliency_s = time.perf_counter() - t0

    seg_cfg = SegmenterConfig(in_channels=in_channels, train_backbone=cfg.train_backbone,
                              priors_to_head=cfg.priors_to_head)
    targets: dict | None = {} if len(pairs) <= TARGET_CACHE_PAIRS else None
    name = checkpoint_name(cfg.variant, cfg.saliency)
    resume_dir = Path(cfg.out) / f"{name}.resume"
    model, losses, train_s = fit_segmenter(
        seg_cfg, pairs, lambda pair, flip: _sample(dataset, *pair, entries[pair], cfg, in_channels, flip, targets),
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed,
        rng=rng, progress=progress, desc=f"train {name}", ctx=ctx, workers=cfg.workers, amp=cfg.amp,
        checkpoint=str(resume_dir / "state.pt"), checkpoint_every=cfg.checkpoint_every, resume=cfg.resume)
    if not ctx.main:
        return None
    out = _save(model.cpu(), cfg, seg_cfg, pairs, train_ids, held_ids, losses, saliency_s, train_s, ctx)
    shutil.rmtree(resume_dir, ignore_errors=True)  # the run finished: nothing to resume
    return out


def _save(model, cfg, seg_cfg, pairs, train_ids, held_ids, losses, saliency_s, train_s, ctx) -> Path:
    out = Path(cfg.out) / checkpoint_name(cfg.variant, cfg.saliency)
    classes: dict[str, int] = {}
    for _, name in pairs:
        classes[name] = classes.get(name, 0) + 1
    summary = {
        "data": {"coco_dir": str(Path(cfg.coco_dir).resolve()), "pairs": len(pairs),
                 "train_images": len(train_ids), "held_out_images": len(held_ids),
                 "held_out_ids_sha1": hashlib.sha1(json.dumps(held_ids).encode()).hexdigest(),
                 "pairs_per_class": dict(sorted(classes.items())),
                 "classes": "base classes only (DESIGN.md split); no target-class mask is read"},
        "loss": loss_summary(losses),
        "seconds": {"saliency_maps": round(saliency_s, 1), "training": round(train_s, 1)},
        "pairs_per_s": round(cfg.epochs * len(pairs) / train_s, 2) if train_s else None,
        "processes": ctx.world, "device": str(ctx.device),
        "torch": torch.__version__,
    }
    save_segmenter(out, model, seg_cfg, asdict(cfg))
    atomic_write_json(out / "training.json", summary)
    log.info("saved %s (loss %.3f -> %.3f)", out, summary["loss"]["first_20"], summary["loss"]["last_20"])
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coco", default="../shared/data/coco_dev", help="COCO folder (images/, instances.json)")
    p.add_argument("--out", default="assets/checkpoints/cls_saliency", help="checkpoint folder")
    p.add_argument("--variant", default="sem2c_neg", choices=sorted(VARIANTS))
    p.add_argument("--mapper", default="wordnet", choices=("wordnet", "text"))
    p.add_argument("--saliency", default="guided_backprop", choices=SALIENCY_MODES,
                   help="guided_backprop (the paper's), cam_gated (S+/S- gated by the labels' CAM) or cam "
                        "(the labels' CAM itself, dense)")
    p.add_argument("--priors-to-head", action="store_true",
                   help="also feed the priors to the trainable head (ASPP and low-level branch)")
    p.add_argument("--train-backbone", default=TrainConfig.train_backbone, choices=("none", "stem", "all"),
                   help="which backbone part trains besides the head (all: the paper's full fine-tuning, "
                        "slower)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--max-pairs", type=int, default=None, help="train on a random subset (quick runs)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="train on this share of the training images (the data-scaling study; nested shares)")
    add_scale_arguments(p, TrainConfig)


def run(args) -> Path | None:
    cfg = TrainConfig(coco_dir=args.coco, out=args.out, variant=args.variant, mapper=args.mapper,
                      saliency=args.saliency, priors_to_head=args.priors_to_head,
                      train_backbone=args.train_backbone,
                      epochs=args.epochs, batch_size=args.batch_size, max_pairs=args.max_pairs,
                      fraction=args.fraction, device=args.device, amp=args.amp, workers=args.workers,
                      checkpoint_every=args.checkpoint_every, resume=args.resume)
    return train(cfg)


register_trainer("cls_saliency", "Golub et al.'s class-agnostic segmenter", add_arguments, run, distributed=True)
