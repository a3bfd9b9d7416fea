"""Training Concept Mask: box grids, soft IoU, tags, and a short real run that reads no target-class annotation."""

import json

import pytest
import torch

from ovseg.core.models.imagenet import imagenet_classes
from ovseg.train.coco import TARGET_CLASSES
from ovseg.train.methods.concept_mask import box_grid, pseudo_tags
from helpers import COCO_DEV



def test_box_grid_marks_half_covered_cells_and_keeps_tiny_boxes():
    g = box_grid([[0, 0, 50, 30]], (100, 100), (10, 10))
    assert g.shape == (10, 10) and g.sum() == 15 and g[:3, :5].all()
    # a box covering a quarter of one cell still marks that cell
    tiny = box_grid([[95, 95, 5, 5]], (100, 100), (10, 10))
    assert tiny.sum() == 1 and tiny[9, 9] == 1
    # two boxes: their union
    both = box_grid([[0, 0, 50, 30], [95, 95, 5, 5]], (100, 100), (10, 10))
    assert both.sum() == 16


def test_pseudo_tags_are_the_confident_imagenet_classes():
    probs = torch.zeros(1000)
    probs[[1, 281]] = torch.tensor([0.5, 0.3])
    probs[2] = 0.1
    names = imagenet_classes()
    assert pseudo_tags(probs, 0.2) == [names[1].name.lower(), names[281].name.lower()]


@pytest.mark.skipif(not COCO_DEV.is_dir(), reason=f"shared data not found at {COCO_DEV}")
def test_image_tags_take_target_classes_from_captions_only():
    from ovseg.train.coco import CocoConceptDataset
    from ovseg.train.methods.concept_mask import image_tags

    dataset = CocoConceptDataset(COCO_DEV)
    checked = 0
    for image_id in dataset.image_ids:
        captions = " ".join(dataset.captions(image_id)).lower()
        hidden = [n for n in dataset.classes_present(image_id) if n in TARGET_CLASSES and n not in captions]
        if not hidden:
            continue
        tags = image_tags(dataset, image_id, torch.zeros(1000), 0.2)
        assert not set(hidden) & set(tags), (image_id, hidden, tags)
        base = [n for n in dataset.classes_present(image_id) if n not in TARGET_CLASSES]
        assert set(base) <= set(tags)
        checked += 1
        if checked == 5:
            break
    assert checked == 5


@pytest.mark.slow
@pytest.mark.skipif(not COCO_DEV.is_dir(), reason=f"shared data not found at {COCO_DEV}")
def test_a_short_training_run_reads_no_target_annotation_and_loads_as_the_method(tmp_path, monkeypatch, predictor,
                                                                                  examples_dir, decoded_categories):
    import ovseg.train.methods.concept_mask as cm
    from ovseg.core.methods.concept_mask.method import ConceptMask

    decoded = decoded_categories
    boxes_read = []
    real_boxes = cm.base_boxes

    def boxes_spy(dataset, image_id):
        out = real_boxes(dataset, image_id)
        boxes_read.extend(out)
        return out

    monkeypatch.setattr(cm, "base_boxes", boxes_spy)
    cfg = cm.TrainConfig(coco_dir=str(COCO_DEV), out=str(tmp_path / "cm"), max_images=6, embed_epochs=5,
                         refine_epochs=1, seg_epochs=1, seg_batch=2, train_size=96)
    out = cm.train(cfg, progress=False)
    assert decoded and not set(decoded) & set(TARGET_CLASSES), decoded
    assert boxes_read and not set(boxes_read) & set(TARGET_CLASSES)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["attention.pt", "attention_nosd.pt", "attention_original.pt", "config.json", "segmenter",
                     "segmenter_single", "tags.npz", "training.json", "verification.json"]
    calibration = json.loads((out / "verification.json").read_text())  # on held-out base classes (issue 17)
    assert calibration["summary"]["images"] == 93 and len(calibration["folds"]) == 2
    assert not set(calibration["all"]["covered"]) & set(TARGET_CLASSES)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    summary = json.loads((out / "training.json").read_text())
    assert summary["data"]["train_images"] == 6
    assert summary["stage1_loss"]["last_epoch"] < summary["stage1_loss"]["first_epoch"]
    config = json.loads((out / "config.json").read_text())
    assert config["refined_concepts"] and not set(config["refined_concepts"]) & set(TARGET_CLASSES)
    assert 0.0 <= config["theta"] <= 1.0

    predictor.set_image(examples_dir / "cat.jpg")
    for spec in ({}, {"attention": "nosd", "scales": 1}, {"attention": "original"}):
        method = ConceptMask(predictor.models, checkpoint=out, verify=False, **spec)
        r = method.predict(predictor._state, "cat")
        h, w = predictor._state.size
        assert r.mask.shape == (h, w) and 0.0 <= r.score <= 1.0
        assert [p.kind for p in r.priors] == ["attention", "attention_refined", "probability"]
        assert all(p.map.shape == (h, w) for p in r.priors)
    # a second run replaces the model folder whole
    cfg.ablation = False
    out = cm.train(cfg, progress=False)
    assert not (out / "segmenter_single").exists() and (out / "segmenter").is_dir()
