"""`ovseg train ovsegmentor` on a small sample of coco_dev: the losses fall, no mask is read for training (only
base masks, after training, for the background threshold), and the method runs from the folder it wrote."""

import json

import numpy as np
import pytest

from helpers import COCO_DEV, ROOT


@pytest.mark.slow
def test_tiny_training_losses_fall_reads_no_target_mask_and_the_method_runs(tmp_path, decoded_categories):
    from ovseg.core.image_io import load_image
    from ovseg.core.methods.base import ImageState
    from ovseg.core.methods.ovsegmentor.method import OVSegmentor
    from ovseg.core.models import Models
    from ovseg.train.coco import BASE_CLASSES, TARGET_CLASSES
    from ovseg.train.methods.ovsegmentor import TrainConfig, train

    if not (COCO_DEV / "captions.json").is_file():
        pytest.skip(f"coco_dev with captions is missing ({COCO_DEV})")
    cfg = TrainConfig(coco_dir=str(COCO_DEV), out=str(tmp_path / "ovs"), max_images=48, epochs=8, batch_size=16,
                      threshold_images=6, ablation=False, evaluate=False, mask_from=0.5)
    out = train(cfg, progress=False)
    # base masks of the threshold images only, decoded after training; never a target class
    assert not set(decoded_categories) & set(TARGET_CLASSES)
    assert set(decoded_categories) <= set(BASE_CLASSES)

    summary = json.loads((out / "training.json").read_text())
    data = summary["data"]
    assert data["captioned_images"] > 0 and data["label_captioned_images"] > 0 and data["entities"] > 0
    epochs = summary["networks"]["full"]["training"]["epochs"]
    assert epochs[-1]["contrast"] < epochs[0]["contrast"] and epochs[-1]["entity"] < epochs[0]["entity"]
    assert epochs[0]["lambda"] == 0.0 and epochs[-1]["lambda"] == 0.1 and epochs[-1]["mask"] > 0  # eq. 13 schedule
    assert (out / "model.pt").stat().st_size < 20e6

    models = Models("cpu")
    state = ImageState.compute(models, load_image(ROOT / "assets" / "examples" / "cat.jpg"), 448)
    method = OVSegmentor(models, checkpoint=out)
    r = method.predict(state, "cat", negatives=("blanket",))
    assert r.mask.shape == state.size and 0.0 <= r.score <= 1.0
    assignment = np.array(r.details["group_assignment"])
    assert assignment.shape == state.features.head.shape[-2:] and assignment.max() < 8
    legend = r.details["group_legend"]
    assert legend and abs(sum(share for _, share, _ in legend) - 1.0) < 0.01
    assert all(len(words) == 2 for _, _, words in legend)
    assert [p.kind for p in r.priors] == ["group"]


@pytest.mark.slow
def test_the_ablation_trains_every_network_from_one_source_k16_included(tmp_path):
    import torch

    from ovseg.core.methods.ovsegmentor.method import VARIANTS
    from ovseg.train.methods.ovsegmentor import TrainConfig, train

    if not (COCO_DEV / "captions.json").is_file():
        pytest.skip(f"coco_dev with captions is missing ({COCO_DEV})")
    cfg = TrainConfig(coco_dir=str(COCO_DEV), out=str(tmp_path / "ovs"), max_images=16, epochs=1, batch_size=8,
                      threshold_images=2, evaluate=False)
    out = train(cfg, progress=False)
    summary = json.loads((out / "training.json").read_text())
    assert set(summary["networks"]) == set(VARIANTS)
    for variant, file in VARIANTS.items():
        blob = torch.load(out / file, map_location="cpu", weights_only=False)
        assert blob["config"]["groups"] == (16 if variant == "k16" else 8)
        assert summary["networks"][variant]["training"]["steps"] == 1
    assert not (tmp_path / "ovs.resume").exists()
