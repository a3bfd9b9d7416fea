"""Tests of ovseg.train.coco: the class split, the guard, and the dataset on the shared coco_dev."""

import json

import numpy as np
import pytest

from ovseg.train.coco import (BASE_CLASSES, SCORED_CLASSES, TARGET_CLASSES, CocoConceptDataset,
                              assert_no_target_annotations, split_image_ids)
from helpers import COCO_DEV

needs_coco_dev = pytest.mark.skipif(
    not (COCO_DEV / "instances.json").is_file(), reason=f"shared data set not found at {COCO_DEV}"
)


@pytest.fixture(scope="module")
def dataset():
    return CocoConceptDataset(COCO_DEV)


def test_class_split_constants():
    assert len(TARGET_CLASSES) == 17
    assert len(BASE_CLASSES) == 48
    assert not set(TARGET_CLASSES) & set(BASE_CLASSES)
    assert len(set(SCORED_CLASSES)) == 65
    assert SCORED_CLASSES == TARGET_CLASSES + BASE_CLASSES
    assert isinstance(TARGET_CLASSES, tuple) and isinstance(BASE_CLASSES, tuple)


def test_guard_on_target_classes():
    with pytest.raises(RuntimeError, match="dog"):
        assert_no_target_annotations("dog")
    with pytest.raises(RuntimeError, match="dog"):
        assert_no_target_annotations(["person", "dog"])
    with pytest.raises(RuntimeError, match="cat"):
        assert_no_target_annotations([" Cat "])
    assert_no_target_annotations(["person", "car"])
    assert_no_target_annotations(list(BASE_CLASSES))


def test_split_image_ids_is_deterministic():
    ids = list(range(100, 200))
    train, held = split_image_ids(ids, 0.2, seed=0)
    assert len(held) == 20 and len(train) == 80
    assert not set(train) & set(held) and set(train) | set(held) == set(ids)
    assert split_image_ids(list(reversed(ids)), 0.2, seed=0) == (train, held)
    assert split_image_ids(ids, 0.2, seed=1) != (train, held)
    assert split_image_ids(ids, 0.0, seed=0) == (ids, [])
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_image_ids(ids, 1.5, seed=0)


def test_missing_root_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CocoConceptDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="images/"):
        CocoConceptDataset(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="instances.json"):
        CocoConceptDataset(tmp_path)


def test_tiny_fabricated_dataset(tmp_path, capsys):
    """Crowd regions, unscored classes and unlabelled pixels on a 4x6 image built by hand."""
    (tmp_path / "images").mkdir()
    square = lambda x0, y0, x1, y1: [[x0, y0, x1, y0, x1, y1, x0, y1]]  # noqa: E731
    instances = {
        "images": [{"id": 7, "file_name": "000000000007.jpg", "width": 6, "height": 4}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 10, "name": "traffic light"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 18, "iscrowd": 0, "segmentation": square(0, 0, 2, 2),
             "area": 4, "bbox": [0, 0, 2, 2]},
            # a crowd of people: uncompressed RLE (column-major counts), the last column (x=5)
            {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [4, 6], "counts": [20, 4]}, "area": 4, "bbox": [5, 0, 1, 4]},
            {"id": 3, "image_id": 7, "category_id": 10, "iscrowd": 0, "segmentation": square(3, 2, 4, 4),
             "area": 2, "bbox": [3, 2, 1, 2]},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    ds = CocoConceptDataset(tmp_path, classes=("dog", "person"))
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced
    assert ds.image_ids == [7] and len(ds) == 1
    assert ds.captions(7) == []  # no captions.json
    assert ds.classes_present(7) == ["dog"]  # the person annotation is a crowd
    t = ds.concept_targets(7)
    assert set(t.gt) == {"dog"} and set(t.crowd) == {"person"}
    assert t.gt["dog"].dtype == bool and t.gt["dog"].shape == (4, 6)
    assert t.crowd["person"][:, 5].all() and t.crowd["person"].sum() == 4
    # valid = dog + crowd person + the unscored traffic light
    assert t.valid.sum() == t.gt["dog"].sum() + 4 + 2
    assert not (t.valid_for("person") & t.crowd["person"]).any()
    assert np.array_equal(t.valid_for("dog"), t.valid)
    with pytest.raises(ValueError, match="unknown class"):
        CocoConceptDataset(tmp_path, classes=("person", "unicorn"))
    with pytest.raises(ValueError, match="unknown class"):
        CocoConceptDataset(tmp_path)  # the default SCORED_CLASSES are not all categories here


@pytest.mark.slow
@needs_coco_dev
def test_dataset_size_and_categories(dataset):
    assert len(dataset) == 464
    assert dataset.image_ids == sorted(dataset.image_ids)
    names = {cat["name"] for cat in dataset.coco.cats.values()}
    assert set(SCORED_CLASSES) <= names
    assert len(names - set(SCORED_CLASSES)) == 15
    assert dataset.image_path(dataset.image_ids[0]).is_file()


@pytest.mark.slow
@needs_coco_dev
def test_concept_targets_on_real_image(dataset):
    image_id = next(i for i in dataset.image_ids if dataset.classes_present(i))
    height, width = dataset.image_size(image_id)
    t = dataset.concept_targets(image_id)
    assert t.valid.shape == (height, width) and t.valid.dtype == bool
    assert list(t.gt) == dataset.classes_present(image_id)
    for name, mask in t.gt.items():
        assert mask.shape == (height, width) and mask.dtype == bool
        assert mask.any()
        assert not (mask & ~t.valid).any(), f"{name} gt leaks outside valid"
    assert t.valid.any()


@pytest.mark.slow
@needs_coco_dev
def test_crowd_regions_on_real_data(dataset):
    with_crowd = [i for i in dataset.image_ids if dataset.coco.getAnnIds(imgIds=[i], iscrowd=True)]
    assert with_crowd, "coco_dev should hold some crowd annotations"
    t = dataset.concept_targets(with_crowd[0])
    assert t.crowd
    for name, mask in t.crowd.items():
        assert mask.dtype == bool and mask.any()
        assert not (t.valid_for(name) & mask).any()
        assert (t.valid & mask).sum() == mask.sum()  # crowd pixels are labelled


@pytest.mark.slow
@needs_coco_dev
def test_captions_present(dataset):
    captioned = [i for i in dataset.image_ids if dataset.captions(i)]
    assert len(captioned) == 257
    caps = dataset.captions(captioned[0])
    assert len(caps) == 5 and all(isinstance(c, str) and c for c in caps)


@pytest.mark.slow
@needs_coco_dev
def test_image_id_subset(dataset):
    subset = dataset.image_ids[:3]
    small = CocoConceptDataset(COCO_DEV, image_ids=reversed(subset))
    assert small.image_ids == subset and len(small) == 3
    with pytest.raises(ValueError, match="image id"):
        CocoConceptDataset(COCO_DEV, image_ids=[-1])
