"""`fused`, the default method: its combiner's parts on hand-made data, cross-fitting by image, and the masks a
new user sees first on the bundled photographs."""

import json

import numpy as np
import pytest
import torch

from ovseg.core.image_io import pixel_key as image_key
from ovseg.core.methods.fused.combiner import Combiner, CrossFitted, Logistic, pixel_features, relative_mask, save
from ovseg.core.predictor import DEFAULT_METHODS, Predictor


def _cover(mask: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> float:
    return float(mask[y0:y1, x0:x1].mean())


# ---------------------------------------------------------------------------------------------- combiner

def test_logistic_fit_recovers_the_informative_feature():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4000, 2, generator=g)
    y = (x[:, 0] + 0.05 * torch.randn(4000, generator=g) > 0.5).float()  # only feature 0 matters
    m = Logistic.fit(("a", "b"), x, y, l2=1e-4)
    assert m.weights[0] > 5 * abs(m.weights[1])
    p = m(torch.tensor([[0.9, 0.5], [0.1, 0.5]]))
    assert p[0] > 0.9 and p[1] < 0.1
    again = Logistic.from_dict(json.loads(json.dumps(m.to_dict())))
    assert torch.allclose(again(x[:10]), m(x[:10]))


def test_pixel_features_products_and_relative_maps():
    maps = {"cam": torch.tensor([[0.2, 0.4]]), "objectness": torch.tensor([[1.0, 0.5]])}
    f = pixel_features(maps, ("cam", "rel:cam", "cam*objectness", "rel:cam*objectness"))
    assert torch.allclose(f, torch.tensor([[0.2, 0.5, 0.2, 0.5], [0.4, 1.0, 0.2, 0.5]]))


def test_relative_mask_is_relative_to_the_peak():
    p = torch.tensor([[0.1, 0.2, 0.4]])
    assert relative_mask(p, 0.5).tolist() == [[False, True, True]]
    assert relative_mask(p * 0.1, 0.5).tolist() == [[False, True, True]]  # scale does not matter


def _combiner(bias: float) -> Combiner:
    one = Logistic(("cam",), np.array([1.0]), bias, np.zeros(1), np.ones(1))
    pres = Logistic(("cam_mass",), np.array([1.0]), bias, np.zeros(1), np.ones(1))
    return Combiner({"any_word": one, "known_word": one}, {"any_word": pres, "known_word": pres},
                    {"any_word": 0.5, "known_word": 0.5}, {"any_word": 0.2, "known_word": 0.4})


def test_cross_fitting_uses_the_fold_that_did_not_see_the_image(tmp_path):
    a, b, other = (np.full((4, 4, 3), v, np.uint8) for v in (1, 2, 3))
    save(tmp_path, _combiner(0.0), [([image_key(a)], _combiner(-1.0)), ([image_key(b)], _combiner(1.0))],
         ["person"], {})
    cf = CrossFitted(tmp_path)
    assert cf.for_image(image_key(a))[0].pixel["any_word"].bias == -1.0
    assert cf.for_image(image_key(b))[0].pixel["any_word"].bias == 1.0
    model, which = cf.for_image(image_key(other))
    assert model.pixel["any_word"].bias == 0.0 and which == "all"


def test_experts_are_mixed_by_familiarity():
    c = _combiner(0.0)
    c.pixel["known_word"] = Logistic(("cam",), np.array([0.0]), 10.0, np.zeros(1), np.ones(1))  # always ~1
    maps = {"cam": torch.zeros(2, 2)}
    p_unknown, _, _ = c.pixel_probability(maps, known=0.0)
    p_known, _, _ = c.pixel_probability(maps, known=1.0)
    assert torch.allclose(p_unknown, torch.full((2, 2), 0.5))
    assert bool((p_known > 0.99).all())
    assert c.presence_threshold(0.0) == 0.2 and c.presence_threshold(1.0) == 0.4
    assert c.presence_threshold(0.5) == pytest.approx(0.3)


def _caption_combiner() -> Combiner:
    """A combiner whose caption experts read only the caption's occurrence (presence) and the stripe prior
    (pixels), and whose caption-free experts read only the CAM."""
    c = _combiner(0.0)
    occ = Logistic(("caption_logit",), np.array([1.0]), 0.0, np.zeros(1), np.ones(1))
    stripes = Logistic(("caption_stripes",), np.array([8.0]), -4.0, np.zeros(1), np.ones(1))
    for k in ("any_word", "known_word"):
        c.presence[k + "+caption"], c.present_at[k + "+caption"] = occ, 0.5
        c.pixel[k + "+caption"], c.thresholds[k + "+caption"] = stripes, 0.6
    return c


def test_caption_experts_decide_only_with_caption_evidence():
    c = _caption_combiner()
    plain = {"cam": torch.tensor([[1.0], [0.0]])}
    captioned = {**plain, "caption_stripes": torch.tensor([[0.0], [1.0]])}
    assert c.reads_captions
    assert c.experts(True) == ("known_word+caption", "any_word+caption")
    assert c.experts(False, "pixel") == ("known_word", "any_word")
    p_plain, t_plain, _ = c.pixel_probability(plain, known=0.0)
    p_cap, t_cap, _ = c.pixel_probability(captioned, known=0.0)
    assert p_plain[0, 0] > p_plain[1, 0] and t_plain == 0.5  # the CAM decides
    assert p_cap[1, 0] > 0.95 > 0.05 > p_cap[0, 0] and t_cap == 0.6  # the stripe prior decides
    # presence: the caption's occurrence (as a logit) moves it; without it the CAM mass does
    said, denied = ({"cam_mass": 0.0, "caption_occurrence": v} for v in (0.95, 0.05))
    assert c.presence_probability(said, 0.0)[0] == pytest.approx(0.95, abs=1e-3)
    assert c.presence_probability(denied, 0.0)[0] == pytest.approx(0.05, abs=1e-3)
    assert c.presence_probability({"cam_mass": 0.0}, 0.0)[0] == pytest.approx(0.5)
    assert c.presence_threshold(0.0, captioned=True) == 0.5 and c.presence_threshold(0.0) == 0.2


def test_a_combiner_without_caption_experts_ignores_captions():
    c = _combiner(0.0)
    assert not c.reads_captions and c.experts(True) == ("known_word", "any_word")
    scores = {"cam_mass": 1.0, "caption_occurrence": 0.01}
    assert c.presence_probability(scores, 0.0)[0] == c.presence_probability({"cam_mass": 1.0}, 0.0)[0]
    # pixel caption experts are optional (`--caption-pixels`): presence ones alone do not need them
    c = _caption_combiner()
    for k in ("any_word", "known_word"):
        del c.pixel[k + "+caption"]
    maps = {"cam": torch.tensor([[1.0], [0.0]]), "caption_stripes": torch.tensor([[0.0], [1.0]])}
    assert c.reads_captions and c.experts(True, "pixel") == ("known_word", "any_word")
    assert c.pixel_probability(maps, 0.0)[0][0, 0] > 0.5


# ------------------------------------------------------------------------------------- the bundled photos

@pytest.fixture(scope="module")
def fused(predictor):
    return Predictor(models=predictor.models)


def test_fused_is_the_default(fused):
    assert DEFAULT_METHODS == ("fused",) and fused.methods == ["fused"]


def test_person_on_the_portrait_is_present_and_covers_face_and_jacket_not_the_flag(fused, examples_dir):
    fused.set_image(examples_dir / "grace_hopper.jpg")
    r = fused.predict("person").get("person")
    assert r.method == "fused" and r.present, r.details
    assert _cover(r.mask, 210, 190, 330, 310) > 0.6  # her face
    assert _cover(r.mask, 330, 470, 450, 580) > 0.5  # the jacket, right of the medals' ribbon
    assert _cover(r.mask, 0, 0, 100, 250) < 0.15  # the flag's stars
    assert r.details["decided_by"] and r.details["experts"].startswith("known word x 1.00")
    kinds = {p.label for p in r.priors}
    assert {"evidence: CAM", "evidence: CAM on object proposals", "fused probability, relative to its peak"} <= kinds


def test_cat_covers_the_cat(fused, examples_dir):
    fused.set_image(examples_dir / "cat.jpg")
    r = fused.predict("cat").get("cat")
    assert r.present, r.details
    assert _cover(r.mask, 60, 60, 340, 270) > 0.6
    assert _cover(r.mask, 425, 0, 451, 300) < 0.3  # the blurred strip on the right
    assert r.details["experts"].startswith("known word x 0.00")  # cat is a target class: CAM-driven


def test_cup_covers_the_cup_not_the_table(fused, examples_dir):
    fused.set_image(examples_dir / "coffee.jpg")
    out = fused.predict("cup, zorblax")
    cup = out.get("cup")
    assert cup.present
    assert _cover(cup.mask, 210, 60, 370, 200) > 0.6
    assert _cover(cup.mask, 480, 0, 600, 90) < 0.1 and _cover(cup.mask, 0, 300, 60, 400) < 0.1
    nonsense = out.get("zorblax")
    assert nonsense.score < cup.score and not nonsense.present
    for pl in cup.pseudo_labels:  # one instance per connected part, each inside the mask
        assert not (pl.mask & ~cup.mask).any()


def test_a_caption_moves_presence_and_captions_off_ignores_it(fused, examples_dir):
    """On the cat photo, a caption that names a cat raises the cat's presence and keeps the dog absent; the result
    shows the caption prior and which experts decided; `fused[captions=off]` gives the caption-free answer."""
    fused.set_image(examples_dir / "cat.jpg")
    caption = "a cat lying on a bed\na close up of a tabby cat looking at the camera"
    plain = fused.predict("cat, dog")
    said = fused.predict("cat, dog", caption=caption)
    off = fused.predict("cat, dog", caption=caption, methods="fused[captions=off]")
    cat, dog = said.get("cat"), said.get("dog")
    assert cat.present and not dog.present
    assert cat.score > max(plain.get("cat").score, 0.95) and dog.score < 0.3
    # the entailment model alone half-believes the dog (a near word); that no caption names it holds it down
    assert cat.details["caption_occurrence"] > 0.9 and dog.details["caption_occurrence"] > 0.3
    named = fused.predict("dog", caption="a dog and a cat lying on a bed").get("dog")
    assert named.score > dog.score + 0.2
    assert cat.details["captions"] == 2 and len(cat.details["fused_stripes"]) == 5
    assert "evidence: caption stripes V* (Cap2Seg)" in {p.label for p in cat.priors}
    assert set(cat.details["presence_experts"]) == {"known_word+caption", "any_word+caption"}
    for word in ("cat", "dog"):
        assert off.get(word).score == pytest.approx(plain.get(word).score)
        assert "caption_occurrence" not in off.get(word).details
        np.testing.assert_array_equal(off.get(word).mask, plain.get(word).mask)
    # the caption is read once per word in one pass (prepare), and presence agrees with predict
    assert fused.presence("cat, dog", caption=caption) == pytest.approx({"cat": cat.score, "dog": dog.score})
