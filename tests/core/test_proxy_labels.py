"""The language-semantics mapper of Golub et al.: WordNet and text proxy labels, pruning, negatives."""

import pytest
import torch

from ovseg.core.models.imagenet import imagenet_classes
from ovseg.core.methods.cls_saliency.proxy_labels import proxy_labels, text_related, wordnet_related

NAMES = [c.name for c in imagenet_classes()]


def _names(idx):
    return {NAMES[i] for i in idx}


@pytest.fixture(scope="module")
def models(predictor):
    return predictor.models


def test_wordnet_mapper_on_known_words(models):
    car, src = wordnet_related(models.lexicon, "car")
    assert src == "wordnet" and {"sports car", "racer", "cab", "convertible"} <= _names(car)
    dog, _ = wordnet_related(models.lexicon, "dog")
    assert len(dog) == 118 and {"Chihuahua", "golden retriever"} <= _names(dog)
    sofa, _ = wordnet_related(models.lexicon, "sofa")
    assert _names(sofa) == {"studio couch"}
    puppy, src = wordnet_related(models.lexicon, "puppy")
    assert src == "wordnet-hypernym" and set(puppy) == set(dog)


def test_a_word_without_imagenet_relative_falls_back_to_the_text_encoder(models):
    probs = torch.full((1000,), 1e-3)
    for word in ("tv", "zorblax"):
        p = proxy_labels(models, word, probs)
        assert p.source == "text" and "text encoder" in p.note and len(p.positive) == 5
    assert "television" in proxy_labels(models, "tv", probs).names()


def test_pruning_keeps_the_k_most_likely_related_classes_and_negatives_are_unrelated(models):
    dog, _ = wordnet_related(models.lexicon, "dog")
    probs = torch.full((1000,), 1e-4)
    probs[list(dog[:3])] = torch.tensor([0.2, 0.1, 0.05])
    probs[NAMES.index("tabby")] = 0.3
    probs[NAMES.index("studio couch")] = 0.25
    p = proxy_labels(models, "dog", probs, k=5)
    assert p.positive[:3] == tuple(dog[:3]) and len(p.positive) == 5 and set(p.positive) <= set(dog)
    assert p.negative[:2] == (NAMES.index("tabby"), NAMES.index("studio couch"))
    assert not set(p.negative) & set(dog)  # no dog breed is a distractor of "dog"
    rand = proxy_labels(models, "dog", probs, negatives="random", seed=3)
    assert len(rand.negative) == 5 and not set(rand.negative) & set(dog)
    assert rand.negative == proxy_labels(models, "dog", probs, negatives="random", seed=3).negative
    assert proxy_labels(models, "dog", probs, negatives="none").negative == ()


def test_text_mapper_finds_nearest_names_and_rejects_bad_options(models):
    assert "studio couch" in _names(text_related(models, "sofa"))
    with pytest.raises(ValueError, match="mapper"):
        proxy_labels(models, "dog", torch.ones(1000) / 1000, mapper="glove")
    with pytest.raises(ValueError, match="negatives"):
        proxy_labels(models, "dog", torch.ones(1000) / 1000, negatives="some")
