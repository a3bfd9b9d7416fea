"""The packaged Concept Mask model: files and configs, word vectors, attention blending, verification."""

import json

import numpy as np
import pytest
import torch

from ovseg.core.methods.concept_mask.attention import AttentionNet, ConceptAttentionModel
from ovseg.core.methods.concept_mask.embedding_net import normalise_maps
from ovseg.core.errors import OvsegError
from ovseg.core.checkpoints import packaged
from ovseg.core.methods.concept_mask.method import ConceptMask
from ovseg.train.coco import BASE_CLASSES, TARGET_CLASSES


@pytest.fixture(scope="module")
def model():
    return ConceptAttentionModel(packaged("concept_mask"))


def test_packaged_model_has_its_configs_and_was_trained_on_base_classes_only(model):
    folder = packaged("concept_mask")
    for name in ("tags.npz", "attention.pt", "attention_nosd.pt", "attention_original.pt", "config.json",
                 "training.json", "segmenter/weights.pt", "segmenter/config.json", "segmenter_single/weights.pt"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert set(config["refined_concepts"]) <= set(BASE_CLASSES) and len(config["refined_concepts"]) >= 40
    assert 0.0 <= config["theta"] <= 1.0
    summary = json.loads((folder / "training.json").read_text())
    assert summary["stage1_loss"]["last_epoch"] < summary["stage1_loss"]["first_epoch"]
    for losses in list(summary["stage2_loss"].values()) + list(summary["stage3_loss"].values()):
        assert losses["last_20"] < losses["first_20"]
    assert summary["seconds"]["total"] < 30 * 60
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 25_000_000, size


def test_attention_net_saves_in_half_precision_and_loads_back(tmp_path):
    torch.manual_seed(0)
    net = AttentionNet(torch.randn(7, 5), hidden=16, bottleneck=4, in_dim=12).eval()
    path = net.save(tmp_path / "a.pt")
    back = AttentionNet.load(path)
    head = torch.randn(1, 12, 3, 4)
    with torch.no_grad():
        a, b = net.coarse(net.dense(head)), back.coarse(back.dense(head))
    assert a.shape == (1, 7, 3, 4) and torch.allclose(a, b, rtol=2e-2, atol=2e-2)
    assert path.stat().st_size < 20_000


def test_words_get_tag_vectors_or_mapped_text_vectors_and_a_refined_neighbour(model, predictor):
    person = model.word("person")
    assert person.refined and person.source == "tags" and person.neighbour is None
    # a target class: a tag (from captions) or a mapped text vector, never box-supervised
    for word in TARGET_CLASSES:
        w = model.word(word, lambda x: predictor.models.embed_words([x])[0].numpy())
        assert not w.refined and w.neighbour in model.refined_names and w.vector.shape == person.vector.shape
    odd = model.word("zebra crossing", lambda x: predictor.models.embed_words([x])[0].numpy())
    assert odd.source == "text encoder" and odd.index is None
    with pytest.raises(KeyError, match="not in the tag vocabulary"):
        model.word("qwertyuiop")


def test_attention_of_an_unrefined_word_is_the_theta_blend_of_sec_4_4(model, predictor, examples_dir):
    predictor.set_image(examples_dir / "cat.jpg")
    head = predictor._state.features.head.float()
    maps = model.maps(head)
    w = model.word("cat", lambda x: predictor.models.embed_words([x])[0].numpy())
    att = model.attention(maps, w)
    p = model.refined_index[model.refined_names.index(w.neighbour)]
    coarse = normalise_maps(torch.einsum("dhw,d->hw", maps["dense"], w.vector))
    expected = normalise_maps(model.theta * coarse + (1 - model.theta) * normalise_maps(maps["refined"][p]))
    assert torch.allclose(att["attention"], expected) and torch.allclose(att["coarse"], coarse)
    assert float(att["attention"].min()) >= 0.0 and float(att["attention"].max()) == pytest.approx(1.0)
    person = model.attention(maps, model.word("person"))
    assert torch.allclose(person["attention"], normalise_maps(maps["refined"][model.tags.index["person"]]))


def test_options_are_checked(predictor):
    with pytest.raises(OvsegError, match="attention must be one of"):
        ConceptMask(predictor.models, attention="best")
    with pytest.raises(OvsegError, match="scales must be 1 or 2"):
        ConceptMask(predictor.models, scales=3)
    with pytest.raises(OvsegError, match="no trained Concept Mask"):
        ConceptMask(predictor.models, checkpoint="/nonexistent/folder")


@pytest.mark.slow
def test_the_gate_empties_only_confidently_absent_calibrated_words_and_keeps_every_map(predictor, examples_dir):
    predictor.set_image(examples_dir / "coffee.jpg")  # a cup of coffee on a saucer
    out = predictor.predict("cup, car, toilet, pizza, zebra, dog, cat", methods="concept_mask")
    by_word = {r.concept: r for r in out.results}
    h, w = predictor._state.size
    cup = by_word["cup"]  # a target class: no box or mask of it was seen in training
    assert cup.present and cup.mask.any() and cup.mask.shape == (h, w)
    assert [p.kind for p in cup.priors] == ["attention", "attention_refined", "probability"]
    assert cup.details["nearest_refined"] in BASE_CLASSES and cup.details["gate"] == "kept: verified present"
    # base classes: their own calibrated thresholds, or the shared one (zebra: too rare in the calibration set)
    for absent, source in (("car", "its own"), ("toilet", "its own"), ("pizza", "its own"), ("zebra", "shared")):
        r = by_word[absent]
        assert r.details["threshold_source"] == source, r.details
        assert not r.present and not r.mask.any() and r.details["gate"].startswith("emptied"), (absent, r.details)
        assert r.score < r.details["gate_level"] < cup.score
        assert [p.label for p in r.priors][:2] == ["attention (judged absent)", "attention refined (judged absent)"]
    for unseen in ("dog", "cat"):  # target classes, never calibrated: judged absent, not emptied, said so
        r = by_word[unseen]
        assert not r.present and r.mask.any(), (unseen, r.details)
        assert r.details["threshold_source"] == "shared" and "not calibrated" in r.details["gate"]
        assert r.score < cup.score
    # verify=off never empties: the same segmenter probability and a mask for the confidently absent word too
    unverified = predictor.predict("car", methods="concept_mask[verify=off]").results[0]
    assert unverified.details["verified_present"] is False and unverified.mask.any()
    assert np.array_equal(unverified.priors[2].map, by_word["car"].priors[2].map)
