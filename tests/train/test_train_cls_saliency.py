"""Training the class-agnostic segmenter: base classes only, never a target-class mask, a real checkpoint."""

import json

import numpy as np
import pytest
import torch

from ovseg.train.coco import BASE_CLASSES, TARGET_CLASSES, CocoConceptDataset, base_training_pairs, training_mask
from helpers import COCO_DEV

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not COCO_DEV.is_dir(), reason=f"shared data not found at {COCO_DEV}")]


@pytest.fixture(scope="module")
def dataset():
    return CocoConceptDataset(COCO_DEV)


def test_training_mask_refuses_target_classes_and_marks_crowds(dataset):
    image_id = next(i for i in dataset.image_ids if "dog" in dataset.classes_present(i))
    with pytest.raises(RuntimeError):
        training_mask(dataset, image_id, "dog")
    crowd_image = next(i for i in dataset.image_ids
                       if any(a.get("iscrowd") and dataset._cat_name[a["category_id"]] == "person"
                              for a in dataset.annotations(i)))
    target = training_mask(dataset, crowd_image, "person")
    assert target.dtype == np.uint8 and set(np.unique(target)) <= {0, 1, 255}
    assert (target == 1).any() and (target == 255).any()


def test_pairs_hold_base_classes_only(dataset):
    pairs = base_training_pairs(dataset, dataset.image_ids)
    # expected from instances.json itself: each (image, base class) with a non-crowd instance there, once
    data = json.loads((COCO_DEV / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    expected = {(a["image_id"], names[a["category_id"]]) for a in data["annotations"]
                if not a.get("iscrowd", 0) and names[a["category_id"]] in BASE_CLASSES}
    assert len(pairs) == len(set(pairs)) and set(pairs) == expected
    assert not {n for _, n in pairs} & set(TARGET_CLASSES)


def test_a_short_training_run_reads_no_target_mask_and_writes_a_loadable_checkpoint(tmp_path, monkeypatch,
                                                                                    decoded_categories):
    from ovseg.core.ops.segmenter import load_segmenter
    from ovseg.train.methods.cls_saliency import TrainConfig, train

    monkeypatch.setenv("OVSEG_CACHE_DIR", str(tmp_path / "cache"))
    decoded = decoded_categories
    cfg = TrainConfig(coco_dir=str(COCO_DEV), out=str(tmp_path / "ck"), max_pairs=4, epochs=1, batch_size=2,
                      train_size=96)
    out = train(cfg, progress=False)
    assert decoded and not set(decoded) & set(TARGET_CLASSES), decoded
    summary = json.loads((out / "training.json").read_text())
    assert summary["data"]["pairs"] == 4 and summary["loss"]["steps"] == 2
    assert not set(summary["data"]["pairs_per_class"]) & set(TARGET_CLASSES)
    # the saliency maps were cached: a second run computes none
    cached = sorted(p.parent.name for p in (tmp_path / "cache" / "saliency").rglob("*.npy"))
    assert cached == ["neg-classifier"] * 4 + ["pos"] * 4

    def no_saliency(*args, **kwargs):
        raise AssertionError("saliency recomputed although it was cached")

    monkeypatch.setattr("ovseg.train.methods.cls_saliency.label_saliency", no_saliency)
    train(cfg, progress=False)
    model = load_segmenter(out, torch.device("cpu"))
    x = torch.zeros(1, 5, 64, 64)
    assert model(x).shape == (1, 2, 64, 64)
