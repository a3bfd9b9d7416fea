"""Parsing what a user types: "dog, frisbee, -person" -> positives and negatives."""

from __future__ import annotations

import re

from ovseg.core.errors import ConceptError

MAX_WORD_LENGTH = 64


def parse_concepts(text: str | list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Split a comma- or semicolon-separated word list into (positives, negatives).

    A word written with a leading '-' is a negative ("-person"). Words are lower-cased, inner white space
    is folded, duplicates are dropped (order kept). Raises ConceptError when no positive word is left or a
    word is not a word.
    """
    if isinstance(text, str):
        parts = re.split(r"[,;\n]", text)
    elif isinstance(text, (list, tuple)):
        parts = [str(p) for p in text]
    else:
        raise ConceptError(f"words must be a string like 'dog, frisbee' or a list, got {type(text).__name__}")
    positives: list[str] = []
    negatives: list[str] = []
    for raw in parts:
        word = re.sub(r"\s+", " ", raw.strip().lower())
        if not word:
            continue
        target = positives
        if word.startswith("-"):
            target, word = negatives, word[1:].strip()
            if not word:
                continue
        if len(word) > MAX_WORD_LENGTH:
            raise ConceptError(f"the word {word[:20]!r}... is longer than {MAX_WORD_LENGTH} characters")
        if not any(ch.isalnum() for ch in word):
            raise ConceptError(f"{word!r} is not a word: it has no letter or digit")
        if word not in target:
            target.append(word)
    if not positives:
        raise ConceptError(
            "no word to look for: type one or more words separated by commas, e.g. 'dog, frisbee' "
            "(a word with a leading '-' is a negative)"
        )
    return positives, [n for n in negatives if n not in positives]
