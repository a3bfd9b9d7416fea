"""Cap2Seg's caption priors (seed 000, sec. 3.3): eq. 4 on hand-made masks, the losses against hand computations,
the exact-match baseline, and a tiny training run that must never decode a target-class mask."""

import json
import math

import numpy as np
import pytest
import torch

from helpers import COCO_DEV, ROOT
from ovseg.core.errors import OvsegError
from ovseg.core.methods.cap2seg.entailment import (class_variants, description, exact_match, joint_loss,
                                                   occurrence_loss, stripe_cosine, stripe_distribution, stripe_loss)

EXAMPLES = ROOT / "assets" / "examples"


# ------------------------------------------------------------------------------------------------ eq. 4
def test_stripe_distribution_counts_pixels_per_horizontal_stripe():
    mask = np.zeros((10, 4), dtype=bool)
    mask[0:2, :] = True  # stripe 1: 8 pixels
    mask[5, 0] = True  # stripe 3: 1 pixel
    mask[9, 1:4] = True  # stripe 5: 3 pixels
    np.testing.assert_allclose(stripe_distribution(mask), [8 / 12, 0, 1 / 12, 0, 3 / 12])
    # a uniform mask is uniform; the result always sums to 1
    np.testing.assert_allclose(stripe_distribution(np.ones((25, 3), bool)), [0.2] * 5)


def test_stripe_distribution_uneven_height_and_training_mask_values():
    # H = 7, K = 5: stripes hold rows [0], [1,2], [3,4]... edges floor(j*7/5) = 0,1,2,4,5,7
    mask = np.zeros((7, 1), dtype=np.uint8)
    mask[:, 0] = [1, 1, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(stripe_distribution(mask), np.array([1, 1, 2, 1, 2]) / 7)
    # a training_mask: 1 the class, 255 its crowd regions (not the class), 0 elsewhere
    tm = np.zeros((5, 2), dtype=np.uint8)
    tm[0] = 1
    tm[4] = 255
    np.testing.assert_allclose(stripe_distribution(tm), [1, 0, 0, 0, 0])
    np.testing.assert_allclose(stripe_distribution(np.eye(4, dtype=bool), k=2), [0.5, 0.5])


def test_stripe_distribution_rejects_bad_masks():
    with pytest.raises(OvsegError, match="no pixel"):
        stripe_distribution(np.zeros((10, 10), bool))
    with pytest.raises(OvsegError, match="HxW"):
        stripe_distribution(np.ones((10,), bool))
    with pytest.raises(OvsegError, match="rows"):
        stripe_distribution(np.ones((3, 4), bool))


def test_stripe_cosine():
    assert stripe_cosine([1, 0, 0, 0, 0], [1, 0, 0, 0, 0]) == pytest.approx(1.0)
    assert stripe_cosine([1, 0, 0, 0, 0], [0, 1, 0, 0, 0]) == pytest.approx(0.0)
    assert stripe_cosine([0.2] * 5, [1, 0, 0, 0, 0]) == pytest.approx(1 / math.sqrt(5))


# ---------------------------------------------------------------------------------------------- losses
def test_occurrence_loss_is_eq3_averaged():
    logits = torch.tensor([0.0, 2.0, -1.0])
    labels = torch.tensor([1.0, 0.0, 0.0])
    s = [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1))]
    hand = (-math.log(s[0]) - math.log(1 - s[1]) - math.log(1 - s[2])) / 3
    assert float(occurrence_loss(logits, labels)) == pytest.approx(hand, rel=1e-6)


def test_stripe_loss_is_cross_entropy_over_present_pairs():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, math.log(2.0)],  # softmax: 1/6 x4, 2/6
                           [5.0, 1.0, 0.0, 0.0, 0.0]])  # absent: must not count
    truth = torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.5], [1.0, 0, 0, 0, 0]])
    present = torch.tensor([True, False])
    hand = -(0.5 * math.log(1 / 6) + 0.5 * math.log(2 / 6))
    assert float(stripe_loss(logits, truth, present)) == pytest.approx(hand, rel=1e-6)
    zero = stripe_loss(logits, truth, torch.tensor([False, False]))
    assert float(zero) == 0.0
    # eq. 6: the sum of both
    occ = torch.tensor([0.0, 0.0])
    total, lo, ls = joint_loss(occ, logits, present.float(), truth)
    assert float(lo) == pytest.approx(math.log(2), rel=1e-6)
    assert float(total) == pytest.approx(math.log(2) + hand, rel=1e-6)


def test_losses_reject_mismatched_shapes():
    with pytest.raises(OvsegError):
        occurrence_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(OvsegError):
        stripe_loss(torch.zeros(2, 5), torch.zeros(2, 4), torch.ones(2, dtype=torch.bool))


# ------------------------------------------------------------------------------------------ exact match
@pytest.mark.parametrize("caption, name, hit", [
    ("Two dogs playing with a frisbee.", "dog", 1.0),  # plural
    ("A black cat sleeping on a sofa", "couch", 1.0),  # WordNet synonym
    ("Some sofas in a living room", "couch", 1.0),  # synonym, plural
    ("A man wearing a necktie and a suit", "tie", 1.0),
    ("A plane flying over the city", "airplane", 1.0),
    ("Three knives on a cutting board", "knife", 1.0),  # irregular plural
    ("A pair of scissors on a desk", "scissors", 1.0),
    ("A man riding a wave on a surfboard", "dog", 0.0),
    ("A kitten sleeping on a bed", "cat", 0.0),  # a hyponym is not the name: exact match misses it
    ("A catalog on the table", "cat", 0.0),  # a word containing the name is not the name
])
def test_exact_match(caption, name, hit):
    assert exact_match(caption, name) == hit


def test_class_variants_and_description():
    assert ("sofa",) in class_variants("couch") and ("couch",) in class_variants("couch")
    assert description("Couch") == "couch"
    assert description("couch", "gloss").startswith("couch: ") and "seat" in description("couch", "gloss")
    with pytest.raises(OvsegError):
        description("couch", "poem")


# ------------------------------------------------------------------------------------------ tiny training
def _coco():
    if not (COCO_DEV / "instances.json").is_file() or not (COCO_DEV / "captions.json").is_file():
        pytest.skip(f"coco_dev with captions is missing ({COCO_DEV})")
    return COCO_DEV


def test_tiny_training_loss_falls_and_reads_no_target_mask(tmp_path, decoded_categories):
    from ovseg.core.methods.cap2seg.entailment import ContextualEntailment
    from ovseg.core.models import Models
    from ovseg.train.coco import BASE_CLASSES, TARGET_CLASSES
    from ovseg.train.methods.cap2seg import TrainConfig, train

    cfg = TrainConfig(coco_dir=str(_coco()), out=str(tmp_path / "c2s"), epochs=1, batch_size=16, max_images=6,
                      ablation=False, evaluate=False, zsl_steps=20, seg_epochs=3)
    out = train(cfg, progress=False)
    assert decoded_categories, "training decoded no base mask at all"
    assert not set(decoded_categories) & set(TARGET_CLASSES), "training decoded a target-class mask"
    assert set(decoded_categories) <= set(BASE_CLASSES)

    summary = json.loads((out / "training.json").read_text())
    rec = summary["losses"][summary["checkpoint_row"]]
    assert rec["probe_after"]["loss"] < rec["probe_before"]["loss"]
    assert summary["evaluation"] is None
    config = json.loads((out / "config.json").read_text())
    assert config["row"] == "ce_multiscale_curriculum"
    assert (out / "entailment.pt").stat().st_size < 25e6

    # the checkpoint reloads into the same predictions (half-precision weights: close, not equal)
    enc = Models("cpu").text_encoder
    model = ContextualEntailment.load(out, enc)
    occ, stripes = model.predict(["A dog on a couch"] * 2, ["dog", "couch"])
    assert occ.shape == (2,) and stripes.shape == (2, 5)
    np.testing.assert_allclose(stripes.sum(1), 1.0, rtol=1e-5)
    # the shared encoder is untouched: still frozen
    assert not any(p.requires_grad for p in enc.model.parameters())

    # sec. 3.6: both segmentation networks, their loss falling, and the method running from the folder
    seg = summary["segmentation"]
    assert seg["seen_classes"][-1] == "background" and not set(seg["seen_classes"]) & set(TARGET_CLASSES)
    for name in ("segmentation.pt", "segmentation_lrs0.pt"):
        losses = seg["networks"][name]["losses"]["total"]
        assert (out / name).is_file() and losses["last_10pct"] < losses["first_10pct"], (name, losses)
    from ovseg.core.methods.base import ImageState
    from ovseg.core.methods.cap2seg.method import Cap2Seg
    from ovseg.core.image_io import load_image

    models = Models("cpu")
    state = ImageState.compute(models, load_image(EXAMPLES / "cat.jpg"), 448)
    method = Cap2Seg(models, checkpoint=out)
    plain = method.predict(state, "cat")
    assert plain.mask.shape == state.size and "no caption" in plain.details["note"]
    with_caption = method.predict(state, "cat", caption="A cat on a blanket.\nA tabby cat looking up.")
    kinds = [p.kind for p in with_caption.priors]
    assert with_caption.details["captions"] == 2 and kinds[:3] == ["caption", "caption", "probability"]
    # sec. 3.4-3.5: the local branch was trained with the entailment model and gives V* = (Y_hat + V_hat) / 2
    assert (out / "local.pt").is_file() and rec["local_branch"] and rec["consistency"]
    assert all("mean_local" in e and e["local_pairs"] > 0 for e in rec["epochs"])
    if "local" in kinds:  # the engine predicted some seen class to start from
        assert with_caption.details["local_sources"].startswith("the engine's own")
        fused = np.array(with_caption.details["fused_stripes"])
        np.testing.assert_allclose(fused.sum(), 1.0, atol=1e-3)
        assert not np.allclose(fused, with_caption.details["stripes"], atol=1e-4)
    assert np.array_equal(with_caption.mask, plain.mask)  # captions shape the priors, not the pixels' arg max
    # `prepare` reads every word's caption priors in one batch: the same as one word at a time
    captions = ["A cat on a blanket.", "A tabby cat looking up."]
    fresh = ImageState.compute(models, load_image(EXAMPLES / "cat.jpg"), 448)
    method.prepare(fresh, ["cat", "dog", "blanket"], "\n".join(captions))
    for word in ("cat", "dog", "blanket"):
        assert method._caption_key(captions, word) in fresh.cache
        batched = fresh.cache[method._caption_key(captions, word)]
        one = method.entailment.predict(captions, [word] * 2)
        assert batched[0] == pytest.approx(float(one[0].mean()), abs=1e-4)
        np.testing.assert_allclose(batched[1], one[1].mean(0), atol=1e-4)


@pytest.mark.slow
def test_tiny_training_with_table1(tmp_path):
    from ovseg.train.methods.cap2seg import ROWS, TrainConfig, train

    cfg = TrainConfig(coco_dir=str(_coco()), out=str(tmp_path / "c2s"), epochs=1, batch_size=32, max_images=4,
                      max_eval_images=10, zsl_steps=20)
    out = train(cfg, progress=False)
    ev = json.loads((out / "training.json").read_text())["evaluation"]
    assert set(ev["table1"]) == set(ROWS)
    assert sorted(sum(ev["split"].values(), [])) == sorted(ev["target_mention_rates"])
    assert [len(ev["split"][lv]) for lv in ("hard", "medium", "easy")] == [6, 5, 6]
    for row in ROWS:
        assert set(ev["table1"][row]) >= {"hard", "medium", "easy", "average", "all", "ap"}
    assert 0 <= ev["stripe_cosine"]["uniform"] <= 1
    # Table 3: global, local and fused stripe cosines with and without the consistency loss, and local AP
    assert set(ev["table3"]) == {"with_consistency", "without_consistency"}
    for run in ev["table3"].values():
        for key in ("global", "local", "fused"):
            assert run[key] is None or 0 <= run[key] <= 1


@pytest.mark.slow
def test_eval_scores_cap2seg_stripe_priors_against_eq4():
    """`ovseg eval` gives cap2seg each image's captions and scores its caption and fused stripes (coco_dev's
    first 26 held-out images have no caption: 29 hold 3 captioned ones)."""
    from ovseg.train.evaluate import evaluate

    metrics, _ = evaluate(_coco(), ["cap2seg"], limit=29, held_out_only=True, progress=False, reference=False)
    cos = metrics["methods"]["cap2seg"]["explanations"]["caption_stripe_cosine"]
    assert set(cos) <= {"stripes", "fused_stripes"} and "stripes" in cos
    for by_split in cos.values():
        for v in by_split.values():
            assert 0 <= v["mean"] <= 1 and v["pairs"] >= 1
    without, _ = evaluate(_coco(), ["cap2seg"], limit=29, held_out_only=True, progress=False, reference=False,
                          captions=False)
    assert "caption_stripe_cosine" not in without["methods"]["cap2seg"].get("explanations", {})
