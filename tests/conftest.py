"""Shared fixtures: one loaded Predictor per test session (models load once, ~5 s on a CPU)."""

import os
import tempfile
from pathlib import Path

import pytest

# The user's data folder (FiftyOne datasets, retrained checkpoints) is never touched by the tests: every
# test, and every process a test starts, sees a fresh one (which retrained checkpoint is "current" would
# otherwise change what the engine loads). FiftyOne's database lives inside it too.
_DATA = tempfile.mkdtemp(prefix="ovseg-test-data-")
os.environ["OVSEG_DATA_DIR"] = _DATA
os.environ.pop("OVSEG_FIFTYONE_DIR", None)
os.environ.pop("FIFTYONE_DATABASE_DIR", None)

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    """assets/examples: cat.jpg, coffee.jpg, astronaut.jpg, grace_hopper.jpg."""
    return EXAMPLES


@pytest.fixture(scope="session")
def predictor():
    """One CPU Predictor for the whole session, its models loaded. Tests call set_image themselves; tests
    that need a clean state or other method options build `Predictor(models=predictor.models, ...)`."""
    from ovseg.core.predictor import Predictor

    p = Predictor(device="cpu")
    # Load the models up front so that a test's timing is its own work, not the first load.
    p.models.backbone, p.models.text_encoder, p.models.class_name_embeddings
    p.models.lexicon.imagenet_match("dog")
    return p


@pytest.fixture
def decoded_categories(monkeypatch) -> list:
    """The category names of every annotation pycocotools decodes into a mask during the test, in order
    (to assert that training never reads a target-class mask)."""
    from pycocotools.coco import COCO

    decoded = []
    real = COCO.annToMask

    def spy(self, ann):
        decoded.append(self.cats[ann["category_id"]]["name"])
        return real(self, ann)

    monkeypatch.setattr(COCO, "annToMask", spy)
    return decoded


@pytest.fixture(scope="session")
def browser():
    """Chromium (helpers.CHROMIUM) through Playwright. Either missing: a failure in CI (CI set to 1, true,
    yes, ...), a skip with the reason elsewhere (helpers.missing)."""
    from helpers import CHROMIUM, CHROMIUM_ARGS, missing

    if not Path(CHROMIUM).exists():
        missing(f"Chromium ({CHROMIUM})", "apt-get install chromium")
    try:
        from playwright import sync_api
    except ImportError:
        missing("Playwright", "make install (the dev extra)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
