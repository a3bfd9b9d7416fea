"""The classifier's 1000 ImageNet classes: index, WordNet id and names (assets/imagenet_classes.tsv)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources


@dataclass(frozen=True)
class ImageNetClass:
    index: int
    wnid: str  # WordNet 3.0 noun offset, e.g. "n02123045" (tabby.n.01)
    names: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def offset(self) -> int:
        return int(self.wnid[1:])


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    table = resources.files("ovseg.assets").joinpath("imagenet_classes.tsv").read_text(encoding="utf-8")
    rows = list(csv.reader(table.splitlines(), delimiter="\t"))
    if rows[0] != ["index", "wnid", "names"]:
        raise RuntimeError("assets/imagenet_classes.tsv has an unexpected header")
    classes = tuple(
        ImageNetClass(int(i), wnid, tuple(n.strip() for n in names.split(",") if n.strip()))
        for i, wnid, names in rows[1:]
    )
    if [c.index for c in classes] != list(range(1000)):
        raise RuntimeError("assets/imagenet_classes.tsv must list the 1000 classes in order")
    return classes
