"""Fixtures the training tests share."""

import pytest

from helpers import training_env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of a module's training subprocesses (`helpers.training_env`: a fresh feature cache, one
    BLAS thread, not under torchrun); skips without coco_dev's captions. A module needing another file of
    coco_dev overrides it."""
    return training_env(tmp_path_factory.mktemp("cache"))
