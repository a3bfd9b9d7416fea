"""Tests of ovseg.core.models.lexicon (WordNet from the bundled data) and ovseg.core.models.imagenet."""

import multiprocessing as mp
import os
import time

import pytest

from ovseg.core.models.imagenet import imagenet_classes
from ovseg.core.models.lexicon import (_COMPLETE_MARKER, _WORDNET_FILES, MAX_FALLBACK_CLASSES, Lexicon,
                                       ensure_wordnet_data, normalise_word)


@pytest.fixture(scope="module")
def lexicon():
    return Lexicon()


def _names(indices):
    classes = imagenet_classes()
    return {classes[i].name for i in indices}


def test_imagenet_classes_table():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert [c.index for c in classes] == list(range(1000))
    assert classes[285].name == "Egyptian cat"
    assert classes[281].wnid == "n02123045" and classes[281].offset == 2123045  # tabby
    assert all(c.names and c.wnid.startswith("n") and len(c.wnid) == 9 for c in classes)
    assert len({c.wnid for c in classes}) == 1000


def test_normalise_word():
    assert normalise_word("  Teddy \t Bears ") == "teddy bears"
    with pytest.raises(ValueError, match="empty word"):
        normalise_word("   ")
    with pytest.raises(TypeError, match="got int"):
        normalise_word(3)


def test_dog_reaches_exactly_the_118_dog_classes(lexicon):
    m = lexicon.imagenet_match("dog")
    assert m.synset == "dog.n.01" and m.via == "synset" and m.known
    assert len(m.classes) == 118
    # the ImageNet dog breeds are indices 151 (Chihuahua) .. 268 (Mexican hairless)
    assert m.classes == tuple(range(151, 269))
    names = _names(m.classes)
    assert {"Chihuahua", "golden retriever", "German shepherd", "pug", "Siberian husky"} <= names
    assert "Egyptian cat" not in names and "timber wolf" not in names
    # every one of them descends from dog.n.01 in WordNet, and no other class does
    wn = lexicon.wn
    dog = wn.synset("dog.n.01")
    for i, cls in enumerate(imagenet_classes()):
        syn = wn.synset_from_pos_and_offset("n", cls.offset)
        under_dog = syn == dog or dog in syn.closure(lambda s: s.hypernyms())
        assert under_dog == (i in m.classes), cls.name


def test_puppy_reaches_the_dogs_through_its_hypernym(lexicon):
    m = lexicon.imagenet_match("puppy")
    assert m.via == "hypernym"
    assert m.synset == "dog.n.01"
    assert m.classes == lexicon.imagenet_match("dog").classes
    assert len(m.classes) <= MAX_FALLBACK_CLASSES


def test_plurals_and_phrases_are_reduced(lexicon):
    assert lexicon.lemma("dogs") == "dog"
    assert lexicon.lemma("Teddy Bears") == "teddy bear"
    assert lexicon.lemma("teddy bears") == "teddy bear"
    assert lexicon.lemma("zorblax") == "zorblax"
    assert lexicon.imagenet_match("dogs").classes == lexicon.imagenet_match("dog").classes
    teddy = lexicon.imagenet_match("teddy bears")
    assert _names(teddy.classes) == {"teddy"}
    assert teddy.word == "teddy bears"


def test_sofa_reaches_studio_couch(lexicon):
    m = lexicon.imagenet_match("sofa")
    assert m.synset == "sofa.n.01"
    assert "studio couch" in _names(m.classes)
    assert lexicon.synonyms("sofa")[:2] == ["sofa", "couch"]


def test_car_includes_sports_car(lexicon):
    m = lexicon.imagenet_match("car")
    assert m.synset == "car.n.01"
    names = _names(m.classes)
    assert {"sports car", "cab", "convertible", "jeep", "limousine", "minivan"} <= names
    assert "airliner" not in names and "mountain bike" not in names


def test_unknown_word_gives_an_empty_match(lexicon):
    m = lexicon.imagenet_match("zorblax")
    assert m.classes == () and m.synset is None and m.via is None
    assert m.known is False
    assert lexicon.synonyms("zorblax") == []
    # a known word with no ImageNet relative is known but still empty
    h = lexicon.imagenet_match("happiness")
    assert h.known is True and h.classes == ()


def test_is_object(lexicon):
    assert lexicon.is_object("dog") is True
    assert lexicon.is_object("frisbee") is True
    assert lexicon.is_object("happiness") is False
    assert lexicon.is_object("zorblax") is False


def _wordnet_files_ok(root):
    final = root / "corpora" / "wordnet"
    assert (final / _COMPLETE_MARKER).is_file()
    for name in _WORDNET_FILES:
        data = (final / name).read_bytes()
        assert data, name
        assert b"\r" not in data, f"{name} still has CR line ends"
    assert len((final / "data.noun").read_bytes()) > 10_000_000
    leftovers = [p.name for p in (root / "corpora").iterdir() if p.name != "wordnet"]
    assert leftovers == [], f"temporary folders left behind: {leftovers}"


def test_ensure_wordnet_data_is_idempotent(tmp_path):
    root = tmp_path / "nltk"
    assert ensure_wordnet_data(root) == root
    _wordnet_files_ok(root)
    final = root / "corpora" / "wordnet"
    before = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    assert ensure_wordnet_data(root) == root
    _wordnet_files_ok(root)
    after = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    assert after == before  # the second call touched nothing


def test_ensure_wordnet_data_replaces_a_partial_copy(tmp_path):
    root = tmp_path / "nltk"
    final = root / "corpora" / "wordnet"
    final.mkdir(parents=True)
    (final / "data.noun").write_bytes(b"half a file")  # an older, interrupted copy: no marker
    ensure_wordnet_data(root)
    _wordnet_files_ok(root)


@pytest.mark.filterwarnings("ignore:The multilingual functions:UserWarning")
def test_ensure_wordnet_data_readable_by_nltk(tmp_path, monkeypatch):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = ensure_wordnet_data(tmp_path / "nltk")
    # nltk only reads corpora from folders on its data path (as ovseg.core.models.lexicon.wordnet does)
    monkeypatch.setattr(nltk.data, "path", [str(root)])
    reader = WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)
    assert reader.synset("dog.n.01").lemma_names()[0] == "dog"


def _race(root, start_at, queue):
    # every process sleeps until the same moment, then copies at once
    time.sleep(max(0.0, start_at - time.time()))
    try:
        queue.put(("ok", str(ensure_wordnet_data(root))))
    except BaseException as exc:  # report, never hang the parent
        queue.put(("error", repr(exc)))


@pytest.mark.parametrize("round_", range(3))
def test_ensure_wordnet_data_from_four_processes_at_once(tmp_path, round_):
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    root = tmp_path / "nltk"
    queue = ctx.Queue()
    start_at = time.time() + (0.5 if ctx.get_start_method() == "fork" else 5.0)
    procs = [ctx.Process(target=_race, args=(root, start_at, queue)) for _ in range(4)]
    try:
        for p in procs:
            p.start()
        results = [queue.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
    finally:  # a process that hangs (or a queue that times out) is not left behind
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    assert results == [("ok", str(root))] * 4, results
    _wordnet_files_ok(root)
    assert os.listdir(root / "corpora") == ["wordnet"]
