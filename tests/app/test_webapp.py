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


# The app's pixel limit in these tests: above every bundled example (the largest, grace_hopper.jpg, is 0.3 MP),
# below an image a test makes, so that the refusal of a too large upload is seen without a huge file.
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The real app in a subprocess (CPU), started from a folder outside the checkout."""
    with running_webapp(tmp_path_factory.mktemp("webapp"), env={"OVSEG_MAX_PIXELS": str(MAX_PIXELS)}) as url:
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
    """The first screen runs `fused`: per word its evidence maps, the mask, one pseudo-mask per object, and a
    status table that says which evidence decided it."""
    from playwright.sync_api import expect

    expect(page.locator("#method input")).to_have_value("fused")
    _upload(page, EXAMPLES / "cat.jpg")
    expect(page.locator("#status")).to_contain_text("cat.jpg")
    _type_words(page, "cat, dog")
    page.click("#segment-btn")
    images = page.locator("#results .thumbnail-item img")
    expect(images.nth(12)).to_be_visible(timeout=SEGMENT_TIMEOUT_MS)  # 6 per word, and the cat's instance(s)
    captions = page.locator("#results .caption-label").all_inner_texts()
    maps = ["evidence: CAM", "evidence: CAM on object proposals", "evidence: XPM regions",
            "evidence: Concept Mask attention", "fused probability, relative to its peak", "mask"]
    cat = [c.split(" · ")[1] for c in captions if c.startswith("cat · ")]
    dog = [c.split(" · ")[1] for c in captions if c.startswith("dog · ")]
    assert cat[:6] == maps and all(c.startswith("pseudo-mask") for c in cat[6:]) and len(cat) > 6, captions
    assert dog == maps, captions  # judged absent: its maps and mask, no pseudo-mask to review
    assert re.search(r"score \d\.\d\d", captions[0]) and re.search(r"\d+ ms", captions[5]), captions
    status = _status(page)
    assert re.search(r"presence score\s+0\.\d\d", status), status
    assert re.search(r"present\s+yes", status) and re.search(r"present\s+no", status), status
    assert "decided by" in status and "cam" in status  # the evidence that decided the mask
    assert "Egyptian cat" in status  # the CAM's nearest ImageNet classes
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

    _upload(page, EXAMPLES / "astronaut.jpg")
    expect(page.locator("#grabcut")).to_be_hidden()  # the default, fused, has no GrabCut step
    _choose_method(page, "cls_saliency")
    expect(page.locator("#grabcut")).to_be_visible()
    expect(page.locator("#saliency")).to_be_visible()
    captions = _segment(page, "rocket", images=3)
    # S+ and S- side by side, with how much they differ; the default priors are the labels' CAMs
    assert [c.split(" · ")[1] for c in captions] == ["S+ | S- (cam)", "probability", "mask"], captions
    correlation = float(captions[0].split("correlation ")[1])
    assert -1.0 <= correlation < 0.5, captions  # the rocket's labels and the distractors light up apart
    status = _status(page)
    assert "positive proxies" in status and "negative proxies" in status and "rocket" in status, status
    assert "saliency correlation" in status, status
    _wait_for_result_images(page)
    _screenshot(page, "app_cls_saliency.png")
    # the paper's guided backprop: the same picture twice, which its correlation says
    page.locator("#saliency").get_by_label("guided backprop (the paper's)").check()
    page.click("#segment-btn")
    expect(page.locator("#status")).to_contain_text("guided_backprop", timeout=SEGMENT_TIMEOUT_MS)
    expect(page.locator("#results .thumbnail-item img")).to_have_count(3)
    guided = page.locator("#results .caption-label").all_inner_texts()
    assert guided[0].split(" · ")[1] == "S+ | S- (guided_backprop, √ scale)", guided
    assert float(guided[0].split("correlation ")[1]) > correlation, (guided, captions)
    _wait_for_result_images(page)
    _screenshot(page, "app_cls_saliency_guided.png")


@pytest.mark.browser
def test_concept_mask_shows_coarse_and_refined_attention_the_mask_and_presence(page):
    from playwright.sync_api import expect

    _upload(page, EXAMPLES / "cat.jpg")
    _choose_method(page, "concept_mask")
    expect(page.locator("#saliency")).to_be_hidden()
    captions = _segment(page, "cat, dog, pizza", images=12)
    assert [c.split(" · ")[:2] for c in captions[:4]] == [
        ["cat", "attention"], ["cat", "attention refined"], ["cat", "probability"], ["cat", "mask"]
    ], captions
    # the verification score against its threshold, and what the gate did, on each mask
    by_word = {c.split(" · ")[0]: c for c in captions if c.split(" · ")[1] == "mask"}
    assert "verification" in by_word["cat"] and "→ present; kept: verified present" in by_word["cat"], by_word
    assert "(shared) → absent; kept" in by_word["dog"] and "not calibrated" in by_word["dog"], by_word
    assert "(its own) → absent; emptied" in by_word["pizza"], by_word
    assert [c.split(" · ")[1] for c in captions if c.startswith("pizza")][:2] == [
        "attention (judged absent)", "attention refined (judged absent)"], captions
    status = _status(page)
    assert "verification cosine" in status and "presence threshold" in status and "gate" in status, status
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
    # the noise map comes with its colour scale: a strip below the image
    _wait_for_result_images(page)
    sizes = page.evaluate("Array.from(document.querySelectorAll('#results .thumbnail-item img'))"
                          ".map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes[1][0] == sizes[0][0] and sizes[1][1] > sizes[0][1], sizes
    pseudo = captions[3:]
    assert pseudo and all(c.startswith("cat · pseudo-mask ") and "reliability" in c for c in pseudo), captions
    reliabilities = [float(c.split("reliability ")[1].split(" ")[0]) for c in pseudo]
    assert reliabilities == sorted(reliabilities)  # the least reliable first
    assert all(("NOISY" in c) == (r < 0.5) for c, r in zip(pseudo, reliabilities))
    status = _status(page)
    assert "selected by" in status and "reliability" in status and "agreement of student and teacher" in status
    _wait_for_result_images(page)
    _screenshot(page, "app_xpm.png")


@pytest.mark.browser
def test_cap2seg_reads_the_caption_box_and_draws_where_the_caption_puts_the_word(page):
    from playwright.sync_api import expect

    _upload(page, EXAMPLES / "cat.jpg")
    _choose_method(page, "cap2seg")
    captions = _segment(page, "cat", images=3)  # no caption: class probability, local prior, mask; said so
    local = "local prior (sec. 3.4, from predicted seen classes)"
    assert [c.split(" · ")[1] for c in captions] == ["class probability (eq. 12)", local, "mask"], captions
    expect(page.locator("#status")).to_contain_text("no caption")
    page.locator("#caption textarea").fill("A cat lying on a blanket next to a remote control.")
    page.click("#segment-btn")
    expect(page.locator("#status")).to_contain_text("caption occurrence", timeout=SEGMENT_TIMEOUT_MS)
    expect(page.locator("#results .thumbnail-item img")).to_have_count(5)
    captions = page.locator("#results .caption-label").all_inner_texts()
    assert [c.split(" · ")[1] for c in captions] == ["caption prior: stripes V_hat", "fused prior V* = (Y_hat + V_hat)/2",
                                                      "class probability (eq. 12)", local, "mask"], captions
    status = _status(page)
    assert "stripes" in status and "competing classes" in status and "fused stripes" in status, status
    _wait_for_result_images(page)
    sizes = page.evaluate("Array.from(document.querySelectorAll('#results .thumbnail-item img'))"
                          ".map(i => [i.naturalWidth, i.naturalHeight])")
    for k in (0, 1):  # the stripe bars beside the image, for V_hat and for V*
        assert sizes[k][0] > sizes[2][0] and sizes[k][1] == sizes[2][1], sizes
    _screenshot(page, "app_cap2seg.png")


@pytest.mark.browser
def test_ovsegmentor_shows_the_groups_with_their_best_words_and_each_word_s_mask(page):
    _upload(page, EXAMPLES / "grace_hopper.jpg")
    _choose_method(page, "ovsegmentor")
    captions = _segment(page, "person, flag", images=5)  # the groups once, then per word its score map and mask
    assert captions[0].startswith("groups · ") and "best words" in captions[0], captions
    assert [c.split(" · ")[:2] for c in captions[1:]] == [
        ["person", "group-word score (eq. 1), relative to its range"], ["person", "mask"],
        ["flag", "group-word score (eq. 1), relative to its range"], ["flag", "mask"]], captions
    status = _status(page)
    assert "group legend" in status and "background threshold" in status, status
    assert "group assignment" not in status  # drawn, not listed
    _wait_for_result_images(page)
    sizes = page.evaluate("Array.from(document.querySelectorAll('#results .thumbnail-item img'))"
                          ".map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes[0][0] > sizes[1][0] and sizes[0][1] == sizes[1][1], sizes  # the legend panel beside the groups
    _screenshot(page, "app_ovsegmentor.png")


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
def test_upload_above_the_pixel_limit_is_refused_in_the_page(page, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    big = tmp_path / "big.png"
    Image.new("RGB", (1200, 1000), (90, 140, 200)).save(big)  # 1.2 MP, above the app's limit of 1 MP
    page.locator("#image input[type=file]").set_input_files(str(big))
    message = "big.png: image is 1200x1000 (1.2 MP), above the limit of 1 MP"
    expect(page.locator("#status")).to_contain_text("Error: " + message)
    expect(page.locator("#status")).to_contain_text("OVSEG_MAX_PIXELS")
    expect(page.locator(".toast-body").get_by_text(message)).to_be_visible()
    expect(page.locator("#image img")).to_have_count(0)  # cleared: nothing to segment by mistake
    assert "Traceback" not in page.locator("body").inner_text()


@pytest.mark.browser
def test_two_sessions_segmenting_at_once_each_get_their_own_answer(browser, app_url):
    """Two browser sessions, each with its own image and words, press Segment together: the engine holds one
    image at a time, and each answer must be of its own session's image and words."""
    from playwright.sync_api import expect

    # per image: its size in the status line, and the words of each round (the second in the other order, so
    # that each round's answer differs from the one before)
    sessions = {"cat.jpg": ("451×300", [["cat", "dog"], ["dog", "cat"]]),
                "grace_hopper.jpg": ("512×600", [["person", "tie"], ["tie", "person"]])}
    contexts, pages = [], {}
    try:
        for name in sessions:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            contexts.append(context)
            pg = context.new_page()
            pg.set_default_timeout(30_000)
            pg.goto(app_url)
            pg.wait_for_selector("#segment-btn")
            _upload(pg, EXAMPLES / name)
            _choose_method(pg, "cam")  # two results per word: its attention map and its mask
            pages[name] = pg
        for round_ in range(2):  # the second round finds the other session's image set in the engine
            for name, pg in pages.items():
                _type_words(pg, ", ".join(sessions[name][1][round_]))
            for pg in pages.values():
                pg.click("#segment-btn")  # both requests are in flight together
            for name, pg in pages.items():
                size, rounds = sessions[name]
                words = rounds[round_]
                expected = [w for w in words for _ in ("attention", "mask")]
                results = pg.locator("#results .caption-label")
                pg.wait_for_function(
                    "want => [...document.querySelectorAll('#results .caption-label')].map(e => e.innerText"
                    ".split(' · ')[0]).join(',') === want", arg=",".join(expected), timeout=SEGMENT_TIMEOUT_MS)
                assert [c.split(" · ")[0] for c in results.all_inner_texts()] == expected, name
                expect(pg.locator("#status")).to_contain_text(f"image {size}")
                status = _status(pg)
                assert status.index(words[0]) < status.index(words[1]), (name, status)  # this round's answer
    finally:
        for context in contexts:
            context.close()


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


def test_handler_caps_the_words_per_request(monkeypatch, segment):
    """More words than the app takes in one request are refused at once, with the limit and what to do; as
    many as the limit go to the engine."""
    from ovseg.core.errors import OvsegError

    calls = []

    def engine_run(self, path, words, *args):
        calls.append(words)
        raise OvsegError("the engine ran")

    monkeypatch.setattr(webapp.Engine, "run", engine_run)
    nouns = ["cat", "dog", "car", "cup", "tree", "sky", "bed", "box", "pen", "hat", "bus", "cow", "sun", "bag",
             "key", "map", "egg", "jar", "owl", "fox", "ant", "bee"]
    image = {"path": str(EXAMPLES / "cat.jpg")}
    limit = webapp.MAX_WORDS
    with pytest.warns(UserWarning):
        gallery, status = segment(image, ", ".join(nouns[: limit + 1]), "", "cam", 0.4)
    assert gallery == [] and calls == []
    assert f"{limit + 1} words" in status and f"at most {limit}" in status and "ovseg segment" in status, status
    with pytest.warns(UserWarning):  # negatives count too: each one is excluded from every word's mask
        _, status = segment(image, ", ".join(nouns[:limit] + ["-person"]), "", "cam", 0.4)
    assert f"at most {limit}" in status and calls == []
    with pytest.warns(UserWarning):
        _, status = segment(image, ", ".join(nouns[:limit]), "", "cam", 0.4)
    assert "the engine ran" in status and len(calls) == 1


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
    assert webapp.launch_options(args) == {"server_name": "127.0.0.1", "auth": None}
    with pytest.raises(SystemExit):
        webapp.parse_args(["--share"])
    from ovseg.core.methods.cam.method import DEFAULT_THRESHOLD

    assert webapp.default_threshold("cam") == pytest.approx(DEFAULT_THRESHOLD)
    assert [p.name for p in webapp.example_images()] == ["astronaut.jpg", "cat.jpg", "coffee.jpg", "grace_hopper.jpg"]


@pytest.mark.parametrize("argv, auth", [
    (["--host", "localhost"], None),
    (["--host", "127.0.0.2"], None),
    (["--host", "::1"], None),
    (["--host", "0.0.0.0", "--auth", "ada:s3cret:too"], ("ada", "s3cret:too")),  # the password may hold ':'
    (["--host", "192.168.1.20", "--auth", "ada:pw"], ("ada", "pw")),
    (["--host", "0.0.0.0", "--insecure"], None),
    (["--auth", "ada:pw"], ("ada", "pw")),  # a password on the loopback address too, if asked for
])
def test_serving_rules_accepted(argv, auth):
    options = webapp.launch_options(webapp.parse_args(argv))
    assert options["auth"] == auth and options["server_name"] == webapp.parse_args(argv).host


@pytest.mark.parametrize("argv, phrase", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 serves other machines: add --auth USER:PASSWORD"),
    (["--host", "192.168.1.20"], "or --insecure"),
    (["--host", "myhost.lan"], "--auth USER:PASSWORD"),
    (["--host", "0.0.0.0", "--auth", "ada"], "--auth reads USER:PASSWORD"),
    (["--auth", ":pw"], "--auth reads USER:PASSWORD"),
    (["--auth", "ada:"], "--auth reads USER:PASSWORD"),
])
def test_serving_rules_refused(argv, phrase):
    from ovseg.core.errors import OvsegError

    with pytest.raises(OvsegError, match=re.escape(phrase)):
        webapp.launch_options(webapp.parse_args(argv))


def test_a_lan_address_without_a_password_is_refused_before_anything_loads(monkeypatch, capsys):
    def trap(*args, **kwargs):
        raise AssertionError("the app was built although its serving options are refused")

    monkeypatch.setattr(webapp, "build_app", trap)
    assert webapp.main(["--host", "0.0.0.0", "--device", "cpu"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ovseg-app: error: --host 0.0.0.0") and "--auth" in lines[0]


def test_engine_sets_the_image_each_request_names(predictor, tmp_path):
    """The engine keeps the last image's features: a request for the same file reuses them; another file, or
    another image saved under the same path, is set again (never the previous image's answer)."""
    import shutil

    engine = webapp.Engine(predictor)
    path = tmp_path / "photo.jpg"
    shutil.copyfile(EXAMPLES / "cat.jpg", path)
    _, rgb, set_ms, _ = engine.run(str(path), "cat", "", "cam", 0.3)
    assert rgb.shape[:2] == (300, 451) and set_ms is not None
    _, rgb, set_ms, _ = engine.run(str(path), "dog", "", "cam", 0.3)
    assert rgb.shape[:2] == (300, 451) and set_ms is None  # the same file: its features are reused
    shutil.copyfile(EXAMPLES / "grace_hopper.jpg", path)  # another image under the same name
    out, rgb, set_ms, _ = engine.run(str(path), "person", "", "cam", 0.3)
    assert rgb.shape[:2] == (600, 512) and set_ms is not None and out.image_size == (600, 512)


def test_engine_serves_threads_at_once_each_its_own_image(predictor):
    """Handlers run in threads: requests for two images at once each get the answer of their own image."""
    from concurrent.futures import ThreadPoolExecutor

    engine = webapp.Engine(predictor)
    jobs = [("cat.jpg", "cat", (300, 451)), ("grace_hopper.jpg", "person", (600, 512))] * 3

    def run(job):
        name, word, size = job
        out, rgb, _, _ = engine.run(str(EXAMPLES / name), word, "", "cam", 0.3)
        return out.image_size, rgb.shape[:2], [r.concept for r in out.results], size, word

    with ThreadPoolExecutor(max_workers=2) as pool:
        for image_size, rgb_size, words, size, word in pool.map(run, jobs):
            assert image_size == rgb_size == size and words == [word]
