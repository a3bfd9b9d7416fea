"""Tests of the `cam` method and the Predictor on the bundled photographs (models load once per session).

assets/examples/cat.jpg (451x300): a cat's face fills the left ~85% of the frame (x < ~390); the strip
x >= 420 on the right is blurred background. The classifier's top classes on it are Egyptian cat (0.26),
tiger cat (0.13) and tabby (0.09).
"""

import numpy as np
import pytest
import torch

from ovseg.core.errors import ConceptError, ImageError, OvsegError
from ovseg.core.models.imagenet import imagenet_classes
from ovseg.core.models.lexicon import ImageNetMatch
from ovseg.core.methods.base import upsample_map
from ovseg.core.methods.cam.method import CAM, DEFAULT_THRESHOLD, PRESENCE_THRESHOLD
from ovseg.core.predictor import Predictor

EGYPTIAN_CAT = 285
TABBY = 281


@pytest.fixture()
def cat(predictor, examples_dir):
    """A Predictor on the shared models whose default method is cam, with cat.jpg set."""
    p = Predictor(models=predictor.models, methods=["cam"])
    p.set_image(examples_dir / "cat.jpg")
    return p


def _prior(result):
    prior = result.prior("attention")
    assert prior is not None
    return prior.map


def test_cat_outscores_other_words(cat):
    out = cat.predict("cat, dog, airplane, car, zorblax")
    assert [r.concept for r in out.results] == ["cat", "dog", "airplane", "car", "zorblax"]
    scores = {r.concept: r.score for r in out.results}
    # measured: cat 0.50, dog 0.037, car 0.0024, airplane 0.0013, zorblax 0.0007
    assert scores["cat"] > 0.3
    assert scores["cat"] > 5 * scores["dog"]
    assert scores["cat"] > 50 * scores["airplane"]
    assert scores["cat"] > 50 * scores["car"]
    assert scores["cat"] > 50 * scores["zorblax"]
    assert out.get("cat").present is True
    for word in ("dog", "airplane", "car", "zorblax"):
        assert out.get(word).present is False, word
    cat_result = out.get("cat")
    assert cat_result.present == (cat_result.score >= PRESENCE_THRESHOLD)
    details = cat_result.details
    assert details["wordnet_synset"] == "cat.n.01" and details["wordnet_via"] == "synset"
    assert details["known_to_wordnet"] is True and details["threshold"] == DEFAULT_THRESHOLD
    assert details["top_classes"][0][0] == "Egyptian cat"
    assert {name for name, _ in details["top_classes"][:3]} == {"Egyptian cat", "tiger cat", "tabby"}


def test_cat_attention_lies_on_the_cat(cat):
    r = cat.predict("cat").get("cat")
    a = _prior(r)
    h, w = a.shape
    assert (h, w) == (300, 451)
    y, x = np.unravel_index(int(a.argmax()), a.shape)
    # the peak (measured: the forehead, y=50, x=80) is on the cat, not in the background strip on the right
    assert x < 390, (y, x)
    ys, xs = np.mgrid[:h, :w]
    cy, cx = (a * ys).sum() / a.sum(), (a * xs).sum() / a.sum()
    # the map's centre of mass lies in the central region of the frame (measured: y=152, x=207)
    assert 0.3 * h < cy < 0.7 * h and 0.3 * w < cx < 0.6 * w, (cy, cx)
    centre = a[50:280, 100:350].mean()
    right = a[:, 420:].mean()
    assert centre > 3 * right, (centre, right)  # measured 0.48 vs 0.07
    assert 0.05 < r.mask.mean() < 0.95
    assert r.mask[:, 420:].mean() < 0.05  # the background strip stays out of the mask
    assert r.mask[50:280, 100:350].mean() > 0.5
    # the mask is the attention thresholded
    assert (r.mask == (a >= DEFAULT_THRESHOLD)).all()


def test_negative_word_only_removes_pixels(cat):
    plain = cat.predict("cat").get("cat")
    with_negative = cat.predict("cat, -dog")
    assert with_negative.negatives == ("dog",)
    assert [r.concept for r in with_negative.results] == ["cat"]
    neg = with_negative.get("cat")
    assert not (neg.mask & ~plain.mask).any(), "a negative word added pixels"
    assert neg.mask.sum() <= plain.mask.sum()
    # the score and the attention map do not depend on the negatives
    assert neg.score == pytest.approx(plain.score)
    np.testing.assert_array_equal(_prior(neg), _prior(plain))
    # the removed pixels are exactly those where the dog's map exceeds the cat's
    dog = _prior(cat.predict("dog").get("dog"))
    np.testing.assert_array_equal(neg.mask, plain.mask & (_prior(plain) >= dog))
    # negatives passed as a list do the same
    via_list = cat.predict("cat", negatives=["dog"])
    np.testing.assert_array_equal(via_list.get("cat").mask, neg.mask)


def test_negatives_given_as_a_string(cat):
    out = cat.predict("cat", negatives="dog, car")
    assert out.negatives == ("dog", "car")


def test_unknown_word_still_gets_a_map_from_the_text_encoder(cat):
    r = cat.predict("zorblax").get("zorblax")
    a = _prior(r)
    assert a.shape == (300, 451) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.max() > 0.5
    assert r.mask.shape == (300, 451) and r.mask.any()
    assert r.details["known_to_wordnet"] is False
    assert r.details["wordnet_classes"] == 0 and r.details["wordnet_synset"] is None
    assert "text encoder" in r.details["note"]
    assert len(r.details["top_classes"]) == 5  # the text encoder's TEXT_NEIGHBOURS nearest class names
    rel = cat.method("cam").related_classes("zorblax")
    assert len(rel["classes"]) == 5 and rel["wordnet"].classes == ()
    assert all(w >= 0 for w in rel["weights"].tolist())


def test_predict_before_set_image_raises(predictor):
    fresh = Predictor(models=predictor.models)
    with pytest.raises(OvsegError, match="call set_image"):
        fresh.predict("cat")
    with pytest.raises(OvsegError, match="call set_image"):
        fresh.image


def test_failed_set_image_forgets_the_previous_image(predictor, examples_dir, tmp_path):
    fresh = Predictor(models=predictor.models)
    fresh.set_image(examples_dir / "cat.jpg")
    with pytest.raises(ImageError):
        fresh.set_image(tmp_path / "missing.jpg")
    with pytest.raises(OvsegError, match="call set_image"):
        fresh.predict("cat")


def test_predict_bad_words_and_caption(cat):
    with pytest.raises(ConceptError, match="no word to look for"):
        cat.predict(" , -dog")
    with pytest.raises(OvsegError, match="caption must be a string"):
        cat.predict("cat", caption=42)
    assert cat.predict("cat", caption="  ").caption is None
    assert cat.predict("cat", caption=" a cat ").caption == "a cat"
    # several captions: a list, or one per line; blank ones dropped
    assert cat.predict("cat", caption=["a cat ", "", " a tabby"]).caption == "a cat\na tabby"
    assert cat.predict("cat", caption="a cat\n\n a tabby").caption == "a cat\na tabby"
    with pytest.raises(OvsegError, match="caption must be a string or a list"):
        cat.predict("cat", caption=["a cat", 3])
    with pytest.raises(KeyError, match="unknown method"):
        cat.predict("cat", methods="nope")


@pytest.mark.parametrize("threshold, low, high", [(0.0, 1.0, 1.0), (1.0, 0.0, 0.001)])
def test_threshold_extremes(predictor, examples_dir, threshold, low, high):
    p = Predictor(models=predictor.models, methods=["cam"], method_options={"cam": {"threshold": threshold}})
    p.set_image(examples_dir / "cat.jpg")
    r = p.predict("cat").get("cat")
    assert low <= r.mask.mean() <= high
    assert r.details["threshold"] == threshold


@pytest.mark.parametrize("threshold", [-0.1, 1.1])
def test_threshold_outside_unit_interval_is_refused(predictor, threshold):
    with pytest.raises((ValueError, OvsegError), match="threshold must lie in"):
        CAM(predictor.models, threshold=threshold)
    method = CAM(predictor.models)
    with pytest.raises((ValueError, OvsegError), match="threshold must lie in"):
        method.threshold = threshold
    assert method.threshold == DEFAULT_THRESHOLD


def _override(cam, classes, weights):
    """Make `cam` relate every word to the given classes with the given weights."""
    rel = {
        "classes": torch.tensor(classes, dtype=torch.long),
        "weights": torch.tensor(weights, dtype=torch.float32),
        "wordnet": ImageNetMatch("x", tuple(classes), None, "synset", ("x.n.01",)),
        "text": [],
    }
    cam.related_classes = lambda word: rel


def test_cam_of_one_class_is_the_classifier_row_applied_to_the_head_features(cat):
    state = cat._state
    head = state.features.head[0].float()  # (1280, h, w)
    fc = cat.models.backbone.classifier
    assert head.shape[0] == fc.weight.shape[1] == 1280
    # the CAM identity: the logit is the spatial mean of the class's unnormalised CAM plus the bias
    raw = torch.einsum("c,chw->hw", fc.weight[EGYPTIAN_CAT], head)
    assert float(raw.mean() + fc.bias[EGYPTIAN_CAT]) == pytest.approx(
        float(state.features.logits[0, EGYPTIAN_CAT]), rel=1e-4, abs=1e-4
    )
    by_hand = raw.clamp_min(0.0)
    by_hand = by_hand / by_hand.max()

    method = CAM(cat.models)
    _override(method, [EGYPTIAN_CAT], [1.0])
    low, presence, facts = method._map(state, "x")
    assert low.shape == head.shape[1:]
    torch.testing.assert_close(low, by_hand, rtol=1e-5, atol=1e-6)
    assert float(low.max()) == pytest.approx(1.0)
    prob = float(torch.softmax(state.features.logits[0], 0)[EGYPTIAN_CAT])
    assert presence == pytest.approx(prob, rel=1e-5)
    assert facts["top_classes"][0][0] == "Egyptian cat"

    # predict upsamples the same low-resolution map to image size, peak rescaled to 1
    r = method.predict(state, "x")
    up = upsample_map(low, state.size)
    np.testing.assert_allclose(_prior(r), up / up.max(), atol=1e-6)
    assert _prior(r).max() == pytest.approx(1.0)


def test_cam_of_two_classes_is_the_weighted_classifier_rows(cat):
    state = cat._state
    head = state.features.head[0].float()
    w = cat.models.backbone.classifier.weight
    probs = torch.softmax(state.features.logits[0].float(), 0)
    a = torch.tensor([1.0, 0.5]) * probs[[EGYPTIAN_CAT, TABBY]]
    # linearity: the map of the weighted classes is the weighted sum of the per-class maps
    per_class = torch.einsum("kc,chw->khw", w[[EGYPTIAN_CAT, TABBY]], head)
    by_hand = ((a[:, None, None] * per_class).sum(0) / a.sum()).clamp_min(0.0)
    by_hand = by_hand / by_hand.max()

    method = CAM(cat.models)
    _override(method, [EGYPTIAN_CAT, TABBY], [1.0, 0.5])
    low, presence, _ = method._map(state, "x")
    torch.testing.assert_close(low, by_hand, rtol=1e-4, atol=1e-5)
    assert presence == pytest.approx(float(a.sum()), rel=1e-5)


def test_related_classes_of_cat(cat):
    rel = cat.method("cam").related_classes("cat")
    classes = rel["classes"].tolist()
    names = {imagenet_classes()[i].name for i in classes}
    assert {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"} <= names
    assert len(classes) == len(set(classes)) == len(rel["weights"])
    assert len(rel["text"]) == 5
    wordnet = set(rel["wordnet"].classes)
    for c, weight in zip(classes, rel["weights"].tolist()):
        if c in wordnet:
            assert weight == 1.0
        else:
            assert 0.0 <= weight <= 1.0


def test_prediction_get(cat):
    out = cat.predict("Cat, tabby", methods="cam")
    assert out.image_size == (300, 451)
    assert out.get("cat").concept == "cat"
    assert out.get("cat", "cam") is out.get("cat")
    assert out.get("tabby").method == "cam"
    assert out.by_method("cam") == out.results
    with pytest.raises(KeyError):
        out.get("dog")
    with pytest.raises(KeyError):
        out.get("cat", "other")


def test_coffee_cup(predictor, examples_dir):
    predictor.set_image(examples_dir / "coffee.jpg")
    out = predictor.predict("cup, spoon, zorblax", methods=["cam"])
    scores = {r.concept: r.score for r in out.results}
    # measured: cup 0.030, spoon 0.0099, zorblax 0.0013
    assert scores["cup"] > 10 * scores["zorblax"]
    for r in out.results:
        assert r.mask.shape == (400, 600)
    # where things are, drawn by hand on the photo: the cup (with its handle) and the spoon's bowl
    cup_box = np.zeros((400, 600), bool)
    cup_box[15:305, 165:415] = True
    spoon_bowl = np.zeros((400, 600), bool)
    spoon_bowl[245:325, 325:405] = True
    cup, spoon = out.get("cup"), out.get("spoon")
    # measured: 77% of the cup's mask lies on the cup, which it covers for 66%, at 26% of the image; a mask of
    # the whole image (or any flat map) puts 30% there, a mask elsewhere less
    assert (cup.mask & cup_box).sum() / cup.mask.sum() > 0.65
    assert (cup.mask & cup_box).sum() / cup_box.sum() > 0.5 and 0.1 < cup.mask.mean() < 0.45
    peak = np.unravel_index(np.argmax(cup.prior("attention").map), (400, 600))
    assert cup_box[peak]  # the cup's map peaks on the cup
    # the spoon's mask (measured: 54% of the image) holds the spoon's bowl, which the cup's mask leaves out
    assert (spoon.mask & spoon_bowl).sum() / spoon_bowl.sum() > 0.8
    assert (cup.mask & spoon_bowl).sum() / spoon_bowl.sum() < 0.2


def test_presence_alone_equals_the_predicted_score(cat):
    words = ["cat", "dog", "zorblax", "teddy bear"]
    scores = cat.presence(words, "cam")
    assert list(scores) == words
    for w in words:
        assert scores[w] == pytest.approx(cat.predict(w).get(w).score, abs=1e-7)
