"""OVSegmentor's text side (seed 004, sec. 3.1.2): the entity set, masked captions and entity prompts.

Entities are the object nouns of the project's caption noun extraction (`ovseg.core.models.caption_nouns`:
WordNet object senses, which leaves out abstract nouns such as "view" or "art"), kept when they are frequent
(named on at least `min_images` training images). A caption's entities are the entity-set nouns it names; its
masked form replaces each of them with the text encoder's [MASK] token (eq. 8's g(T)); its prompt names them
all in one sentence from a template (h(E): "a photo of a {e1} and {e2}.").
"""

from __future__ import annotations

import random
from collections import Counter

from ovseg.core.models.caption_nouns import object_nouns, tokenize

MASK = "[MASK]"
# CLIP's prompt templates ([41]) the paper samples from; the first is the inference prompt
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.",
             "a close-up photo of a {}.", "a good photo of a {}.", "a photo of a small {}.", "a photo of a large {}.")


def class_prompt(word: str) -> str:
    """The inference prompt of a class name (the paper: "A photo of {class}")."""
    return TEMPLATES[0].format(word.strip())


def caption_entities(caption: str, entity_set) -> list[str]:
    """The entity-set nouns a caption names (lemmas, caption order, each once)."""
    out = []
    for n in object_nouns(caption):
        if n.lemma in entity_set and n.lemma not in out:
            out.append(n.lemma)
    return out


def mask_entities(caption: str, entity_set) -> str:
    """g(T): the caption (tokenised, lower case) with every entity-set noun replaced by [MASK] (one [MASK] per
    noun, however many words it spans)."""
    tokens = tokenize(caption)
    spans = [(n.start, n.end) for n in object_nouns(caption) if n.lemma in entity_set]
    out, k = [], 0
    for start, end in sorted(spans):
        out += tokens[k:start] + [MASK]
        k = end
    return " ".join(out + tokens[k:])


def entity_prompt(entities, rng: random.Random | None = None) -> str:
    """h(E): one sentence naming every entity, from a template ("a photo of a dog and cat and frisbee.")."""
    if not entities:
        raise ValueError("entity_prompt needs at least one entity")
    template = (rng or random.Random(0)).choice(TEMPLATES)
    return template.format(" and ".join(entities))


def entity_set(captions_by_image: dict, min_images: int = 5) -> list[str]:
    """Ω: the object nouns named on at least `min_images` images (sorted)."""
    counts: Counter = Counter()
    for captions in captions_by_image.values():
        counts.update({n.lemma for c in captions for n in object_nouns(c)})
    return sorted(n for n, c in counts.items() if c >= min_images)


def label_caption(classes, rng: random.Random) -> tuple[str, str, list[str]]:
    """A caption made from an image's class labels, for images without one: ("a photo of a person and dog.",
    its masked form "a photo of a [MASK] and [MASK].", the classes in the order named)."""
    names = list(classes)
    rng.shuffle(names)
    template = rng.choice(TEMPLATES)
    return template.format(" and ".join(names)), template.format(" and ".join([MASK] * len(names))), names
