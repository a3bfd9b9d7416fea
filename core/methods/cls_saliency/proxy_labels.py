"""Language-semantics mapper of Golub et al. (seed 002, sec. 3.1 and 4.1): a target word -> positive proxy
labels (ImageNet classes related to it, pruned to K by the classifier's likelihood on the image) and negative
proxy labels (the K classes the classifier ranks highest that are not related: likely distractors).

Two mappers, as in the paper's Table 2:
- "wordnet": the paper's rule (synonyms of the word, hypernyms of the word and its synonyms, the classifier
  labels that share a word with them) made exact with the classes' synsets: a class is related when its
  synset is a sense of the word (a synset holds the synonyms), a hyponym of one ("car" -> "sports car";
  "dog" -> the breeds), or a hypernym of one within HYPERNYM_DEPTH levels that is itself a class (the generic
  label the word specialises). Where this finds none: the hyponyms of the first sense's direct hypernym
  ("puppy" -> the dog breeds); where that finds none too, the text mapper, and the result says so.
- "text": the Word2Vec-style alternative with the packaged text encoder: the K class names nearest to the
  word by cosine similarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ovseg.core.models.imagenet import imagenet_classes
from ovseg.core.models.lexicon import Lexicon
from ovseg.core.models import Models

K = 5  # the paper's maximum number of proxy labels (sec. 4.1)
HYPERNYM_DEPTH = 2
MAPPERS = ("wordnet", "text")


@dataclass(frozen=True)
class ProxyLabels:
    """positive / negative: ImageNet class indices (at most K each, most likely first). related: every class
    the mapper linked to the word before pruning. source: "wordnet", "wordnet-hypernym" or "text"."""

    word: str
    positive: tuple[int, ...]
    negative: tuple[int, ...]
    related: tuple[int, ...]
    source: str
    note: str = ""

    def names(self, which: str = "positive") -> list[str]:
        classes = imagenet_classes()
        return [classes[i].name for i in getattr(self, which)]


def wordnet_related(lexicon: Lexicon, word: str) -> tuple[tuple[int, ...], str]:
    """(related class indices in ImageNet order, source) by the exact WordNet rule; empty if none."""
    senses = lexicon.noun_synsets(word)
    if not senses:
        return (), "wordnet"
    related: set[int] = set()
    for sense in senses:
        related.update(lexicon.imagenet_descendants(sense))
        frontier = [sense]
        for _ in range(HYPERNYM_DEPTH):
            frontier = [h for f in frontier for h in f.hypernyms() + f.instance_hypernyms()]
            related.update(c for c in map(lexicon.imagenet_class_of, frontier) if c is not None)
    if related:
        return tuple(sorted(related)), "wordnet"
    match = lexicon.imagenet_match(word)  # the direct-hypernym fallback
    if match.via == "hypernym":
        return match.classes, "wordnet-hypernym"
    return (), "wordnet"


def text_related(models: Models, word: str, k: int = K) -> tuple[int, ...]:
    """The k ImageNet classes whose names are nearest to the word in the text encoder's space."""
    return tuple(torch.topk(models.class_similarity(word), k).indices.tolist())


def proxy_labels(
    models: Models,
    word: str,
    probs: torch.Tensor,
    mapper: str = "wordnet",
    k: int = K,
    negatives: str = "classifier",
    seed: int = 0,
) -> ProxyLabels:
    """Positive and negative proxy labels of `word` for an image whose class probabilities are `probs`.

    Args:
        probs: (1000,) softmax of the classifier on the image.
        mapper: "wordnet" (the paper's choice) or "text".
        negatives: "classifier" (the paper's: the top-k classes not related to the word), "random" (k random
            unrelated classes, seeded: the paper's RAND ablation) or "none".
    """
    if mapper not in MAPPERS:
        raise ValueError(f"mapper must be one of {MAPPERS}, got {mapper!r}")
    note = ""
    if mapper == "wordnet":
        related, source = wordnet_related(models.lexicon, word)
        if not related:
            related, source = text_related(models, word, k), "text"
            note = f"WordNet relates no ImageNet class to {word!r}: the text encoder's nearest class names are used"
    else:
        related, source = text_related(models, word, k), "text"
    idx = torch.tensor(related, dtype=torch.long, device=probs.device)
    order = torch.argsort(probs[idx], descending=True)[:k]  # prune by the classifier's likelihood
    positive = tuple(int(idx[i]) for i in order)
    unrelated = torch.ones_like(probs, dtype=torch.bool)
    unrelated[idx] = False
    if negatives == "classifier":
        candidates = torch.nonzero(unrelated).flatten()
        top = torch.argsort(probs[candidates], descending=True)[:k]
        negative = tuple(int(candidates[i]) for i in top)
    elif negatives == "random":
        g = torch.Generator().manual_seed(seed)
        candidates = torch.nonzero(unrelated).flatten().cpu()
        negative = tuple(int(candidates[i]) for i in torch.randperm(len(candidates), generator=g)[:k])
    elif negatives == "none":
        negative = ()
    else:
        raise ValueError(f"negatives must be 'classifier', 'random' or 'none', got {negatives!r}")
    return ProxyLabels(word, positive, negative, tuple(related), source, note)
