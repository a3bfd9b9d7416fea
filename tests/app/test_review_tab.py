"""Review and correction of a labelled dataset: `ovseg.app.curate.corrections` on a real FiftyOne database, the
Review tab's handlers directly, then the real app's Review tab in Chromium (Playwright, offline)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import running_webapp
from ovseg.core.errors import OvsegError
from helpers import ARTIFACTS, ROOT

EXAMPLES = ROOT / "assets" / "examples"
DATASET = "review-tab-test"
@pytest.fixture
def dataset(tmp_path_factory) -> str:
    """A dataset labelled by `ovseg label` (xpm and cam) from cat.jpg and coffee.jpg with "cat, cup", made
    afresh for each test: the tests change it, and none may depend on another's changes or order."""
    from ovseg.app.curate.fo import fiftyone
    from ovseg.app.curate.label import label

    folder = tmp_path_factory.mktemp("review-images")
    for name in ("cat.jpg", "coffee.jpg"):
        shutil.copy(EXAMPLES / name, folder / name)
    fo = fiftyone()
    if fo.dataset_exists(DATASET):
        fo.delete_dataset(DATASET)
    label(folder, DATASET, words="cat, cup", methods="xpm,cam", progress=False)
    yield DATASET
    if fo.dataset_exists(DATASET):
        fo.delete_dataset(DATASET)


def _stored(name: str, sample_id: str):
    from ovseg.app.curate.fo import load_dataset

    return load_dataset(name)[sample_id]


# ----------------------------------------------------------------------------------------- corrections


def test_samples_come_least_reliable_first_and_load_gives_full_size_masks(dataset):
    from ovseg.app.curate import corrections
    from ovseg.app.curate.fo import load_dataset

    assert dataset in corrections.list_datasets()
    items = corrections.samples(dataset)
    ds = load_dataset(dataset)
    assert len(items) == len(ds) == 4
    reliabilities = [float(text.rsplit("reliability ", 1)[1]) for _, text in items]
    assert reliabilities == sorted(reliabilities)
    assert all(" · " in text and text.split(" · ")[0] in ("cat.jpg", "coffee.jpg") for _, text in items)
    assert [sid for sid, _ in corrections.samples(dataset, view=None)] == ds.values("id")
    assert {sid for sid, _ in corrections.samples(dataset, view="no-such-view")} == set(ds.values("id"))

    data = corrections.load(dataset, items[0][0])
    h, w = data["image"].shape[:2]
    assert data["image"].dtype == np.uint8 and data["image"].shape[2] == 3
    assert data["word"] in ("cat", "cup") and data["masks"]
    methods = {m["method"] for m in data["masks"]}
    assert methods <= {"xpm", "cam"} and "xpm" in methods
    for i, m in enumerate(data["masks"]):
        assert m["index"] == i and m["mask"].shape == (h, w) and m["mask"].dtype == bool and m["mask"].any()
        assert m["tags"] == [] and m["label"] == data["word"]
    assert any(m["reliability"] is not None for m in data["masks"] if m["method"] == "xpm")


def test_verdicts_replace_each_other_and_are_saved(dataset):
    from ovseg.app.curate import corrections

    sid = corrections.samples(dataset)[1][0]
    assert corrections.set_verdict(dataset, sid, 0, "rejected") == ["rejected"]
    assert corrections.set_verdict(dataset, sid, 0, "approved") == ["approved"]
    stored = _stored(dataset, sid).pseudo_masks.detections
    assert stored[0].tags == ["approved"] and all(not d.tags for d in stored[1:])
    with pytest.raises(OvsegError, match="verdict"):
        corrections.set_verdict(dataset, sid, 0, "maybe")
    with pytest.raises(OvsegError, match="no number 100"):
        corrections.set_verdict(dataset, sid, 99, "approved")
    with pytest.raises(OvsegError, match="no sample"):
        corrections.set_verdict(dataset, "0123456789abcdef01234567", 0, "approved")
    with pytest.raises(OvsegError, match="no FiftyOne dataset 'missing'"):
        corrections.samples("missing")


def test_a_correction_round_trips_with_its_new_word_and_tags(dataset):
    from ovseg.app.curate import corrections
    from ovseg.app.curate.schema import mask_from_detection

    # a sample with two pseudo-masks or more: one is corrected, another must stay untouched by a refusal
    sid = [s for s, _ in corrections.samples(dataset) if len(corrections.load(dataset, s)["masks"]) >= 2][-1]
    data = corrections.load(dataset, sid)
    h, w = data["image"].shape[:2]
    before = len(data["masks"])
    corrections.set_verdict(dataset, sid, 0, "rejected")
    painted = np.zeros((h, w), bool)
    painted[h // 4:h // 2, w // 3:w // 2] = True
    painted[h - 3, 2] = True  # a stray pixel far away: the box must grow to hold it
    assert corrections.save_correction(dataset, sid, 0, painted, "  tabby   cat ") == 0
    det = _stored(dataset, sid).pseudo_masks.detections[0]
    assert np.array_equal(mask_from_detection(det, (h, w)), painted)
    assert det.label == "tabby cat" and det["method"] == data["masks"][0]["method"]
    assert sorted(det.tags) == ["approved", "corrected"]  # `rejected` is gone

    # a new pseudo-mask, under the sample's word
    added = corrections.save_correction(dataset, sid, None, painted[::-1].copy(), None)
    dets = _stored(dataset, sid).pseudo_masks.detections
    assert added == before and len(dets) == before + 1
    assert dets[added]["method"] == "manual" and dets[added].label == data["word"]
    assert sorted(dets[added].tags) == ["approved", "corrected"]
    assert np.array_equal(mask_from_detection(dets[added], (h, w)), painted[::-1])
    assert corrections.load(dataset, sid)["masks"][added]["method"] == "manual"

    with pytest.raises(OvsegError, match="the mask is empty"):
        corrections.save_correction(dataset, sid, 1, np.zeros((h, w), bool), "cat")
    with pytest.raises(OvsegError, match="the image is"):
        corrections.save_correction(dataset, sid, 1, np.ones((h + 1, w), bool), "cat")
    assert not _stored(dataset, sid).pseudo_masks.detections[1].tags  # nothing written by a refusal


def test_grabcut_from_strokes_follows_the_object_and_the_strokes():
    from ovseg.core.image_io import load_image
    from ovseg.app.curate.corrections import grabcut_from_strokes

    # a bright square on a dark noisy background; the start mask is a rough, too-large box
    rng = np.random.default_rng(0)
    image = rng.integers(0, 40, (120, 160, 3)).astype(np.uint8)
    image[30:80, 50:110] = rng.integers(200, 255, (50, 60, 3))
    truth = np.zeros((120, 160), bool)
    truth[30:80, 50:110] = True
    rough = np.zeros_like(truth)
    rough[22:90, 40:120] = True
    refined = grabcut_from_strokes(image, rough)
    assert (refined & truth).sum() / (refined | truth).sum() > 0.95
    assert np.array_equal(refined, grabcut_from_strokes(image, rough))  # deterministic
    # strokes win: a background stroke inside the object is cut out, a foreground one kept
    bg = np.zeros_like(truth)
    bg[30:80, 50:60] = True
    fg = np.zeros_like(truth)
    fg[5:8, 5:8] = True
    stroked = grabcut_from_strokes(image, rough, fg, bg)
    assert not stroked[bg].any() and stroked[fg].all()
    with pytest.raises(OvsegError, match="nothing to refine"):
        grabcut_from_strokes(image, np.zeros_like(truth))
    with pytest.raises(OvsegError, match="the image is 120x160"):
        grabcut_from_strokes(image, np.ones((10, 10), bool))
    photo = load_image(EXAMPLES / "cat.jpg")  # a real photo, larger than GrabCut's working size
    box = np.zeros(photo.shape[:2], bool)
    box[20:-20, 20:-20] = True
    out = grabcut_from_strokes(photo, box)
    assert out.shape == box.shape and 0 < out.sum() <= box.sum()


# ----------------------------------------------------------------------------------------- handlers


def test_review_handlers_save_a_painted_correction(dataset):
    from ovseg.app import webapp
    from ovseg.app.curate import corrections
    from ovseg.app.curate.schema import mask_from_detection

    review = webapp.Review(webapp.Engine(device="cpu"))
    sid = corrections.samples(dataset)[3][0]
    data, chooser, word, overlay, editor, status = review.pick_sample(dataset, sid)
    from PIL import Image

    assert word == data["word"] and "pseudo-mask" in status
    assert np.asarray(Image.open(overlay)).shape == data["image"].shape  # a PNG file for gradio
    assert chooser.value == 0 and chooser.choices[-1][1] == webapp.NEW_MASK
    h, w = data["image"].shape[:2]
    assert np.array_equal(webapp.painted(editor, (h, w))[0], data["masks"][0]["mask"])

    # the person paints a box in the mask colour and a background stroke across it
    mask = np.zeros((h, w), bool)
    mask[10:60, 10:80] = True
    stroke = np.zeros((h, w), bool)
    stroke[30:35, 10:80] = True
    layer = webapp.mask_layer(mask)
    layer[stroke] = webapp.mask_layer(stroke, webapp.BACKGROUND_COLOUR)[stroke]
    value = {"background": data["image"], "layers": [layer], "composite": None}
    out = review.save(data, 0, value, "mug")
    assert out[-1].startswith("**Saved** correction of pseudo-mask 1"), out[-1]
    det = _stored(dataset, sid).pseudo_masks.detections[0]
    assert np.array_equal(mask_from_detection(det, (h, w)), mask & ~stroke)
    assert det.label == "mug" and "corrected" in det.tags and "approved" in det.tags
    assert "corrected" in out[1].choices[0][0]  # the chooser shows the new tags

    with pytest.warns(UserWarning):
        out = review.save(data, 1, {"layers": []}, "mug")
    assert out[-1].startswith("**Error:** the mask is empty")
    with pytest.warns(UserWarning):
        out = review.verdict(data, webapp.NEW_MASK, "approved")
    assert "pick one of the sample's pseudo-masks" in out[-1]
    with pytest.warns(UserWarning):
        dropdown, status = review.pick_dataset("missing")
    assert "no FiftyOne dataset 'missing'" in status and "Traceback" not in status


def test_retrain_handler_reloads_the_engines_methods_and_shows_the_figures(monkeypatch):
    from ovseg.app import webapp
    from ovseg.app.curate import retrain as retrain_module

    class FakePredictor:
        _methods = {"xpm": object()}

        def reload_methods(self):
            self._methods.clear()

    seen = {}

    def fake_retrain(cfg, progress=True, **_):
        seen["cfg"] = cfg
        return {"version": "v3", "from": "v2", "curated": {"labels": 5, "images": 2, "new_words": ["mug"]},
                "evaluation": {"images": 4, "before": {"target_miou": 0.2, "base_miou": 0.5},
                               "after": {"target_miou": 0.25, "base_miou": float("nan")}},
                "segmenter": {"version": "v1", "from": "packaged", "pairs": {"curated": 3, "base_replayed": 7},
                              "evaluation": {"images": 2, "before": {"target_miou": 0.1, "base_miou": 0.3},
                                             "after": {"target_miou": 0.15, "base_miou": 0.35}}}}

    monkeypatch.setattr(retrain_module, "retrain", fake_retrain)
    engine = webapp.Engine(FakePredictor(), device="cpu")
    status = webapp.Review(engine, {"epochs": 1}).retrain("some-dataset")
    assert seen["cfg"].dataset == "some-dataset" and seen["cfg"].epochs == 1
    assert engine._predictor._methods == {}
    assert "v3" in status and "| xpm, held-out (4 images): target | 0.200 | 0.250 |" in status
    assert "| xpm, held-out (4 images): base | 0.500 | – |" in status
    assert "segmenter (cls_saliency) · new checkpoint **v1** (from packaged) · 3 curated and 7 base" in status
    assert "| segmenter, held-out (2 images): target | 0.100 | 0.150 |" in status

    def failing(cfg, progress=True, **_):
        raise OvsegError("no pseudo-mask of 'x' is tagged approved: nothing to retrain from")

    monkeypatch.setattr(retrain_module, "retrain", failing)
    with pytest.warns(UserWarning):
        status = webapp.Review(engine).retrain("x")
    assert status.startswith("**Error:** no pseudo-mask")


# ----------------------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def review_app(tmp_path_factory):
    """The real app in a subprocess (CPU) on the same data folder, hence the same FiftyOne database."""
    with running_webapp(tmp_path_factory.mktemp("review-app")) as url:
        yield url


def _choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option).click()


@pytest.mark.browser
@pytest.mark.slow
def test_review_tab_approves_a_pseudo_mask_into_the_database(dataset, review_app, browser):
    from playwright.sync_api import expect

    from ovseg.app.curate import corrections

    # a sample whose first pseudo-mask no other test has corrected (the dataset is shared by the module)
    sid, text = next((s, x) for s, x in corrections.samples(dataset)
                     if "corrected" not in (_stored(dataset, s).pseudo_masks.detections[0].tags or []))
    corrections.set_verdict(dataset, sid, 0, "rejected")  # the click must replace this verdict
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        page.goto(review_app)
        page.get_by_role("tab", name="Review").click()
        expect(page.locator("#review-dataset input")).not_to_have_value("", timeout=60_000)
        _choose(page, "review-dataset", dataset)
        _choose(page, "review-sample", text)
        expect(page.locator("#review-status")).to_contain_text(text.split(" · reliability")[0])
        expect(page.locator("#review-mask input")).to_have_value(
            _mask_text(corrections.load(dataset, sid)["masks"][0]))
        page.click("#review-approve")
        expect(page.locator("#review-status")).to_contain_text("Approved pseudo-mask 1")
        tags = _stored(dataset, sid).pseudo_masks.detections[0].tags
        assert tags == ["approved"], tags
        expect(page.locator("#review-mask input")).to_have_value(re.compile(r"· approved$"))
        page.wait_for_function(
            "[...document.querySelectorAll('#review-overlay img, #review-editor canvas')].length > 0")
        page.wait_for_function(
            "[...document.querySelectorAll('#review-overlay img')].every(i => i.complete && i.naturalWidth > 0)")
        page.wait_for_timeout(1000)  # the editor draws its layers after the image
        body = page.locator("body").inner_text()
        assert "Traceback" not in body and "Error" not in page.locator("#review-status").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app_review.png"), full_page=True)
        # the retrain button runs the retrain (with its stage display); this folder dataset has no COCO base
        # data, which the status says
        page.click("#review-retrain")
        expect(page.locator("#review-status")).to_contain_text("was not labelled from a COCO folder",
                                                               timeout=60_000)
    finally:
        context.close()


def _mask_text(m: dict) -> str:
    from ovseg.app.webapp.review_tab import _mask_choice

    return _mask_choice(m)[0]

