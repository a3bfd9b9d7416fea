"""The web app: its handlers directly, then the real app in Chromium (Playwright, offline)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from helpers import running_webapp
from ovseg.app import webapp
from ovseg.core.types import ConceptResult, Prediction, Prior
from helpers import ARTIFACTS, ROOT

EXAMPLES = ROOT / "assets" / "examples"
SEGMENT_TIMEOUT_MS = 90_000  # the first click loads the models (about 10 s on a CPU)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The real app in a subprocess (CPU), started from a folder outside the checkout."""
    with running_webapp(tmp_path_factory.mktemp("webapp")) as url:
        yield url


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.goto(app_url)
    pg.wait_for_selector("#segment-btn")
    yield pg
    context.close()


def _upload(page, path: Path) -> None:
    page.locator("#image input[type=file]").set_input_files(str(path))
    page.wait_for_selector("#image img")  # the upload finished and the component holds a value


def _type_words(page, text: str) -> None:
    page.locator("#words textarea").fill(text)


def _status(page) -> str:
    return page.locator("#status").inner_text()


def _wait_for_result_images(page) -> None:
    """Until every result image has decoded (a screenshot taken earlier shows blank tiles)."""
    page.wait_for_function(
        "[...document.querySelectorAll('#results .thumbnail-item img')].every(i => i.complete && i.naturalWidth > 0)"
    )


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


@pytest.mark.browser
def test_segment_shows_maps_masks_and_scores(page):
    from playwright.sync_api import expect

    _upload(page, EXAMPLES / "cat.jpg")
    expect(page.locator("#status")).to_contain_text("cat.jpg")
    _type_words(page, "cat, dog")
    page.click("#segment-btn")
    images = page.locator("#results .thumbnail-item img")
    expect(images).to_have_count(4, timeout=SEGMENT_TIMEOUT_MS)
    captions = page.locator("#results .caption-label").all_inner_texts()
    assert [c.split(" · ")[:2] for c in captions] == [
        ["cat", "attention"], ["cat", "mask"], ["dog", "attention"], ["dog", "mask"]
    ], captions
    assert re.search(r"score \d\.\d\d", captions[0]) and re.search(r"\d+ ms", captions[1]), captions
    status = _status(page)
    assert "cat" in status and re.search(r"presence score\s+0\.\d\d", status), status
    assert "Egyptian cat" in status  # the method's details: the nearest ImageNet classes
    _wait_for_result_images(page)
    _screenshot(page, "app_segment.png")


def _choose_method(page, name: str) -> None:
    page.locator("#method input").click()
    page.get_by_role("option", name=name).click()


def _segment(page, words: str, images: int) -> list[str]:
    """Type the words, click Segment, wait for `images` result images; their captions."""
    from playwright.sync_api import expect

    _type_words(page, words)
    page.click("#segment-btn")
    expect(page.locator("#results .thumbnail-item img")).to_have_count(images, timeout=SEGMENT_TIMEOUT_MS)
    return page.locator("#results .caption-label").all_inner_texts()


@pytest.mark.browser
def test_saliency_method_shows_both_priors_proxy_labels_and_a_grabcut_switch(page):
    from playwright.sync_api import expect

    _upload(page, EXAMPLES / "cat.jpg")
    expect(page.locator("#grabcut")).to_be_hidden()  # cam has no GrabCut step
    _choose_method(page, "cls_saliency")
    expect(page.locator("#grabcut")).to_be_visible()
    captions = _segment(page, "cat", images=4)
    assert [c.split(" · ")[1] for c in captions] == [
        "saliency positive (√ scale)", "saliency negative (√ scale)", "probability", "mask"
    ], captions
    status = _status(page)
    assert "positive proxies" in status and "negative proxies" in status and "cat" in status, status
    _wait_for_result_images(page)
    _screenshot(page, "app_cls_saliency.png")
    # the class-discriminative option: the same word with CAM-gated priors, said so in the table
    expect(page.locator("#saliency")).to_be_visible()
    page.locator("#saliency").get_by_label("CAM-gated guided backprop").check()
    page.click("#segment-btn")
    expect(page.locator("#status")).to_contain_text("cam_gated", timeout=SEGMENT_TIMEOUT_MS)
    expect(page.locator("#results .thumbnail-item img")).to_have_count(4)
    _wait_for_result_images(page)
    _screenshot(page, "app_cls_saliency_cam_gated.png")


@pytest.mark.browser
def test_concept_mask_shows_coarse_and_refined_attention_the_mask_and_presence(page):
    from playwright.sync_api import expect

    _upload(page, EXAMPLES / "cat.jpg")
    _choose_method(page, "concept_mask")
    expect(page.locator("#saliency")).to_be_hidden()
    captions = _segment(page, "cat, zebra", images=8)
    assert [c.split(" · ")[:2] for c in captions[:4]] == [
        ["cat", "attention"], ["cat", "attention refined"], ["cat", "probability"], ["cat", "mask"]
    ], captions
    status = _status(page)
    assert "verification cosine" in status and "verified present" in status, status
    _wait_for_result_images(page)
    _screenshot(page, "app_concept_mask.png")


@pytest.mark.browser
def test_xpm_shows_each_pseudo_mask_with_its_noise_map_and_reliability(page):
    _upload(page, EXAMPLES / "cat.jpg")
    _choose_method(page, "xpm")
    page.locator("#caption textarea").fill("A cat lying on a blanket next to a remote control.")
    _type_words(page, "cat")
    page.click("#segment-btn")
    page.wait_for_function("document.querySelectorAll('#results .thumbnail-item img').length >= 4",
                           timeout=SEGMENT_TIMEOUT_MS)
    captions = page.locator("#results .caption-label").all_inner_texts()
    assert [c.split(" · ")[:2] for c in captions[:3]] == [["cat", "probability"], ["cat", "noise"], ["cat", "mask"]]
    pseudo = captions[3:]
    assert pseudo and all(c.startswith("cat · pseudo-mask ") and "reliability" in c for c in pseudo), captions
    reliabilities = [float(c.split("reliability ")[1].split(" ")[0]) for c in pseudo]
    assert reliabilities == sorted(reliabilities)  # the least reliable first
    assert all(("NOISY" in c) == (r < 0.5) for c, r in zip(pseudo, reliabilities))
    status = _status(page)
    assert "selected by" in status and "reliability" in status, status
    _wait_for_result_images(page)
    _screenshot(page, "app_xpm.png")


@pytest.mark.browser
def test_bad_upload_gives_a_readable_message(page, tmp_path):
    from playwright.sync_api import expect

    fake = tmp_path / "holiday.png"
    fake.write_text("this is a text file, not a PNG\n")
    page.locator("#image input[type=file]").set_input_files(str(fake))
    message = "holiday.png: not an image file"
    expect(page.locator("#status")).to_contain_text("Error: " + message)  # named at upload time
    expect(page.locator(".toast-body").get_by_text(message)).to_be_visible()
    expect(page.locator("#image img")).to_have_count(0)  # the bad file is cleared, no broken preview
    body = page.locator("body").inner_text()
    assert "Traceback" not in body and "/gradio/" not in body, body
    _screenshot(page, "app_bad_input.png")
    _type_words(page, "dog")
    page.click("#segment-btn")
    expect(page.locator("#status")).to_contain_text("Upload an image or pick an example first")
    expect(page.locator("#results .thumbnail-item img")).to_have_count(0)


@pytest.mark.browser
def test_missing_image_and_empty_words_are_explained(page):
    from playwright.sync_api import expect

    _type_words(page, "dog")
    page.click("#segment-btn")
    expect(page.locator("#status")).to_contain_text("Upload an image or pick an example first")
    page.locator("#examples button.gallery-item").nth(2).click()  # coffee.jpg, through gr.Examples
    page.wait_for_selector("#image img")
    _type_words(page, " , -person")
    page.click("#segment-btn")
    expect(page.locator("#status")).to_contain_text("Error: no word to look for")
    assert "Traceback" not in page.locator("body").inner_text()


# The handlers called directly (no browser): every refusal is one readable line.


@pytest.fixture(scope="module")
def segment():
    return webapp.make_handler(webapp.Engine(device="cpu"))


def test_handler_names_a_bad_file_by_its_own_name(segment, tmp_path):
    bad = tmp_path / "upload" / "holiday.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    payload = {"path": str(bad), "orig_name": "holiday.png"}
    with pytest.warns(UserWarning, match="holiday.png"):
        gallery, status = segment(payload, "dog", "", "cam", 0.4)
    assert gallery == [] and status.startswith("**Error:** holiday.png: ") and str(tmp_path) not in status
    with pytest.warns(UserWarning):
        update, status = webapp.check_upload(payload)
    assert update is None and "holiday.png" in status


@pytest.mark.parametrize(
    "image, words, method, threshold, expected",
    [
        (None, "dog", "cam", 0.4, webapp.NO_IMAGE),
        ({"path": str(EXAMPLES / "cat.jpg")}, " , -person", "cam", 0.4, "no word to look for"),
        ({"path": str(EXAMPLES / "cat.jpg")}, "dog", "cam", 1.5, "the threshold must lie in"),
        ({"path": str(EXAMPLES / "cat.jpg")}, "dog", "nope", 0.4, "unknown method 'nope'"),
    ],
)
def test_handler_refusals(segment, image, words, method, threshold, expected):
    with pytest.warns(UserWarning):
        gallery, status = segment(image, words, "", method, threshold)
    assert gallery == [] and status.startswith("**Error:** ") and expected in status


def test_handler_refuses_an_unknown_saliency_prior(segment):
    with pytest.warns(UserWarning):
        gallery, status = segment({"path": str(EXAMPLES / "cat.jpg")}, "cat", "", "cls_saliency", 0.5, True, "magic")
    assert gallery == [] and "unknown saliency prior 'magic'" in status


def test_handler_hides_unexpected_errors(monkeypatch, segment, caplog):
    def boom(*args):
        raise RuntimeError("internal detail")

    monkeypatch.setattr(webapp.Engine, "run", boom)
    with pytest.warns(UserWarning):
        _, status = segment({"path": str(EXAMPLES / "cat.jpg")}, "dog", "", "cam", 0.4)
    assert "internal detail" not in status and "server" in status
    assert "internal detail" in caplog.text  # the traceback goes to the server log


def test_gallery_and_summary_from_a_prediction():
    image = np.full((20, 30, 3), 128, np.uint8)
    attention = np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30)
    result = ConceptResult("dog", "cam", attention > 0.5, 0.83, True, [Prior(attention, "cam", "dog", "attention", 0.83)],
                           details={"top_classes": [("golden retriever", 0.5)], "known_to_wordnet": True}, ms=12.0)
    out = Prediction((20, 30), [result], negatives=("person",))
    items = webapp.gallery_items(out, image)
    assert [caption for _, caption in items] == ["dog · attention · score 0.83", "dog · mask · 12 ms"]
    assert all(a.shape == (20, 30, 3) and a.dtype == np.uint8 for a, _ in items)
    text = webapp.summary(out, image, 5.0, "cpu")
    assert "| presence score | 0.83 |" in text and "golden retriever (0.5)" in text and "person" in text


def test_command_line():
    args = webapp.parse_args([])
    assert (args.host, args.device) == ("127.0.0.1", "auto")
    with pytest.raises(SystemExit):
        webapp.parse_args(["--share"])
    from ovseg.core.methods.cam.method import DEFAULT_THRESHOLD

    assert webapp.default_threshold("cam") == pytest.approx(DEFAULT_THRESHOLD)
    assert [p.name for p in webapp.example_images()] == ["astronaut.jpg", "cat.jpg", "coffee.jpg", "grace_hopper.jpg"]
