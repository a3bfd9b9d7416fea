"""The engine's shared models: the packaged ImageNet backbone (`backbone`), the text encoder (`text_encoder`),
WordNet (`lexicon`), the ImageNet class table (`imagenet`) and caption noun extraction (`caption_nouns`);
`Models` loads them lazily once on a device and every method shares them."""

from ovseg.core.models.shared import Models  # noqa: F401
