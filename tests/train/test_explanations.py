"""Issue 17's measures on a small real sample (coco_dev's first held-out images, never trained on), each
against the baseline that carries no information: XPM's reliability against shuffled reliabilities and its
noise maps against a constant map (and the paper's g_Noise, which is flat here); Concept Mask's calibrated
verification against a constant presence probability and its gate against verify=off; cls_saliency's S- against
S- = S+."""

import numpy as np
import pytest

from helpers import COCO_DEV

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not COCO_DEV.is_dir(), reason=f"shared data not found at {COCO_DEV}")]

IMAGES = 14  # the first held-out images in id order (about 20 s per method family on 2 CPU threads)


@pytest.fixture(scope="module")
def sample(predictor):
    """For each method spec, the evaluation accumulator (ovseg.train.evaluate._Scores) over the sample's
    present (image, class) pairs, plus every pair's presence scores."""
    from ovseg.core.predictor import Predictor
    from ovseg.train.coco import SCORED_CLASSES, CocoConceptDataset, held_out_image_ids
    from ovseg.train.evaluate import _instance_masks, _Scores

    specs = ["xpm", "xpm[reliability=g_noise]", "concept_mask", "concept_mask[verify=off]", "cls_saliency"]
    p = Predictor(models=predictor.models, methods=specs)
    dataset = CocoConceptDataset(COCO_DEV)
    held = sorted(held_out_image_ids(dataset.image_ids))[:IMAGES]
    acc = {m: _Scores() for m in specs}
    rng = np.random.default_rng(0)
    for image_id in held:
        targets = dataset.concept_targets(image_id)
        p.set_image(dataset.load_rgb(image_id))
        present = [c for c in SCORED_CLASSES if c in targets.gt]
        for m in specs:
            acc[m].add_presence(p.presence(list(SCORED_CLASSES), m), targets, True)
            for r in p.predict(present, methods=[m]).results if present else []:
                acc[m].add_mask(r.concept, r.mask, targets, True)
                if r.pseudo_labels:
                    acc[m].add_pseudo_labels(r.concept, r.pseudo_labels, _instance_masks(dataset, image_id, r.concept),
                                             targets, rng)
                if "saliency_correlation" in r.details:
                    acc[m].correlations["all"].append(r.details["saliency_correlation"])
    return acc


def test_xpm_reliability_ranks_pseudo_masks_better_than_shuffled(sample):
    from ovseg.core.ops.metrics import spearman

    s = sample["xpm"]
    rel = np.array([p["reliability"] for p in s.pseudo])
    iou = np.array([p["iou"] for p in s.pseudo])
    assert len(rel) >= 40, len(rel)
    observed = spearman(rel, iou)
    rng = np.random.default_rng(0)
    shuffled = [spearman(rng.permutation(rel), iou) for _ in range(200)]
    assert observed >= 0.3 and observed > np.quantile(shuffled, 0.99), (observed, np.quantile(shuffled, 0.99))
    ex = s.explanations()["pseudo_label_reliability"]
    assert ex["mean_iou_most_reliable_25pct"] > ex["mean_iou_all"] > ex["mean_iou_least_reliable_25pct"]


def test_xpm_noise_maps_point_at_wrong_pixels_and_the_flat_ones_do_not(sample):
    from ovseg.core.ops.metrics import auroc

    agreement = sample["xpm"].explanations()["noise_map_pixels"]
    assert agreement["constant_map_fraction"] == 0.0
    # clearly above a constant map's 0.5. Measured with the networks shipped in stop 27: 0.610 on this sample,
    # 0.663 on all 93 held-out images (`ovseg eval --held-out-only`; 0.671 with the networks before).
    assert agreement["auroc_wrong"] >= 0.58, agreement
    # a constant map: AUROC one half whatever the pixels; the paper's g_Noise sits at its floor here
    wrong = np.concatenate(sample["xpm"].noise_wrong)
    assert auroc(np.zeros(len(wrong)), wrong) == 0.5
    g_noise = sample["xpm[reliability=g_noise]"].explanations()["noise_map_pixels"]
    assert agreement["auroc_wrong"] > g_noise["auroc_wrong"] + 0.1, (agreement, g_noise)


def test_concept_mask_verification_is_calibrated_and_its_gate_never_costs_a_target_mask(sample):
    from ovseg.train.coco import BASE_CLASSES, TARGET_CLASSES

    gated, off = sample["concept_mask"], sample["concept_mask[verify=off]"]
    for c in TARGET_CLASSES:  # target words have no calibration of their own: the gate never empties them
        assert gated.iou.get(c, []) == off.iou.get(c, []), c
    # on base classes the gate empties a present class's mask only rarely (it asks 99% confidence; on all 93
    # held-out images 16 of 217 present pairs, here 3 of 23)
    pairs = [(g, o) for c in BASE_CLASSES for g, o in zip(gated.iou.get(c, []), off.iou.get(c, []))]
    emptied = sum(g == 0.0 and o > 0.0 for g, o in pairs)
    assert len(pairs) >= 20 and emptied <= 0.2 * len(pairs), (emptied, len(pairs))
    assert all(g == o for g, o in pairs if not (g == 0.0 and o > 0.0))  # otherwise the masks are the same
    # P(present) on base classes: a lower Brier score than the best constant (the base rate)
    probs = np.concatenate([gated.scores[c] for c in BASE_CLASSES])
    labels = np.concatenate([gated.labels[c] for c in BASE_CLASSES]).astype(float)
    assert np.mean((probs - labels) ** 2) < np.mean((labels.mean() - labels) ** 2)


def test_cls_saliency_default_priors_differ_where_s_minus_equal_to_s_plus_would_not(sample):
    from ovseg.core.methods.cls_saliency.method import prior_correlation

    import torch

    correlations = sample["cls_saliency"].correlations["all"]
    assert len(correlations) >= 20
    assert np.median(correlations) <= 0.7, np.median(correlations)
    s = torch.rand(32, 32)
    assert prior_correlation(s, s) == pytest.approx(1.0)  # the baseline: S- = S+ says nothing
