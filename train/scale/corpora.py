"""Image-caption corpora, read one sample at a time: nothing here holds images or features in memory, only
the list of samples and their captions (text).

`open_corpus(path)` reads any of:
- a COCO-format folder (images/ + captions.json and/or instances.json): `CocoCorpus`; an image without a
  caption can be given one made from its base-class labels by the trainer (`labels`);
- a JSONL or CSV caption file, or a folder holding captions.jsonl / captions.csv: one line or row per caption,
  {"image": "path/relative/to/the/file.jpg", "caption": "..."} (or "captions": [...]); CSV columns image,
  caption. Lines of the same image are grouped: `CaptionFileCorpus`;
- WebDataset shards: a .tar file, a folder of them, or a glob ("shards/train-{000..009}.tar" is not expanded;
  use "shards/train-*.tar"). Members sharing a key (the path up to the first dot of the file name) form a
  sample: an image (.jpg, .jpeg, .png, .webp) and its caption (.txt: one caption per line; .json: "caption"
  or "captions"). Images are read by offset, so any sample can be read at any time: `TarCorpus`.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class CorpusError(ValueError):
    """A corpus that cannot be read, with what was wrong and where."""


class Corpus:
    """len(corpus) samples; for each, a stable key, its captions, its encoded image and, where the corpus has
    instance labels, the class names present."""

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, i: int) -> str:
        raise NotImplementedError

    def captions(self, i: int) -> list[str]:
        raise NotImplementedError

    def image_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def labels(self, i: int) -> list[str] | None:
        """Class names present in sample i (None: the corpus has no labels)."""
        return None

    def load_rgb(self, i: int) -> np.ndarray:
        from PIL import Image

        from ovseg.core.image_io import ImageError, load_image

        data = self.image_bytes(i)
        try:
            im = Image.open(io.BytesIO(data))
        except Exception as exc:
            raise ImageError(f"{self.key(i)}: not a readable image ({exc})") from None
        return load_image(im, name=self.key(i))

    def fingerprint(self, i: int) -> str:
        """sha1 of the encoded image: a feature cache entry is valid for these bytes only."""
        return hashlib.sha1(self.image_bytes(i)).hexdigest()

    def describe(self) -> str:
        return f"{type(self).__name__} ({len(self)} images)"


class CocoCorpus(Corpus):
    """The images `ids` of a COCO folder (`ovseg.train.coco.CocoConceptDataset`)."""

    def __init__(self, dataset, ids: list[int]):
        self.dataset, self.ids = dataset, [int(i) for i in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def key(self, i: int) -> str:
        return str(self.ids[i])

    def captions(self, i: int) -> list[str]:
        return self.dataset.captions(self.ids[i])

    def image_bytes(self, i: int) -> bytes:
        return self.dataset.image_path(self.ids[i]).read_bytes()

    def labels(self, i: int) -> list[str]:
        return self.dataset.classes_present(self.ids[i])

    def load_rgb(self, i: int) -> np.ndarray:
        return self.dataset.load_rgb(self.ids[i])


class CaptionFileCorpus(Corpus):
    """Images on disk with a JSONL or CSV caption file (paths relative to the file's folder)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            found = [path / n for n in ("captions.jsonl", "captions.csv") if (path / n).is_file()]
            if not found:
                raise CorpusError(f"{path}: no captions.jsonl or captions.csv in this folder")
            path = found[0]
        self.path, self.root = path, path.parent
        grouped: dict[str, list[str]] = {}
        for line_no, image, caption in self._rows(path):
            if not image or not isinstance(image, str):
                raise CorpusError(f"{path}:{line_no}: no image path")
            caps = caption if isinstance(caption, list) else [caption]
            caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
            if not caps:
                raise CorpusError(f"{path}:{line_no}: no caption for {image}")
            grouped.setdefault(image, []).extend(caps)
        if not grouped:
            raise CorpusError(f"{path}: no caption lines")
        self.images = sorted(grouped)
        self._captions = grouped
        missing = [im for im in self.images if not (self.root / im).is_file()]
        if missing:
            raise CorpusError(f"{path}: {len(missing)} image file(s) not found, e.g. {self.root / missing[0]}")

    @staticmethod
    def _rows(path: Path):
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                    raise CorpusError(f"{path}: a CSV corpus needs the columns image and caption, "
                                      f"found {reader.fieldnames}")
                for n, row in enumerate(reader, start=2):
                    yield n, row["image"], row["caption"]
            return
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise CorpusError(f"{path}:{n}: expected an object with image and caption")
                yield n, obj.get("image"), obj.get("captions", obj.get("caption"))

    def __len__(self) -> int:
        return len(self.images)

    def key(self, i: int) -> str:
        return self.images[i]

    def captions(self, i: int) -> list[str]:
        return list(self._captions[self.images[i]])

    def image_bytes(self, i: int) -> bytes:
        return (self.root / self.images[i]).read_bytes()


@dataclass(frozen=True)
class _Member:
    shard: str
    offset: int
    size: int


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's convention: "dir/abc.seg.jpg" -> ("dir/abc", "seg.jpg")."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class TarCorpus(Corpus):
    """WebDataset tar shards, indexed once (member offsets); images read by offset on demand."""

    def __init__(self, shards: list[str | Path]):
        if not shards:
            raise CorpusError("no tar shard given")
        self.shards = [str(s) for s in shards]
        members: dict[str, dict] = {}
        for shard in self.shards:
            try:
                with tarfile.open(shard, "r:") as tar:
                    for m in tar:
                        if not m.isfile():
                            continue
                        key, ext = _split_key(m.name)
                        sample = members.setdefault(f"{Path(shard).name}/{key}", {})
                        if ext in ("txt", "json"):
                            raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
                            sample.setdefault("captions", []).extend(self._parse_caption(raw, ext, shard, m.name))
                        elif "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                            sample["image"] = _Member(shard, m.offset_data, m.size)
            except (tarfile.TarError, OSError) as exc:
                raise CorpusError(f"{shard}: not a readable tar shard ({exc})") from None
        self.keys = sorted(k for k, s in members.items() if "image" in s and s.get("captions"))
        if not self.keys:
            raise CorpusError(f"{self.shards[0]}{' ...' if len(self.shards) > 1 else ''}: no sample with both an "
                              "image and a caption")
        self._members = {k: members[k] for k in self.keys}
        self.skipped = len(members) - len(self.keys)

    @staticmethod
    def _parse_caption(raw: str, ext: str, shard: str, name: str) -> list[str]:
        if ext == "json":
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{shard}: {name} is not JSON ({exc.msg})") from None
            caps = obj.get("captions", obj.get("caption")) if isinstance(obj, dict) else None
            caps = caps if isinstance(caps, list) else [caps]
            return [c.strip() for c in caps if isinstance(c, str) and c.strip()]
        return [line.strip() for line in raw.splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, i: int) -> str:
        return self.keys[i]

    def captions(self, i: int) -> list[str]:
        return list(self._members[self.keys[i]]["captions"])

    def image_bytes(self, i: int) -> bytes:
        m = self._members[self.keys[i]]["image"]
        with open(m.shard, "rb") as f:
            f.seek(m.offset)
            return f.read(m.size)


def open_corpus(path: str | Path) -> Corpus:
    """A COCO folder's every image, a caption file (JSONL / CSV) or WebDataset shards, by what `path` holds."""
    text = str(path)
    if any(ch in text for ch in "*?["):
        shards = sorted(glob.glob(text))
        if not shards:
            raise CorpusError(f"{text}: no file matches")
        return TarCorpus(shards)
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() == ".tar":
            return TarCorpus([p])
        if p.suffix.lower() in (".jsonl", ".csv"):
            return CaptionFileCorpus(p)
        raise CorpusError(f"{p}: expected a .tar shard, a .jsonl or .csv caption file, or a folder")
    if (p / "captions.json").is_file() or (p / "instances.json").is_file():
        from ovseg.train.coco import CocoConceptDataset

        dataset = CocoConceptDataset(p)
        return CocoCorpus(dataset, dataset.image_ids)
    if (p / "captions.jsonl").is_file() or (p / "captions.csv").is_file():
        return CaptionFileCorpus(p)
    shards = sorted(p.glob("*.tar"))
    if shards:
        return TarCorpus(shards)
    raise CorpusError(f"{p}: not a COCO folder (captions.json / instances.json), a caption-file folder "
                      "(captions.jsonl / captions.csv) or a folder of .tar shards")
