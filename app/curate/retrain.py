"""`ovseg retrain NAME`: fine-tune the student heads on the curated labels of a dataset plus the base training
data, XPM's student and (unless `segmenter=False`) the class-agnostic segmenter of `cls_saliency`, each as a
new versioned checkpoint that becomes the one in use; evaluate before and after on held-out images. This
module does XPM's student; `ovseg.app.curate.retrain_segmenter` the segmenter, whose summary is the result's
"segmenter" entry.

* Curated labels: the dataset's pseudo-masks tagged `approved` (or on an approved sample; `rejected` wins),
  including those corrected in ovseg-app. Each is a ground-truth instance of its word: box from the mask,
  mask at network-input scale. A curated word that names a base class joins that class.
* Base training data: the base-class instances of the training part of the COCO folder (`--coco`, default
  the dataset's own source when it is a COCO folder with instances.json), as `ovseg train xpm` reads them.
  Curated labels on its held-out images are dropped (they are what the evaluation measures on).
* Training: the student in use (retrained or packaged) continues with L_GT (proposal, region
  classification over the base classes and the curated words, class-agnostic mask loss) for `epochs`
  epochs; reviewed labels are clean, so the mask loss is the plain one (g_Noise is kept as it is).
* Result: `<data dir>/checkpoints/xpm/vN/` (the previous versions stay; `ovseg checkpoints xpm --use ...`
  picks one), `retrain.json` with the data summary, losses and the held-out target/base concept mIoU of
  `xpm` before and after, measured by `ovseg eval`'s protocol on the held-out images.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ovseg.core.errors import OvsegError

log = logging.getLogger(__name__)
METHOD = "xpm"


@dataclass
class RetrainConfig:
    dataset: str
    coco_dir: str | None = None
    tags: tuple[str, ...] = ("approved",)
    epochs: int = 3
    lr: float = 2e-4
    batch_images: int = 4
    long_side: int = 448
    seed: int = 0
    evaluate: bool = True
    curated_only: bool = False  # train XPM on the curated images alone (quick runs, tests)
    segmenter: bool = True  # also fine-tune cls_saliency's class-agnostic segmenter (ovseg.app.curate.retrain_segmenter)
    segmenter_eval_images: int = 30


def _coco_dir(cfg: RetrainConfig, ds) -> Path:
    if cfg.coco_dir:
        root = Path(cfg.coco_dir).expanduser()
    else:
        info = ds.info.get("ovseg", {})
        if info.get("source_kind") != "coco":
            raise OvsegError(f"dataset {cfg.dataset!r} was not labelled from a COCO folder: give the base "
                             "training data with --coco DIR")
        root = Path(info["source"])
    if not (root / "instances.json").is_file():
        raise OvsegError(f"{root} has no instances.json: --coco must be a COCO folder with base-class annotations")
    return root


def curated_annotations(labels: list[dict], input_hw: tuple[int, int], class_index: dict[str, int]) -> dict:
    """Curated masks (full image) -> ground truth at network-input scale: boxes, labels, masks."""
    import cv2

    H, W = input_hw
    boxes, labs, masks = [], [], []
    for lab in labels:
        m = cv2.resize(lab["mask"].astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)
        ys, xs = np.nonzero(m)
        if len(xs) == 0:
            continue
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labs.append(class_index[lab["word"]])
        masks.append(m)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labs, dtype=torch.long),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, H, W), dtype=torch.bool)}


def _merge(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in ("boxes", "labels", "masks")}


def retrain(cfg: RetrainConfig, progress: bool = True, db_dir=None, on_stage=None) -> dict:
    """Run the whole retrain; returns the summary written to retrain.json (with "version" and "folder")."""
    from tqdm import tqdm

    from ovseg.core.models.backbone import input_size
    from ovseg.core.cache import atomic_write_json, replaced_folder
    from ovseg.core.checkpoints import current_version, method_dir, next_version, use
    from ovseg.core.checkpoints import in_use
    from ovseg.core.models import Models
    from ovseg.core.methods.xpm.model import XPMNet
    from ovseg.app.curate.export import curated_labels
    from ovseg.app.curate.fo import load_dataset
    from ovseg.app.curate.retrain_segmenter import SegmenterRetrainConfig, evaluate_before_after, retrain_segmenter
    from ovseg.train.coco import BASE_CLASSES, CocoConceptDataset, split_image_ids
    from ovseg.train.methods.xpm import (TrainConfig, base_annotations, fit_network, flip_annotations,
                                         image_features, loss_summary, teacher_image_loss)

    def stage(text):
        log.info(text)
        if on_stage:
            on_stage(text)

    t_start = time.perf_counter()
    ds = load_dataset(cfg.dataset, db_dir)
    labels = curated_labels(ds, list(cfg.tags))
    if not labels:
        raise OvsegError(f"no pseudo-mask of {cfg.dataset!r} is tagged {' or '.join(cfg.tags)}: nothing to "
                         "retrain from (review the dataset first)")
    root = _coco_dir(cfg, ds)
    dataset = CocoConceptDataset(root)
    train_ids, held_ids = split_image_ids(dataset.image_ids)
    held_paths = {dataset.image_path(i).resolve() for i in held_ids}
    path_to_id = {dataset.image_path(i).resolve(): i for i in train_ids}
    kept = [lab for lab in labels if Path(lab["filepath"]).resolve() not in held_paths]
    dropped = len(labels) - len(kept)
    if not kept:
        raise OvsegError(f"all {len(labels)} curated labels lie on held-out images of {root}: nothing to train on")

    by_image: dict[str, list[dict]] = {}
    for lab in kept:
        by_image.setdefault(str(Path(lab["filepath"]).resolve()), []).append(lab)
    words = sorted({lab["word"] for lab in kept})
    vocab = list(BASE_CLASSES) + [w for w in words if w not in BASE_CLASSES]
    class_index = {w: 1 + i for i, w in enumerate(vocab)}

    before_version = current_version(METHOD)
    before_folder = in_use("xpm")
    student, extra = XPMNet.load(before_folder / "student.pt")
    torch.manual_seed(cfg.seed)
    models = Models("cpu")
    vectors = models.embed_words(vocab).float().cpu()

    stage("xpm: image features")
    image_keys = list(by_image) if cfg.curated_only else sorted(
        set(by_image) | {str(dataset.image_path(i).resolve()) for i in train_ids})
    data: dict[str, dict] = {}
    for key in tqdm(image_keys, desc="features", unit="img", disable=not progress):
        coco_id = path_to_id.get(Path(key))
        if coco_id is not None:
            rgb = dataset.load_rgb(coco_id)
        else:
            from ovseg.core.image_io import load_image

            rgb = load_image(key)
        hw = input_size(rgb.shape[0], rgb.shape[1], cfg.long_side)
        gt = base_annotations(dataset, coco_id, hw) if coco_id is not None else curated_annotations([], hw, class_index)
        if key in by_image:
            gt = _merge(gt, curated_annotations(by_image[key], hw, class_index))
        data[key] = {"input_hw": hw, "feats": [image_features(models, rgb, cfg.long_side, f) for f in (False, True)],
                     "gt": [gt, flip_annotations(gt, hw[1])]}

    stage("xpm: training the student")
    tcfg = TrainConfig(coco_dir=str(root), out="", batch_images=cfg.batch_images, seed=cfg.seed,
                       long_side=cfg.long_side)

    def fetch(key, flip):
        d = data[key]
        return {"feats": d["feats"][flip], "gt": d["gt"][flip], "input_hw": d["input_hw"], "pseudo": None}

    # L_GT on the curated and base-class masks (the curated words join the classification vocabulary)
    record = fit_network(student, list(data), fetch, teacher_image_loss(vectors, tcfg), epochs=cfg.epochs,
                         lr=cfg.lr, cfg=tcfg, desc="retrain xpm student", progress=progress, item_seed=cfg.seed)
    train_seconds = time.perf_counter() - t_start

    version = next_version(METHOD)
    folder = method_dir(METHOD) / version
    summary = {
        "version": version, "folder": str(folder), "from": before_version, "dataset": cfg.dataset,
        "config": {**asdict(cfg), "coco_dir": str(root)},
        "curated": {"labels": len(kept), "dropped_on_held_out": dropped, "images": len(by_image),
                    "words": {w: sum(lab["word"] == w for lab in kept) for w in words},
                    "new_words": [w for w in words if w not in BASE_CLASSES]},
        "base": {"images": 0 if cfg.curated_only else len(train_ids),
                 "instances": int(sum(len(d["gt"][0]["labels"]) for d in data.values())) - len(kept)},
        "losses": loss_summary(record["epochs"]),
        "seconds": {"training": round(train_seconds, 1)},
    }
    stage("xpm: saving the new version")
    with replaced_folder(folder) as tmp:
        for f in before_folder.iterdir():  # the other networks and files travel with the new student
            if f.is_file() and f.name not in ("student.pt", "retrain.json"):
                _link_or_copy(f, tmp / f.name)
        student.save(tmp / "student.pt", {**extra, "retrained_words": summary["curated"]["new_words"]})
        atomic_write_json(tmp / "retrain.json", summary)
    data.clear()  # the features of every training image: the evaluation and the segmenter need the memory

    if cfg.evaluate:
        stage("xpm: evaluating before and after on the held-out images")
        summary["evaluation"] = evaluate_before_after(root, METHOD, before_folder, folder, progress,
                                                      models=models)
        summary["seconds"]["evaluation"] = summary["evaluation"].pop("seconds")
        atomic_write_json(folder / "retrain.json", summary)
    use(METHOD, version)

    if cfg.segmenter:
        seg_cfg = SegmenterRetrainConfig(epochs=cfg.epochs, seed=cfg.seed, evaluate=cfg.evaluate,
                                         eval_images=cfg.segmenter_eval_images)
        try:
            summary["segmenter"] = retrain_segmenter(seg_cfg, kept, dataset, root, path_to_id, cfg.dataset,
                                                     progress=progress, stage=stage, models=models)
        except OvsegError as exc:  # e.g. too few pairs: XPM's new version stands, say why the segmenter did not
            log.warning("the segmenter was not retrained: %s", exc)
            summary["segmenter"] = {"error": str(exc)}
    return summary


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
