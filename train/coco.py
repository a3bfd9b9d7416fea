"""The COCO development set (coco_dev) as concept targets, and the fixed target/base class split.

The folder holds `images/<12-digit id>.jpg`, `instances.json` (COCO instances: polygons, and uncompressed
RLE for crowd regions) and optionally `captions.json` (COCO captions). Only the 80 COCO "thing" classes
are annotated: a pixel outside every annotated mask is *unlabelled*, not background, and is scored as
ignore. 65 classes are scored: 17 held-out *target* classes that training must never see annotated, and
48 *base* classes. The other 15 COCO classes still mark their pixels as labelled (valid) but are not
scored.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "TARGET_CLASSES",
    "BASE_CLASSES",
    "SCORED_CLASSES",
    "ConceptTargets",
    "CocoConceptDataset",
    "split_image_ids",
    "held_out_image_ids",
    "HOLDOUT_FRACTION",
    "SPLIT_SEED",
    "assert_no_target_annotations",
]

TARGET_CLASSES: tuple[str, ...] = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard",
    "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors",
)
BASE_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep",
    "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard",
    "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "pizza", "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven",
    "toaster", "refrigerator", "book", "clock", "vase", "toothbrush",
)
SCORED_CLASSES: tuple[str, ...] = TARGET_CLASSES + BASE_CLASSES


@dataclass
class ConceptTargets:
    """Ground truth of one image, at the image's full size (H, W from instances.json).

    Attributes:
        gt: class name -> bool HxW, the union of the non-crowd instance masks of that class; one entry
            per requested class with at least one non-crowd instance in the image.
        valid: bool HxW, the union of every annotated mask in the image (any category, crowd included):
            the pixels that count. Unlabelled pixels (False) are ignored when scoring.
        crowd: class name -> bool HxW, the union of that class's crowd regions; only classes with a crowd
            annotation in the image have an entry.
    """

    gt: dict[str, np.ndarray]
    valid: np.ndarray
    crowd: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of every mask."""
        return tuple(self.valid.shape)

    def valid_for(self, name: str) -> np.ndarray:
        """bool HxW: the pixels that count when scoring class `name` (valid minus its crowd regions)."""
        crowd = self.crowd.get(name)
        if crowd is None:
            return self.valid
        return self.valid & ~crowd


def _normalise_names(class_names) -> list[str]:
    if isinstance(class_names, str):
        class_names = [class_names]
    return [str(name).strip().lower() for name in class_names]


def assert_no_target_annotations(class_names: Iterable[str] | str) -> None:
    """Refuse to go on if any held-out target class is among `class_names` (a safety guard for training).

    Args:
        class_names: the class names whose annotations a training run is about to use (a single name
            is accepted too). Compared case-insensitively, surrounding spaces ignored.

    Raises:
        RuntimeError: naming the target classes found.
    """
    found = sorted(set(_normalise_names(class_names)) & set(TARGET_CLASSES))
    if found:
        raise RuntimeError(
            f"training must not use annotations of the held-out target classes, got {found}; "
            f"train on BASE_CLASSES only"
        )


# The split every trainer uses by default, and so the images `ovseg eval` calls held out.
HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 0


def split_image_ids(ids: Iterable[int], holdout_fraction: float = HOLDOUT_FRACTION, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """Split image ids into (train_ids, held_out_ids), deterministically.

    The result depends only on the set of ids, the fraction and the seed (not on the input order):
    the sorted ids are permuted with `numpy.random.default_rng(seed)` and the first
    round(holdout_fraction * n) are held out. Both lists are returned sorted.

    Raises:
        ValueError: holdout_fraction outside [0, 1], or duplicate ids.
    """
    if not 0.0 <= float(holdout_fraction) <= 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1], got {holdout_fraction}")
    ids = [int(i) for i in ids]
    unique = sorted(set(ids))
    if len(unique) != len(ids):
        raise ValueError(f"image ids must be unique, got {len(ids) - len(unique)} duplicate(s)")
    n_hold = int(round(float(holdout_fraction) * len(unique)))
    order = np.random.default_rng(seed).permutation(len(unique))
    held = sorted(unique[i] for i in order[:n_hold])
    train = sorted(unique[i] for i in order[n_hold:])
    return train, held


def fraction_of(ids: Sequence, fraction: float, seed: int = SPLIT_SEED) -> list:
    """The first `fraction` of a seeded permutation of `ids`, in their original order: the data-scaling study's
    subsets are nested (the 25% share is inside the 50% share). fraction 1 returns every id."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
    ids = list(ids)
    if fraction == 1.0:
        return ids
    order = list(range(len(ids)))
    random.Random(seed).shuffle(order)
    keep = sorted(order[: max(1, round(fraction * len(ids)))])
    return [ids[k] for k in keep]


def held_out_image_ids(ids: Iterable[int]) -> set[int]:
    """The images the trainers hold out with the default split: base-class scores there measure images no
    trained part has seen."""
    return set(split_image_ids(ids)[1])


class CocoConceptDataset:
    """Images, captions and per-class ground-truth masks of a COCO-format folder.

    Args:
        root: folder holding `images/` and `instances.json` (and optionally `captions.json`).
        classes: the class names to score (default SCORED_CLASSES); each must be a COCO category name.
        image_ids: restrict to these image ids (default: every image in instances.json).

    Raises:
        FileNotFoundError: root, `images/` or `instances.json` is missing.
        ValueError: an unknown class name or image id.
    """

    def __init__(self, root, classes: Sequence[str] = SCORED_CLASSES, image_ids: Iterable[int] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"COCO dataset root {self.root} does not exist or is not a folder")
        self.images_dir = self.root / "images"
        instances_path = self.root / "instances.json"
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"COCO dataset root {self.root} has no images/ folder ({self.images_dir})")
        if not instances_path.is_file():
            raise FileNotFoundError(f"COCO dataset root {self.root} has no instances.json ({instances_path})")

        from pycocotools.coco import COCO

        # pycocotools prints "loading annotations into memory..." etc. to stdout.
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(instances_path))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, AssertionError) as exc:
            # not JSON, or not COCO's layout: say which file, not only where in it
            what = f"missing key {exc}" if isinstance(exc, KeyError) else (str(exc).splitlines() or [repr(exc)])[0]
            raise ValueError(f"{instances_path} is not valid COCO instances JSON: {what}") from None

        self._cat_name = {cat_id: cat["name"] for cat_id, cat in self.coco.cats.items()}
        name_to_id = {name: cat_id for cat_id, name in self._cat_name.items()}
        unknown = [name for name in classes if name not in name_to_id]
        if unknown:
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise ValueError(f"unknown class name(s) {unknown[:10]}{more}: not a category of {instances_path}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes must be unique, got {list(classes)}")
        self.classes: tuple[str, ...] = tuple(classes)
        self._scored = set(self.classes)

        all_ids = sorted(self.coco.imgs)
        if image_ids is None:
            self._image_ids = all_ids
        else:
            wanted = sorted({int(i) for i in image_ids})
            missing = sorted(set(wanted) - set(self.coco.imgs))
            if missing:
                raise ValueError(f"image id(s) not in {instances_path}: {missing[:10]}")
            self._image_ids = wanted

        self._captions = self._load_captions(self.root / "captions.json")
        logger.info(
            "coco dataset %s: %d images, %d classes, %d annotations, captions for %d images",
            self.root, len(self._image_ids), len(self.classes), len(self.coco.anns), len(self._captions),
        )

    @staticmethod
    def _load_captions(path: Path) -> dict[int, list[str]]:
        if not path.is_file():
            logger.info("no captions.json in %s: captions() returns []", path.parent)
            return {}
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        captions: dict[int, list[str]] = {}
        for ann in data.get("annotations", []):
            captions.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]).strip())
        return captions

    def __len__(self) -> int:
        return len(self._image_ids)

    @property
    def image_ids(self) -> list[int]:
        """The image ids, sorted (a copy)."""
        return list(self._image_ids)

    def _image_info(self, image_id: int) -> dict:
        info = self.coco.imgs.get(int(image_id))
        if info is None:
            raise KeyError(f"image id {image_id} is not in {self.root / 'instances.json'}")
        return info

    def image_size(self, image_id: int) -> tuple[int, int]:
        """(height, width) of the image, from instances.json."""
        info = self._image_info(image_id)
        return int(info["height"]), int(info["width"])

    def image_path(self, image_id: int) -> Path:
        """Path of the image file (`images/<file_name>`)."""
        info = self._image_info(image_id)
        return self.images_dir / info.get("file_name", f"{int(image_id):012d}.jpg")

    def load_rgb(self, image_id: int) -> np.ndarray:
        """The image as HxWx3 uint8 RGB on its stored pixel grid, where COCO draws the masks: EXIF
        orientation is not applied."""
        from PIL import Image

        with Image.open(self.image_path(image_id)) as im:
            return np.asarray(im.convert("RGB"))

    def captions(self, image_id: int) -> list[str]:
        """The image's captions (stripped), [] when it has none or there is no captions.json."""
        self._image_info(image_id)
        return list(self._captions.get(int(image_id), []))

    def annotations(self, image_id: int) -> list[dict]:
        self._image_info(image_id)
        return self.coco.loadAnns(self.coco.getAnnIds(imgIds=[int(image_id)]))

    def classes_present(self, image_id: int) -> list[str]:
        """Scored classes with at least one non-crowd instance in the image, in `self.classes` order."""
        names = {
            self._cat_name[ann["category_id"]] for ann in self.annotations(image_id) if not ann.get("iscrowd", 0)
        }
        return [name for name in self.classes if name in names]

    def concept_targets(self, image_id: int) -> ConceptTargets:
        """Per-class ground truth, the valid (labelled) pixels and crowd regions, at full image size."""
        height, width = self.image_size(image_id)
        valid = np.zeros((height, width), dtype=bool)
        gt: dict[str, np.ndarray] = {}
        crowd: dict[str, np.ndarray] = {}
        for ann in self.annotations(image_id):
            mask = self.coco.annToMask(ann).astype(bool)
            if mask.shape != (height, width):
                raise ValueError(
                    f"annotation {ann.get('id')} of image {image_id} decodes to {mask.shape}, "
                    f"expected {(height, width)}"
                )
            valid |= mask
            name = self._cat_name[ann["category_id"]]
            if name not in self._scored:
                continue
            into = crowd if ann.get("iscrowd", 0) else gt
            if name in into:
                into[name] |= mask
            else:
                into[name] = mask
        # keep gt in class order
        gt = {name: gt[name] for name in self.classes if name in gt}
        return ConceptTargets(gt=gt, valid=valid, crowd=crowd)


def training_mask(dataset: CocoConceptDataset, image_id: int, name: str) -> np.ndarray:
    """The training target of a base class on one image: HxW uint8, 1 on the class's instances, 255 on its
    crowd regions (ignored by the loss), 0 elsewhere.

    Only this class's annotations are decoded, after `assert_no_target_annotations`: no mask of another
    class, and never one of a target class, is read. Unlabelled pixels count as background (0) here: a
    segmenter that never sees a negative pixel learns to cover the whole image.
    """
    assert_no_target_annotations([name])
    h, w = dataset.image_size(image_id)
    target = np.zeros((h, w), dtype=np.uint8)
    for ann in dataset.annotations(image_id):
        if dataset._cat_name[ann["category_id"]] != name:
            continue
        mask = dataset.coco.annToMask(ann).astype(bool)
        if ann.get("iscrowd", 0):
            target[mask & (target == 0)] = 255
        else:
            target[mask] = 1
    return target


def base_training_pairs(dataset: CocoConceptDataset, image_ids: Iterable[int]) -> list[tuple[int, str]]:
    """(image id, base class) for every base class with a non-crowd instance in each image."""
    pairs = []
    for image_id in image_ids:
        for name in dataset.classes_present(image_id):
            if name in BASE_CLASSES:
                pairs.append((int(image_id), name))
    assert_no_target_annotations({name for _, name in pairs})
    return pairs
