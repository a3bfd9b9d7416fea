"""Parsing what a user types: "dog, frisbee, -person" -> positives and negatives."""

from __future__ import annotations

import re

from ovseg.core.errors import ConceptError

MAX_WORD_LENGTH = 64


def parse_words(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """Words of a comma-separated string or a list, cleaned like `parse_concepts`; may be empty.

    A leading '-' is dropped: this is for lists that are all of one kind (e.g. negatives).
    """
    items = [text] if isinstance(text, str) else list(text)
    words: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConceptError(f"a word must be a string, got {type(item).__name__}")
        for raw in re.split(r"[,;\n]", item):
            word = _clean(raw.strip().lstrip("-"))
            if word and word not in words:
                words.append(word)
    return words


def _clean(raw: str) -> str:
    word = re.sub(r"\s+", " ", raw.strip().lower())
    if not word:
        return ""
    if len(word) > MAX_WORD_LENGTH:
        raise ConceptError(f"the word {word[:20]!r}... is longer than {MAX_WORD_LENGTH} characters")
    if not any(ch.isalnum() for ch in word):
        raise ConceptError(f"{word!r} is not a word: it has no letter or digit")
    return word


def parse_concepts(text: str | list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Split a comma- or semicolon-separated word list into (positives, negatives).

    A word written with a leading '-' is a negative ("-person"). Words are lower-cased, inner white space
    is folded, duplicates are dropped (order kept). Raises ConceptError when no positive word is left or a
    word is not a word.
    """
    if isinstance(text, str):
        parts = re.split(r"[,;\n]", text)
    elif isinstance(text, (list, tuple)):
        if not all(isinstance(p, str) for p in text):
            raise ConceptError("every word in the list must be a string")
        parts = list(text)
    else:
        raise ConceptError(f"words must be a string like 'dog, frisbee' or a list, got {type(text).__name__}")
    positives: list[str] = []
    negatives: list[str] = []
    for raw in parts:
        word = raw.strip()
        target = positives
        if word.startswith("-"):
            target, word = negatives, word[1:]
        word = _clean(word)
        if not word:
            continue
        if word not in target:
            target.append(word)
    if not positives:
        raise ConceptError(
            "no word to look for: type one or more words separated by commas, e.g. 'dog, frisbee' "
            "(a word with a leading '-' is a negative)"
        )
    return positives, [n for n in negatives if n not in positives]
