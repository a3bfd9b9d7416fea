"""The packaged segmenters of Golub et al.'s ablation, chosen by method options, and the CAM-gated priors."""

import json

import numpy as np
import pytest

from ovseg.core.errors import OvsegError
from ovseg.core.methods.cls_saliency.method import VARIANT_NEGATIVES, ClsSaliency, checkpoint_name
from ovseg.core.checkpoints import packaged
from ovseg.train.methods.cls_saliency import VARIANTS

PACKAGED = [(v, "guided_backprop") for v in VARIANTS] + [("sem2c_neg", "cam_gated"), ("sem2c_neg", "cam")]


@pytest.mark.parametrize("variant, saliency", PACKAGED)
def test_packaged_checkpoints_match_their_variant_and_data(variant, saliency):
    folder = packaged("cls_saliency", checkpoint_name(variant, saliency))
    config = json.loads((folder / "config.json").read_text())
    assert config["train"]["variant"] == variant
    assert config["train"].get("saliency", "guided_backprop") == saliency
    assert config["segmenter"]["in_channels"] == VARIANTS[variant][0]
    summary = json.loads((folder / "training.json").read_text())
    reference = json.loads((packaged("cls_saliency", "sem2c_neg") / "training.json").read_text())
    # every variant saw the same pairs, so the ablation compares inputs, not data
    assert summary["data"]["pairs_per_class"] == reference["data"]["pairs_per_class"]
    assert summary["data"]["held_out_ids_sha1"] == reference["data"]["held_out_ids_sha1"]
    assert summary["loss"]["last_20"] < summary["loss"]["first_20"]
    assert (folder / "weights.pt").stat().st_size < 8_000_000


def test_the_checkpoint_decides_the_variant(predictor):
    with pytest.raises(OvsegError, match="trained with variant 'sem2c_neg', not 'sem1c'"):
        ClsSaliency(predictor.models, variant="sem1c", checkpoint=packaged("cls_saliency", "sem2c_neg"))
    with pytest.raises(OvsegError, match="variant must be one of"):
        ClsSaliency(predictor.models, variant="sem3c")
    with pytest.raises(OvsegError, match="saliency must be one of"):
        ClsSaliency(predictor.models, saliency="gradcam")
    method = ClsSaliency(predictor.models, checkpoint=packaged("cls_saliency", "sem2c_rand"))
    assert method.variant == "sem2c_rand" and method.negatives == VARIANT_NEGATIVES["sem2c_rand"] == "random"


@pytest.mark.slow
def test_variants_share_the_images_saliency_and_use_their_inputs(predictor, examples_dir):
    predictor.set_image(examples_dir / "cat.jpg")
    state = predictor._state
    full = predictor.predict("cat", methods="cls_saliency[saliency=guided_backprop,grabcut=off]").results[0]
    computed = set(state.cache["guided_backprop"])
    one = predictor.predict("cat", methods="cls_saliency[variant=sem1c,grabcut=off]").results[0]
    assert set(state.cache["guided_backprop"]) == computed  # S+ came from the cache: no new pass
    assert one.details["variant"] == "sem1c" and one.details["negative_proxies"] == []
    s_pos, s_neg = (p.map for p in one.priors[:2])
    assert s_neg.max() == 0.0 and np.allclose(s_pos, full.priors[0].map)
    rand = predictor.predict("cat", methods="cls_saliency[variant=sem2c_rand,grabcut=off]").results[0]
    assert len(rand.details["negative_proxies"]) == 5
    assert set(rand.details["negative_proxies"]).isdisjoint(full.details["negative_proxies"][:1])
    # a negative word joins S- even where the variant has no negatives of its own
    with_neg = predictor.predict("cat, -tv", methods="cls_saliency[variant=sem1c,grabcut=off]").results[0]
    assert with_neg.priors[1].map.max() > 0.0 and len(with_neg.details["negative_proxies"]) == 1


@pytest.mark.slow
def test_cam_gated_priors_tell_positive_from_negative_labels(predictor, examples_dir):
    """Guided backprop barely depends on the class on this network; gating by the labels' CAM does."""
    predictor.set_image(examples_dir / "astronaut.jpg")

    def correlation(saliency):
        r = predictor.predict("rocket", methods=f"cls_saliency[saliency={saliency},grabcut=off]").results[0]
        s_pos, s_neg = r.priors[0].map.ravel(), r.priors[1].map.ravel()
        assert 0.0 <= s_pos.min() and s_pos.max() <= 1.0 and r.details["saliency"] == saliency
        return float(np.corrcoef(s_pos, s_neg)[0, 1])

    plain = correlation("guided_backprop")
    gated = correlation("cam_gated")
    assert plain > 0.8 and gated < plain - 0.2, (plain, gated)


@pytest.mark.slow
def test_cam_priors_are_dense_and_need_no_guided_backprop(predictor, examples_dir):
    predictor.set_image(examples_dir / "cat.jpg")
    state = predictor._state
    state.cache.pop("guided_backprop", None)
    r = predictor.predict("cat", methods="cls_saliency[saliency=cam,grabcut=off]").results[0]
    assert "guided_backprop" not in state.cache and r.details["saliency"] == "cam"
    s_pos = r.priors[0].map
    assert s_pos.max() > 0.95 and (s_pos > 0.1).mean() > 0.1  # upsampled to the image: the peak may dip
    plain = predictor.predict("cat", methods="cls_saliency[saliency=guided_backprop,grabcut=off]").results[0]
    assert (s_pos > 0.1).mean() > 3 * (plain.priors[0].map > 0.1).mean()
    # the default is the CAM priors; the paper's ablation variants keep the guided backprop they were trained on
    default = predictor.predict("cat", methods="cls_saliency[grabcut=off]").results[0]
    assert default.details["saliency"] == "cam" and np.array_equal(default.priors[0].map, s_pos)
    assert ClsSaliency(predictor.models, variant="sem1c").saliency == "guided_backprop"
