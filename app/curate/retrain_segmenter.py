"""The class-agnostic segmenter's half of `ovseg retrain`: Golub et al.'s segmenter (RGB + S+ + S- ->
foreground), the one `cls_saliency` uses, fine-tuned on the curated labels.

* Pairs: one per (image, word) of the curated labels on training images, the target being the union of
  that word's curated masks there (the segmenter segments a concept, not an instance). Where the word names
  a base class annotated on that COCO image, the annotation wins. The base-class pairs of the same images
  (as `ovseg train cls_saliency` makes them) are replayed beside them, so that the segmenter does not
  forget what it learnt.
* Priors: each pair's word gives its proxy labels and S+/S- exactly as the segmenter in use was trained
  (its variant, saliency mode, mapper and input size); guided-backprop maps are cached on disk with
  `ovseg train cls_saliency`'s, so a second retrain on the same images does not recompute them.
* Training: the segmenter in use (a retrained version or the packaged sem2c_neg) goes on training with
  its loss and its trainable parts, at a lower learning rate, for the retrain's epochs.
* Result: `<data dir>/checkpoints/cls_saliency/vN/` (weights.pt, config.json, retrain.json), made the
  version in use; `cls_saliency` without a `checkpoint` option loads it when its variant and saliency
  mode are the ones asked for. The held-out concept mIoU of `cls_saliency` before and after is measured
  on the first `eval_images` held-out images (guided backprop makes every image cost seconds).
"""

from __future__ import annotations

import json
import logging
import random
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ovseg.core.errors import OvsegError

log = logging.getLogger(__name__)
METHOD = "cls_saliency"
# Images that are not in the COCO folder get cache keys above any COCO id.
_PATH_KEY_OFFSET = 10**12


@dataclass
class SegmenterRetrainConfig:
    epochs: int = 3
    lr: float = 2e-4  # the packaged segmenters trained at 1e-3 (one-cycle): fine-tune gentler
    seed: int = 0
    evaluate: bool = True
    eval_images: int = 30  # held-out images for before/after (about 10 s each with guided backprop)


class _Images:
    """load_rgb(key) for COCO images (by id, on the masks' pixel grid) and curated images from elsewhere (by
    a key made from the path), as the training helpers of `ovseg.train.methods.cls_saliency` expect of a dataset."""

    def __init__(self, dataset):
        self.dataset, self.paths = dataset, {}

    def key(self, coco_id: int | None, path: str) -> int:
        if coco_id is not None:
            return int(coco_id)
        st = Path(path).stat()  # the file's identity, so that a changed file gets fresh cached priors
        key = _PATH_KEY_OFFSET + zlib.crc32(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode())
        self.paths[key] = path
        return key

    def load_rgb(self, key: int) -> np.ndarray:
        if key in self.paths:
            from ovseg.core.image_io import load_image

            return load_image(self.paths[key])
        return self.dataset.load_rgb(key)


def training_pairs(kept: list[dict], dataset, path_to_id: dict, images: _Images) -> tuple[dict, list]:
    """({(key, word): HxW uint8 target}, the base pairs replayed): curated pairs on training images, and the
    base-class pairs of the COCO images they lie on (annotations decoded for base classes only)."""
    from ovseg.train.coco import base_training_pairs, training_mask

    curated: dict[tuple[int, str], np.ndarray] = {}
    for lab in kept:
        coco_id = path_to_id.get(Path(lab["filepath"]).resolve())
        key = images.key(coco_id, lab["filepath"])
        m = curated.get((key, lab["word"]))
        curated[(key, lab["word"])] = lab["mask"] if m is None else (m | lab["mask"])
    coco_ids = sorted({k for k, _ in curated if k < _PATH_KEY_OFFSET})
    base = base_training_pairs(dataset, coco_ids)
    targets = {pair: training_mask(dataset, *pair) for pair in base}
    for pair, mask in curated.items():
        if pair not in targets:  # a base class annotated on the image: the annotation wins
            if pair[0] < _PATH_KEY_OFFSET and mask.shape != dataset.image_size(pair[0]):
                raise OvsegError(f"curated mask of {pair[1]!r} on COCO image {pair[0]} is {mask.shape}, the image "
                                 f"{dataset.image_size(pair[0])}: was the dataset labelled from another folder?")
            targets[pair] = mask.astype(np.uint8)
    return targets, base


def retrain_segmenter(cfg: SegmenterRetrainConfig, kept: list[dict], dataset, root: Path, path_to_id: dict,
                      dataset_name: str, progress: bool = True, stage=None, models=None) -> dict:
    """Fine-tune the segmenter in use on the curated labels `kept` (already off the held-out images); write
    and select a new version. Returns its summary (also written as retrain.json). `path_to_id`: {resolved
    path: COCO id} of the training images. `models`: loaded CPU models to share (else they are loaded)."""
    from tqdm import tqdm

    from ovseg.core.models.backbone import input_size, preprocess
    from ovseg.core.cache import atomic_write_json, cache_dir, replaced_folder
    from ovseg.core.checkpoints import current_version, method_dir, next_version, use
    from ovseg.core.methods.cls_saliency.method import VARIANT_NEGATIVES, default_checkpoint
    from ovseg.core.models import Models
    from ovseg.core.ops.segmenter import load_segmenter, save_segmenter
    from ovseg.train.methods.cls_saliency import SaliencyCache, TrainConfig, gate_entries
    from ovseg.train.segmenter_fit import fit_segmenter, loss_summary, resized_target, training_sample

    def say(text):
        log.info(text)
        if stage:
            stage(text)

    t_start = time.perf_counter()
    before_version, before_folder = current_version(METHOD), default_checkpoint()
    model = load_segmenter(before_folder, torch.device("cpu"))
    trained = json.loads((before_folder / "config.json").read_text()).get("train", {})
    tcfg = TrainConfig(coco_dir=str(root), out="", variant=trained.get("variant", "sem2c_neg"),
                       mapper=trained.get("mapper", "wordnet"), long_side=int(trained.get("long_side", 448)),
                       train_size=int(trained.get("train_size", 320)), batch_size=int(trained.get("batch_size", 8)),
                       weight_decay=float(trained.get("weight_decay", 1e-4)),
                       saliency=trained.get("saliency", "guided_backprop"), seed=cfg.seed)
    in_channels, negatives = model.config.in_channels, VARIANT_NEGATIVES[tcfg.variant]

    images = _Images(dataset)
    targets, base = training_pairs(kept, dataset, path_to_id, images)
    if len(targets) < 2:
        raise OvsegError(f"the segmenter needs at least 2 (image, word) pairs to train on, the curated labels "
                         f"give {len(targets)}")
    by_key: dict[int, list[str]] = {}
    for key, word in targets:
        by_key.setdefault(key, []).append(word)

    say("segmenter: saliency priors of the curated pairs")
    models = models or Models("cpu")
    cache = SaliencyCache(cache_dir() / "saliency", models, tcfg.mapper, tcfg.long_side)
    entries, inputs = {}, {}
    for key, words in tqdm(by_key.items(), desc="segmenter priors", unit="img", disable=not progress):
        rgb = images.load_rgb(key)
        inputs[key] = preprocess(rgb, input_size(rgb.shape[0], rgb.shape[1], tcfg.long_side), torch.device("cpu"))[0]
        if in_channels > 3:
            got = cache.get_image(key, words, negatives if in_channels == 5 else "none", lambda r=rgb: r)
            entries.update({(key, w): e for w, e in got.items()})
    if in_channels > 3 and tcfg.saliency in ("cam_gated", "cam"):
        for key, words in by_key.items():
            gate_entries(models, tcfg, images, key, words, negatives, entries)
    priors_s = time.perf_counter() - t_start

    resized = {pair: resized_target(t, tcfg.train_size) for pair, t in targets.items()}

    def sample(pair, flip):
        priors = [torch.from_numpy(entries[pair][k].astype(np.float32)) for k in ("pos", "neg")[: in_channels - 3]]
        return training_sample(inputs[pair[0]], priors, resized[pair].long(), tcfg.train_size, flip)

    say("segmenter: training")
    torch.manual_seed(cfg.seed)
    pairs = sorted(targets)
    model, losses, train_s = fit_segmenter(
        model.config, pairs, sample, epochs=cfg.epochs, batch_size=tcfg.batch_size, lr=cfg.lr,
        weight_decay=tcfg.weight_decay, seed=cfg.seed, rng=random.Random(cfg.seed), progress=progress,
        desc="retrain segmenter", init=model)

    version = next_version(METHOD)
    folder = method_dir(METHOD) / version
    words = Counter(w for _, w in pairs)
    summary = {
        "version": version, "folder": str(folder), "from": before_version, "from_folder": str(before_folder),
        "dataset": dataset_name, "variant": tcfg.variant, "saliency": tcfg.saliency,
        "config": {"epochs": cfg.epochs, "lr": cfg.lr, "seed": cfg.seed, "coco_dir": str(root),
                   "eval_images": cfg.eval_images},
        "pairs": {"curated": len(pairs) - len(base), "base_replayed": len(base), "images": len(by_key),
                  "words": dict(sorted(words.items()))},
        "loss": loss_summary(losses),
        "seconds": {"priors": round(priors_s, 1), "training": round(train_s, 1)},
    }
    say("segmenter: saving the new version")
    with replaced_folder(folder) as tmp:
        save_segmenter(tmp, model.eval(), model.config, {**trained, "retrained": {"from": before_version,
                                                                                "dataset": dataset_name}})
        atomic_write_json(tmp / "retrain.json", summary)

    if cfg.evaluate:
        say(f"segmenter: evaluating before and after on {cfg.eval_images} held-out images")
        summary["evaluation"] = evaluate_before_after(root, METHOD, before_folder, folder, progress,
                                                      limit=cfg.eval_images, models=models)
        summary["seconds"]["evaluation"] = summary["evaluation"].pop("seconds")
        atomic_write_json(folder / "retrain.json", summary)
    use(METHOD, version)
    return summary


def evaluate_before_after(root: Path, method: str, before: Path, after: Path, progress: bool,
                          limit: int | None = None, models=None) -> dict:
    """`ovseg eval`'s concept mIoU of `method` with the two checkpoints, on the held-out images only (the
    first `limit` of them): {"before", "after": {"target_miou", "base_miou"}, "images", "pairs", "seconds"}.
    `models`: loaded models to share (else they are loaded)."""
    from ovseg.train.evaluate import evaluate
    from ovseg.core.predictor import Predictor

    t0 = time.perf_counter()
    specs = [f"{method}[checkpoint={before}]", f"{method}[checkpoint={after}]"]
    predictor = Predictor(models=models) if models is not None else None
    metrics, _ = evaluate(root, specs, limit=limit, progress=progress, reference=False, held_out_only=True,
                          predictor=predictor)
    ev = {}
    for name, spec in zip(("before", "after"), specs):
        m = metrics["methods"][spec]
        ev[name] = {"target_miou": m["concept_miou"]["target"], "base_miou": m["concept_miou"]["base"]}
    ev["images"] = metrics["dataset"]["images"]
    ev["pairs"] = {"target": metrics["dataset"]["pairs_target"], "base": metrics["dataset"]["pairs_base"]}
    ev["seconds"] = round(time.perf_counter() - t0, 1)
    return ev
