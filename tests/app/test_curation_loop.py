"""The whole curation loop on coco_dev, as the issue's acceptance asks: label 100 captioned training images with
their caption nouns, let a scripted reviewer approve the pseudo-masks whose IoU with the ground truth is at
least 0.5, export them as COCO, retrain XPM's student from the export's labels, and check that the retrained
model's target-class concept mIoU on the held-out images is higher than before.

The retrain here uses the curated images only (`curated_only`) and leaves the segmenter out, to keep the test
to a few minutes; `ovseg retrain` (the default: all training images' base annotations too, and the segmenter)
is measured in the README. The class-agnostic segmenter's retrain has its own test in test_curate.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import COCO_DEV, ROOT


# The whole loop passes within the suite's 900 s per test on an idle machine, but ran past it twice with a
# training run beside it on the 2 cores: it gets twice that limit (a hung step still fails).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800),
              pytest.mark.skipif(not COCO_DEV.is_dir(), reason="needs ../shared/data/coco_dev")]


def test_label_review_export_retrain_lifts_held_out_target_miou(tmp_path):
    from ovseg.core import checkpoints as ck
    from ovseg.app.curate.export import export, read_back
    from ovseg.app.curate.fo import fiftyone
    from ovseg.app.curate.label import label
    from ovseg.app.curate.retrain import RetrainConfig, retrain
    from ovseg.app.curate.review import oracle_review
    from ovseg.app.curate.schema import LABEL_FIELD, mask_from_detection
    from ovseg.train.coco import HOLDOUT_FRACTION

    fo = fiftyone()
    out = label(COCO_DEV, "loop-100", captions=True, split="train", limit=100, progress=False)
    assert out["images"] == 100 and out["labelled_images"] == 100 and not out["failed"]
    ds = fo.load_dataset("loop-100")
    assert set(ds.distinct("word_source")) == {"caption"}
    assert len(ds.distinct("image_key")) == 100

    review = oracle_review("loop-100", COCO_DEV, 0.5, progress=False)
    assert review["approved"] >= 100 and review["rejected"] > review["approved"]

    # the export holds exactly the approved masks, which pycocotools decodes bit for bit
    exp = export("loop-100", tmp_path / "coco", ["approved"])
    assert exp["annotations"] == review["approved"]
    back = read_back(tmp_path / "coco")
    approved: dict = {}
    for s in ds.iter_samples():
        for d in s[LABEL_FIELD].detections:
            if "approved" in d.tags:
                approved.setdefault((s["coco_id"], d.label), []).append(
                    mask_from_detection(d, (s["image_height"], s["image_width"])))
    assert back.keys() == approved.keys()
    for k, masks in approved.items():  # as many masks per (image, word), each equal: zip alone stops short
        assert len(back[k]) == len(masks), k
        assert all(np.array_equal(a, b) for a, b in zip(back[k], masks)), k

    ck.use("xpm", "packaged")  # retrain from the shipped student, whatever other tests left in use
    summary = retrain(RetrainConfig(dataset="loop-100", curated_only=True, segmenter=False, coco_dir=str(COCO_DEV)),
                      progress=False)
    ev = summary["evaluation"]
    # the evaluation runs on the images the default split holds out: its share of instances.json's images
    listed = [im["id"] for im in json.loads((COCO_DEV / "instances.json").read_text())["images"]]
    assert ev["images"] == round(HOLDOUT_FRACTION * len(set(listed))) and ev["pairs"]["target"] > 0
    assert summary["curated"]["labels"] == review["approved"]  # all 100 images are training images
    assert summary["losses"]["loss"]["last"] < summary["losses"]["loss"]["first"]
    before, after = ev["before"]["target_miou"], ev["after"]["target_miou"]
    assert after > before, f"held-out target concept mIoU fell: {before:.3f} -> {after:.3f}"
    assert ck.current_version("xpm") == summary["version"]
    ck.use("xpm", "packaged")  # leave the engine as the other tests expect it
