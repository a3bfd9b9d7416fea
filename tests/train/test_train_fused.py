"""`ovseg train fused`: the cross-fitted combiner on held-out coco_dev images, with the caption experts fitted
on the images that have captions; no target-class mask is read."""

import json

import pytest

from helpers import COCO_DEV
from ovseg.core.methods.fused.combiner import CrossFitted


@pytest.mark.slow
def test_training_fits_caption_experts_on_captioned_images_and_reads_no_target_mask(tmp_path, decoded_categories):
    from ovseg.train.coco import BASE_CLASSES, TARGET_CLASSES
    from ovseg.train.methods.fused import TrainConfig, train

    if not (COCO_DEV / "captions.json").is_file():
        pytest.skip(f"coco_dev with captions is missing ({COCO_DEV})")
    # the first 40 held-out images: the first 26 have no captions, the rest have
    out = train(TrainConfig(coco_dir=str(COCO_DEV), out=str(tmp_path / "fused"), max_images=40), progress=False)
    assert decoded_categories and set(decoded_categories) <= set(BASE_CLASSES)
    assert not set(decoded_categories) & set(TARGET_CLASSES)

    summary = json.loads((out / "training.json").read_text())
    captioned = summary["data"]["captioned_images"]
    assert 0 < captioned < summary["data"]["images"] == 40
    combiner = CrossFitted(out)
    for model in [combiner.all, *(m for _, m in combiner.folds)]:
        assert model.reads_captions  # presence experts with the caption's occurrence
        assert set(model.pixel) == {"any_word", "known_word"}  # pixel caption experts only with --caption-pixels
        assert "caption_logit" in model.presence["any_word+caption"].names
    # every expert scored on the same captioned images, cross-fitted
    figures = summary["cross_fitted_captioned"]
    assert figures["images"] == captioned
    assert set(figures["presence"]) == {"any_word", "known_word", "any_word+caption", "known_word+caption"}
    for expert in figures["presence"].values():
        assert 0.0 <= expert["ap_mean_over_classes"] <= 1.0 and 0.0 <= expert["brier"] <= 1.0
    assert summary["cross_fitted"]["images"] == 40 and set(summary["cross_fitted"]["presence"]) == {
        "any_word", "known_word"}
