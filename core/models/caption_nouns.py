"""Object nouns of a caption: the nouns whose WordNet sense descends from object.n.01, as XPM's cross-modal
pseudo-labelling (seed 003, sec. 3.2.2) and Concept Mask's tag corpus extract them.

Everything runs on WordNet 3.0 through `ovseg.core.models.lexicon` (no tagger, no other nltk data): a caption is
split into lower-case word tokens by a regular expression, and a small rule-based reading over WordNet's
parts of speech decides which tokens are nouns. The rules, in the order they apply:

1. Function words (determiners, numbers, possessive pronouns, prepositions, auxiliaries, conjunctions,
   pronouns, particles, a few adverbs) are never nouns. A token "x's" is the possessive of the noun "x"
   ("man's"), unless x is a function word ("it's", "there's").
2. Multi-word names first, longest match wins: a run of 3, then 2, consecutive content tokens (no
   punctuation between them) that WordNet knows as an object noun, written with "_" ("fire hydrant",
   "teddy bears" -> teddy_bear) or as one word ("fire place" -> fireplace, "cell phone" -> cellphone), is
   one unit. A run that WordNet knows but not as an object ("baseball game", "traffic light", a signal in
   WordNet) is left to its words. A name opening with a word more often an adjective is taken only where it
   is a kind of what its last word names ("brown bear", "double bed"; not "black cat", a fisher) and never
   as one written word ("white cup" is not a whitecup).
3. Base forms: WordNet's morphy ("dogs" -> dog, "knives" -> knife, "men" -> man). The base forms morphy
   offers are tried reduced ones first, and the first with an object sense is used ("cows" -> cow;
   "glasses" -> glasses, the spectacles, as glass is a substance). WordNet has "people" only as a
   collective (a group, not an object); captions use it as the plural of "person", so it is read as
   "person" (PLURAL_BASES).
4. Object senses. A sense is an object sense when it is a common noun (not an instance, i.e. not a proper
   name), one of its hypernym paths passes through object.n.01 and none passes through location.n.01
   (WordNet files places and relative positions, "top", "side", "front", "area", "corner", under object).
   A word is an object noun when
     a. its first (most frequent) sense is not a place, a body part or a substance (location.n.01,
        body_part.n.01, matter.n.03) unless that sense is itself an object sense: such a word names a
        position, a part of a body or a stuff ("top", "side", "front", "field", "hand", "head", "face",
        "back", "water", "coffee", "glass"), even where a rarer sense is a thing ("head" as a chief,
        "coffee" as the tree); and
     b. one of its first MAX_SENSE_RANK senses is an object sense ("table": the furniture is sense 2,
        after the data table). Rarer physical readings do not count ("view", "day", "set", "row", and
        "sign", whose signboard sense is the 4th).
   The sense recorded is the first object sense (WordNet's order, so "plate" is home_plate.n.01). Food and
   drink are matter, not objects, in WordNet ("pizza", "sandwich", "donut", "food"): they are dropped, as
   object.n.01 implies. Abstract nouns ("day", "view", "game") have no object sense and are dropped.
   "picture" and "photo" are artifacts and kept, except as the caption's opening "a picture/photo/image/
   view/... of" (META_NOUNS), which names the image itself; a portion noun before "of" ("a piece of
   luggage", "a collection of vases": PORTION_NOUNS) counts what follows and is not an object of its own.
5. Part of speech without a tagger. A content token that WordNet knows only as a noun is a noun wherever
   it stands. A token that WordNet also knows as a verb, adjective or adverb is read from its position:
   * noun position: at the start of the caption or of a sentence, after a determiner, number, possessive
     or preposition, after an adjective in such a phrase, after a noun joined by "and"/"or"/a comma,
     or after a verb (its object: "holding umbrellas", "people watch kites"): a noun, except that
     - a word more often an adjective or adverb than a noun (by WordNet's tagged counts: "white",
       "young", "orange", "remote") and a participle ("parked", "running") are modifiers unless they end
       the phrase ("a running man", "a red, white and blue umbrella"; "the building");
     - a word more often an adjective is a noun only right after a determiner or at the start
       ("an orange on a plate", "a remote"; but "a man in white");
     - after "to", a word more often a verb, or one before a particle, is an infinitive ("trying to ride
       a wave").
   * right after a noun: a participle ("a dog running", "a man surfing", "a plate topped with", and the
     same-form participles of IRREGULAR_PARTICIPLES: "a table set for two") is a verb; a third-person form
     ("a man rides a wave") is a verb unless the phrase is plural or coordinated ("two pizza boxes") or an
     auxiliary or a participle follows ("the kitchen sinks are", "passenger jets parked"); a base form is a
     verb after a plural subject ("people watch a kite"), after a coordinated one when WordNet tags it more
     often as a verb ("a man and woman watch", but "a sink and a pizza box"), or before a particle ("set
     up"), and otherwise continues a compound ("a kitchen sink", "a pizza box"). An irregular past form
     that is also a noun reads as the noun ("stove", not "stave"; "saw", "rose").
   * after an auxiliary ("is", "are", ...), a pronoun, a relative word or an adjective outside a noun
     phrase: a verb if WordNet knows it as one ("a woman is standing"), else not a noun ("is open"), except
     after "there is/are" ("there are dogs").
6. Compounds: in a run of nouns and modifiers ("a pizza box", "a kitchen counter", "a dog bed") that no
   multi-word name covers, only the head (the last noun) is an object noun candidate: the compound's head
   names the object, the nouns before it say what kind; if the head is not an object ("a kitchen area"),
   the run gives none. A possessive ends the run ("a man's hat": man, hat).

Look-ups are cached per token and per synset, so a caption costs microseconds after the first ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ovseg.core.models.lexicon import Lexicon

OBJECT_ROOT = "object.n.01"
# Physical kinds that are not objects; a word whose first sense is one of them names that kind (rule 4a).
NON_OBJECT_ROOTS = ("location.n.01", "body_part.n.01", "matter.n.03")
# Only the first this many noun senses of a word (WordNet lists them most frequent first) may make it an
# object noun (rule 4b).
MAX_SENSE_RANK = 3

_TOKEN = re.compile(r"[^\W_]+(?:['\u2019\-][^\W_]+)*")
# Punctuation that ends a sentence (a new noun phrase starts) and punctuation that separates list items.
_SENTENCE_END = re.compile(r"[.!?;:()\[\]{}\"]")
_LIST_BREAK = re.compile(r"[,/&]")

DETERMINERS = frozenset(
    "a an the this each every another one his her its my your our their no any either neither whose "
    "other which".split()
)
PLURAL_DETERMINERS = frozenset(
    "these those some many several few both all various numerous multiple more most two three four five six "
    "seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty "
    "thirty forty fifty hundred hundreds dozen dozens lots plenty".split()
)
PREPOSITIONS = frozenset(
    "of on in with near at by from into onto under over behind beside besides to for through across along "
    "alongside around above below beneath underneath between inside outside against toward towards atop past "
    "among amongst upon without within like via during about after before beyond throughout per amid amidst "
    "except than including".split()
)
PARTICLES = frozenset("up down out off away together".split())
AUXILIARIES = frozenset(
    "is are was were be been being am do does did can could will would may might shall should must "
    "isn't aren't wasn't weren't don't doesn't didn't can't won't".split()
)
CONJUNCTIONS = frozenset("and or nor but plus".split())
# Verbs that WordNet also lists as nouns but that are never nouns in a caption; they take an object.
STOP_VERBS = frozenset("has have had having".split())
OTHER_FUNCTION_WORDS = frozenset(
    "it he she they them him we you i me us itself himself herself themselves someone somebody something "
    "anyone anybody anything everyone everybody everything nobody nothing who whom what where when why how "
    "that while whilst as if because though although until unless whether very too also just not so there "
    "here then still almost nearly only even really quite rather well again yet already ever never always "
    "often sometimes now next s".split()
)
# "x's" with x one of these is a contraction ("it's", "there's"), not a possessive noun.
_CONTRACTION_BASES = OTHER_FUNCTION_WORDS | AUXILIARIES | frozenset("let".split())
# Plurals whose WordNet entry is not the plural of the word captions mean (rule 3).
PLURAL_BASES = {"people": "person"}
# Past participles identical to their base form: right after a noun they are verbs (rule 5).
IRREGULAR_PARTICIPLES = frozenset("set put cut hit shut spread split cast".split())
# Nouns that, before "of", count or portion what follows ("a piece of luggage", "a collection of vases")
# rather than name an object of their own (rule 4).
PORTION_NOUNS = frozenset(
    "piece pieces slice slices bit bits chunk chunks portion portions bunch bunches pile piles stack stacks "
    "heap heaps pair pairs group groups couple lot number variety assortment kind kinds type types sort "
    "collection collections selection array row rows line lines set sets herd herds flock flocks".split()
)
# Nouns that, opening the caption as "<noun> of ...", name the image itself (rule 4).
META_NOUNS = frozenset(
    "picture pictures photo photos photograph photographs image images view views shot shots snapshot "
    "closeup close-up pic pics".split()
)

# Token kinds.
_DET, _PREP, _PART, _AUX, _CONJ, _STOPVERB, _FUNC, _CONTENT = range(8)
# Roles.
_R_DET, _R_PREP, _R_PART, _R_AUX, _R_CONJ, _R_FUNC, _R_NOUN, _R_MOD, _R_VERB, _R_OTHER = range(10)


def tokenize(caption: str) -> list[str]:
    """Lower-case word tokens of a caption: runs of letters and digits, with apostrophes and hyphens kept
    inside a word ("man's", "t-shirt"); punctuation and white space are dropped. "’" becomes "'"."""
    return [m.group().replace("\u2019", "'") for m in _TOKEN.finditer(caption.lower())]


@dataclass(frozen=True)
class CaptionNoun:
    """One object noun of a caption.

    text: the caption's tokens it covers, as written (lower case, joined by one space): "teddy bears".
    lemma: WordNet's base form, words joined by spaces: "teddy bear".
    start, end: token indices into `tokenize(caption)`, end exclusive.
    synset: name of the sense used, the word's first object sense: "teddy.n.01".
    """

    text: str
    lemma: str
    start: int
    end: int
    synset: str


@dataclass(frozen=True)
class _Info:
    """What WordNet says about one token or multi-word name (cached)."""

    kind: int
    lemma: str = ""  # base form with "_" between words, "" when WordNet has no noun
    sense: str | None = None  # first object sense (rule 4)
    noun: bool = False  # WordNet knows it as a noun at all
    verb: bool = False
    modifier: bool = False  # WordNet knows it as an adjective or adverb
    mod_dominant: bool = False  # tagged more often as adjective/adverb than as noun
    verb_dominant: bool = False  # tagged more often as verb than as noun
    inflection: str = ""  # "ing", "ed", "s" where the token is an inflected verb form, else ""
    plural: bool = False  # a plural noun form
    plural_det: bool = False  # for determiners: one that opens a plural phrase
    possessive: bool = False


@lru_cache(maxsize=None)
def _synset_roots(name: str) -> frozenset:
    """Names of all the synset's hypernyms (instance hypernyms included), the synset itself too."""
    s = Lexicon().wn.synset(name)
    return frozenset([name, *(h.name() for h in s.closure(lambda x: x.hypernyms() + x.instance_hypernyms()))])


@lru_cache(maxsize=None)
def _is_object_sense(name: str) -> bool:
    s = Lexicon().wn.synset(name)
    if s.instance_hypernyms():
        return False
    roots = _synset_roots(name)
    return OBJECT_ROOT in roots and "location.n.01" not in roots


@lru_cache(maxsize=None)
def _is_non_object_kind(name: str) -> bool:
    roots = _synset_roots(name)
    return not _is_object_sense(name) and any(r in roots for r in NON_OBJECT_ROOTS)


def _noun_bases(wn, form: str) -> list[str]:
    """Base forms WordNet's morphology offers, reduced ones first ("cows": cow, then cows, a lemma of
    cattle.n.01; "glasses": glass, then glasses), then PLURAL_BASES."""
    morphy = getattr(wn, "_morphy", None)
    bases = list(morphy(form, "n")) if morphy is not None else [b for b in [wn.morphy(form, "n")] if b]
    bases = [b for b in bases if b != form] + [b for b in bases if b == form]
    if form in PLURAL_BASES:
        bases.insert(0, PLURAL_BASES[form])
    return list(dict.fromkeys(bases))


def _object_sense(wn, form: str) -> tuple[str, str | None, bool]:
    """(base form, first object sense or None, whether WordNet has the form as a noun) by rules 3 and 4."""
    first_base = ""
    for base in _noun_bases(wn, form):
        senses = [lemma.synset() for lemma in wn.lemmas(base, "n")]
        if not senses:
            continue
        first_base = first_base or base
        if _is_non_object_kind(senses[0].name()):
            continue
        for s in senses[:MAX_SENSE_RANK]:
            if _is_object_sense(s.name()):
                return base, s.name(), True
    return first_base, None, bool(first_base)


def _tagged_count(wn, form: str, pos: str) -> int:
    """How often WordNet's tagged corpus has `form` in the parts of speech `pos` ("n", "v", "asr")."""
    lemmas = {lemma for p in pos for lemma in wn.lemmas(form, p)}  # "a" and "s" look-ups overlap
    return sum(lemma.count() for lemma in lemmas)


@lru_cache(maxsize=200_000)
def _word_info(word: str) -> _Info:
    """WordNet's facts about one token (rules 1, 3, 4 and the parts of speech for rule 5)."""
    if word in DETERMINERS:
        return _Info(_DET)
    if word in PLURAL_DETERMINERS or (word.isdigit() and word != "1"):
        return _Info(_DET, plural_det=True)
    if word.isdigit():
        return _Info(_DET)
    for words, kind in ((PREPOSITIONS, _PREP), (PARTICLES, _PART), (AUXILIARIES, _AUX), (CONJUNCTIONS, _CONJ),
                        (STOP_VERBS, _STOPVERB), (OTHER_FUNCTION_WORDS, _FUNC)):
        if word in words:
            return _Info(kind)
    if "'" in word:
        head, _, tail = word.rpartition("'")
        if tail == "s" and head and "'" not in head and head not in _CONTRACTION_BASES:
            info = _word_info(head)
            if info.kind == _CONTENT and info.noun:
                return _Info(_CONTENT, info.lemma, info.sense, noun=True, plural=info.plural, possessive=True)
            return _Info(_FUNC)
        return _Info(_AUX if tail in ("s", "re", "m", "ll", "d", "ve") else _FUNC)
    wn = Lexicon().wn
    forms = [word] + ([word.replace("-", "_"), word.replace("-", "")] if "-" in word else [])
    for form in forms:
        info = _form_info(wn, form)
        if info.noun or info.verb or info.modifier:
            return info
    return _Info(_CONTENT)


def _form_info(wn, form: str) -> _Info:
    base, sense, noun = _object_sense(wn, form)
    verb = bool(wn.synsets(form, "v"))
    modifier = bool(wn.synsets(form, "a") or wn.synsets(form, "r"))
    inflection = ""
    if verb:
        vbase = wn.morphy(form, "v")
        if form in IRREGULAR_PARTICIPLES:
            inflection = "ed"
        elif vbase and vbase != form:
            if form.endswith("ing"):
                inflection = "ing"
            elif form.endswith("s"):
                inflection = "s"
            elif form.endswith(("ed", "en")) or not noun:
                # An irregular past form that is also a noun reads as the noun: "stove" (stave),
                # "saw", "rose", "dove", "ground".
                inflection = "ed"
    mod_dominant = False
    if noun and modifier:
        mod_dominant = _tagged_count(wn, form, "asr") > _tagged_count(wn, base or form, "n")
    verb_dominant = noun and verb and _tagged_count(wn, form, "v") > _tagged_count(wn, base or form, "n")
    plural = noun and (form in PLURAL_BASES or (bool(base) and base != form and base.replace("_", "") != form))
    return _Info(_CONTENT, base, sense, noun, verb, modifier, mod_dominant, verb_dominant, inflection, plural)


@lru_cache(maxsize=200_000)
def _phrase_info(words: tuple[str, ...]) -> _Info | None:
    """A multi-word object name over these tokens (rule 2), None if WordNet has none."""
    wn = Lexicon().wn
    first, head = _word_info(words[0]), _word_info(words[-1])
    # A name opening with a word more often an adjective ("black cat" is a fisher, "white room" a clean
    # room) is taken only where it is a kind of what its last word names ("brown bear", "double bed"), and
    # never as one written word ("white cup" is not a whitecup).
    adjectival = first.mod_dominant
    forms = ["_".join(words)] + (["".join(words)] if len(words) == 2 and not adjectival else [])
    for form in forms:
        base, sense, noun = _object_sense(wn, form)
        if sense is None:
            continue
        if adjectival and head.sense is not None and head.sense not in _synset_roots(sense):
            continue
        verb = bool(wn.synsets(form, "v"))
        return _Info(_CONTENT, base, sense, noun=True, verb=verb, plural=base != form)
    return None


def object_sense(word: str, lexicon: Lexicon | None = None) -> str | None:
    """The object sense (a synset name) that `object_nouns` would record for this word or multi-word name,
    regardless of its part of speech in a sentence; None if WordNet gives it none (rules 2 to 4)."""
    (lexicon or Lexicon()).wn  # load WordNet (once per process)
    words = tuple(tokenize(word))
    if not words:
        return None
    if len(words) > 1:
        info = _phrase_info(words)
        return info.sense if info is not None else None
    info = _word_info(words[0])
    return info.sense if info.kind == _CONTENT else None


@lru_cache(maxsize=None)
def _first_senses(classes: tuple[str, ...]) -> dict[str, str]:
    from ovseg.core.models.lexicon import wordnet

    wn = wordnet()
    out = {}
    for name in classes:
        syns = wn.synsets(name.replace(" ", "_"), pos="n")
        if syns:
            out[name] = syns[0].name()
    if "tv" in classes:
        out["tv"] = "television_receiver.n.01"
    return out


@lru_cache(maxsize=200_000)
def class_of_noun(noun: str, classes: tuple[str, ...]) -> str | None:
    """The class of `classes` a noun names: the class whose first WordNet sense is the noun's object sense or
    one of its hypernyms ("puppy" -> dog, "man" -> person, "cars" -> car); None if none."""
    from ovseg.core.models.lexicon import wordnet

    sense = object_sense(noun)
    if sense is None:
        return None
    s = wordnet().synset(sense)
    closure = {s.name()} | {h.name() for h in s.closure(lambda x: x.hypernyms())}
    for name, syn in _first_senses(tuple(classes)).items():
        if syn in closure:
            return name
    return None


def caption_names(caption: str, word: str) -> bool:
    """Whether the caption names the word or a kind of it: one of its object nouns is the word, a WordNet
    synonym, or a hyponym ("a man on a horse" names person; "a tabby on a bed" names cat), or the caption
    contains the word as written (Cap2Seg's exact match, which also reads words that are no object noun)."""
    from ovseg.core.methods.cap2seg.entailment import exact_match

    word = word.strip().lower()
    if not word:
        return False
    if exact_match(caption, word):
        return True
    return any(class_of_noun(n.lemma, (word,)) == word for n in object_nouns(caption))


@dataclass
class _Unit:
    start: int
    end: int
    info: _Info
    brk: str = ""  # "" none, "sent" sentence end, "list" comma before the unit
    word: str = ""  # the token, for one-token units
    role: int = _R_OTHER


def _units(caption: str) -> tuple[list[str], list[_Unit]]:
    """The caption's tokens and its units: multi-word names (rule 2) and single tokens, each with the
    punctuation break before it."""
    text = caption.lower()
    matches = list(_TOKEN.finditer(text))
    tokens = [m.group().replace("\u2019", "'") for m in matches]
    breaks = []
    for i, m in enumerate(matches):
        gap = text[matches[i - 1].end() : m.start()] if i else ""
        breaks.append("sent" if _SENTENCE_END.search(gap) else "list" if _LIST_BREAK.search(gap) else "")
    infos = [_word_info(t) for t in tokens]
    units: list[_Unit] = []
    i = 0
    while i < len(tokens):
        for length in (3, 2):
            j = i + length
            if j > len(tokens) or any(breaks[k] for k in range(i + 1, j)):
                continue
            if any(infos[k].kind != _CONTENT or infos[k].possessive for k in range(i, j)):
                continue
            phrase = _phrase_info(tuple(tokens[i:j]))
            if phrase is not None:
                units.append(_Unit(i, j, phrase, breaks[i]))
                i = j
                break
        else:
            units.append(_Unit(i, i + 1, infos[i], breaks[i], tokens[i]))
            i += 1
    return tokens, units


_NON_CONTENT_ROLE = {
    _DET: _R_DET, _PREP: _R_PREP, _PART: _R_PART, _AUX: _R_AUX, _CONJ: _R_CONJ, _STOPVERB: _R_VERB, _FUNC: _R_FUNC,
}


def _modifier_like(info: _Info) -> bool:
    return info.kind == _CONTENT and (
        info.mod_dominant or info.inflection in ("ing", "ed") or (info.modifier and not info.noun)
    )


def _ends_phrase(units: list[_Unit], k: int) -> bool:
    """Whether unit k would be the last word of its noun phrase: nothing, a break, a function word (other
    than "and"/"or" before a modifier: "red and white"), or a participle that ends its own phrase
    ("an orange sitting on ...") follows."""
    j = k + 1
    if j >= len(units) or units[j].brk == "sent":
        return True
    if units[j].brk:  # a comma: a list of modifiers ("a red, white and blue umbrella") continues the phrase
        return not _modifier_like(units[j].info)
    nxt = units[j].info
    if nxt.kind == _CONJ:
        return not (j + 1 < len(units) and not units[j + 1].brk and _modifier_like(units[j + 1].info))
    if nxt.kind != _CONTENT:
        return True
    if nxt.inflection in ("ing", "ed") and not nxt.mod_dominant:
        return _ends_phrase(units, j)
    return False


def _tag(units: list[_Unit]) -> None:
    """Give every unit its role (rule 5)."""
    ctx = "start"
    plural = False  # the current phrase is plural (a plural determiner or a plural noun in it)
    coord = False  # a noun followed by "and"/"or"/a comma: the next phrase is coordinated with it
    prev: _Unit | None = None
    last_content_role = _R_OTHER
    for k, u in enumerate(units):
        info = u.info
        if u.brk == "sent" or k == 0:
            ctx, plural, coord = "start", False, False
        elif u.brk == "list":
            ctx = "np" if last_content_role in (_R_NOUN, _R_MOD) else "other"
            coord = coord or last_content_role == _R_NOUN
        if info.kind != _CONTENT:
            u.role = _NON_CONTENT_ROLE[info.kind]
            if u.role == _R_DET:
                ctx, plural = "np", info.plural_det
            elif u.role == _R_PREP:
                ctx, plural, coord = "np", False, False
            elif u.role == _R_PART:
                ctx, coord = "verb", False
            elif u.role == _R_AUX:
                ctx, coord = "aux", False
                if k > 0 and _is_there(units, k - 1):
                    ctx = "np"  # "there are dogs"
            elif u.role == _R_VERB:
                ctx, coord = "verb", False
            elif u.role == _R_CONJ:
                if last_content_role == _R_NOUN:
                    coord = True
                ctx = "np" if last_content_role in (_R_NOUN, _R_MOD) else "other"
            else:
                ctx, coord = "other", False
            prev = u
            continue
        u.role = _content_role(units, k, ctx, plural, coord, prev)
        last_content_role = u.role
        if u.role == _R_NOUN:
            if info.possessive:
                ctx, plural = "np", False
            else:
                ctx = "noun"
                plural = plural or info.plural
        elif u.role == _R_MOD:
            ctx = "np"
        elif u.role == _R_VERB:
            ctx, plural, coord = "verb", False, False
        else:
            ctx = "other"
        prev = u


_THERE = frozenset(("there", "here"))


def _is_there(units: list[_Unit], k: int) -> bool:
    return units[k].word in _THERE


def _content_role(units: list[_Unit], k: int, ctx: str, plural: bool, coord: bool, prev: _Unit | None) -> int:
    """The role of content unit k in context `ctx`: plural, the phrase so far is plural; coord, it is
    coordinated with an earlier noun phrase ("a man and woman ...")."""
    info = units[k].info
    if not info.noun:
        if ctx in ("start", "np"):
            return _R_MOD  # adjectives, participles and unknown words inside a noun phrase
        if info.verb and (info.inflection or not info.modifier or ctx != "noun"):
            return _R_VERB
        return _R_OTHER
    if not (info.verb or info.modifier):
        return _R_NOUN  # a noun and nothing else
    after_det = ctx == "start" or (prev is not None and prev.role == _R_DET)
    if ctx in ("start", "np"):
        if prev is not None and prev.word == "to" and info.verb and not info.inflection:
            nxt = units[k + 1].info if k + 1 < len(units) and not units[k + 1].brk else None
            if info.verb_dominant or (nxt is not None and nxt.kind == _PART):
                return _R_VERB  # an infinitive: "trying to ride a wave", "to type up the notes"
        if (info.mod_dominant or info.inflection in ("ing", "ed")) and not _ends_phrase(units, k):
            return _R_MOD
        if info.mod_dominant and not after_det:
            return _R_MOD
        return _R_NOUN
    if ctx == "noun":
        nxt = units[k + 1].info if k + 1 < len(units) and not units[k + 1].brk else None
        if info.inflection in ("ing", "ed"):
            return _R_VERB
        if info.inflection == "s":
            # a subject before its auxiliary or participle: "the kitchen sinks are", "passenger jets parked"
            subject = nxt is not None and (
                nxt.kind == _AUX or (nxt.kind == _CONTENT and nxt.inflection in ("ing", "ed"))
            )
            return _R_NOUN if plural or coord or subject else _R_VERB
        if info.verb:
            particle = nxt is not None and nxt.kind == _PART
            # A coordinated subject is plural, but so is a list of things ("a sink and a pizza box"): there
            # the word's tagged counts decide ("watch" is more often a verb, "box" a noun).
            return _R_VERB if plural or particle or (coord and info.verb_dominant) else _R_NOUN
        return _R_OTHER if info.mod_dominant else _R_NOUN
    if ctx == "verb":
        if info.inflection in ("ing", "ed"):
            return _R_VERB
        return _R_OTHER if info.mod_dominant else _R_NOUN
    # after an auxiliary, a pronoun, a relative word or an adjective outside a noun phrase
    return _R_VERB if info.verb else _R_OTHER


def object_nouns(caption: str, lexicon: Lexicon | None = None) -> list[CaptionNoun]:
    """The object nouns of a caption in caption order, each occurrence once, never overlapping.

    Args:
        caption: any text; tokenised by `tokenize`.
        lexicon: the WordNet access to use (default a new `Lexicon`; every Lexicon shares the one WordNet
            reader of the process, and the per-token caches assume that).

    Returns:
        One CaptionNoun per object noun (module docstring, rules 1 to 6): "A man rides a wave next to two
        teddy bears" -> man (man.n.01), teddy bears (teddy bear, teddy.n.01); "rides" is a verb and "wave"
        has no object sense among its first senses.
    """
    (lexicon or Lexicon()).wn  # load WordNet (once per process)
    tokens, units = _units(caption)
    _tag(units)
    out: list[CaptionNoun] = []
    k = 0
    while k < len(units):
        if units[k].role not in (_R_NOUN, _R_MOD):
            k += 1
            continue
        j = k  # the run of modifiers and nouns k..j-1, ended by a break or after a possessive
        while j < len(units) and units[j].role in (_R_NOUN, _R_MOD) and (j == k or not units[j].brk):
            j += 1
            if units[j - 1].info.possessive:
                break
        heads = [u for u in units[k:j] if u.role == _R_NOUN]
        if heads:
            head = heads[-1]
            if head.info.sense is not None and not _counts_other(units, tokens, k, j, head):
                out.append(
                    CaptionNoun(
                        text=" ".join(tokens[head.start : head.end]),
                        lemma=head.info.lemma.replace("_", " "),
                        start=head.start,
                        end=head.end,
                        synset=head.info.sense,
                    )
                )
        k = j
    return out


def _counts_other(units: list[_Unit], tokens: list[str], k: int, j: int, head: _Unit) -> bool:
    """Rule 4: a portion noun before "of" ("a piece of luggage"), and "<det> picture/photo/... of" opening
    the caption (it names the image), are not objects of their own."""
    if j >= len(units) or units[j].word != "of":
        return False
    words = {" ".join(tokens[head.start : head.end]), head.info.lemma}
    if words & PORTION_NOUNS:
        return True
    return bool(words & META_NOUNS) and all(u.role == _R_DET for u in units[:k])
