"""The FiftyOne App on a dataset `ovseg label` wrote, in a real Chromium (offline, tracking off): the grid
shows the pseudo-masks and the heatmaps (turning each off in the sidebar changes the rendered pixels), a
sample opens with them, and closing the session leaves no App server behind."""

from __future__ import annotations

import io
import os
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import free_port, serving
from helpers import ARTIFACTS, ROOT

EXAMPLES = ROOT / "assets" / "examples"
pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from ovseg.app.curate.fo import fiftyone, launch_app
    from ovseg.app.curate.label import label

    folder = tmp_path_factory.mktemp("app-images")
    for name in ("cat.jpg", "coffee.jpg"):
        (folder / name).write_bytes((EXAMPLES / name).read_bytes())
    label(folder, "app-test", words="cat, cup", methods="xpm,cam", progress=False)
    fo = fiftyone()
    port = free_port()
    session = launch_app(fo.load_dataset("app-test"), port=port)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not serving(url) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert serving(url), f"the FiftyOne App did not answer on {url}"
    yield session, url
    session.close()
    deadline = time.monotonic() + 30
    while serving(url) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not serving(url), "the App server outlived its session"


def _grid_pixels(page) -> np.ndarray:
    box = page.locator("text=4 samples").first  # the grid's header; the tiles sit below it
    assert box.is_visible()
    shot = page.screenshot(clip={"x": 310, "y": 140, "width": 1080, "height": 300})
    return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(np.int16)


def _toggle(page, field: str) -> None:
    """Click the sidebar checkbox that shows or hides a label field."""
    page.locator(f"[data-cy='checkbox-{field}']").first.click()
    page.wait_for_timeout(2500)


def test_app_renders_pseudo_masks_and_heatmaps(app, browser):
    session, url = app
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{url}/datasets/app-test", timeout=60_000)
    page.get_by_text("4 samples").wait_for(timeout=60_000)
    page.wait_for_timeout(6000)  # tiles and their overlays render
    dismiss = page.get_by_text("Dismiss")
    if dismiss.count():
        dismiss.first.click()
        page.wait_for_timeout(500)
    body = page.inner_text("body")
    for field in ("pseudo_masks", "attention_cam", "probability_xpm", "noise_xpm", "reliability", "word"):
        assert field in body, field
    assert "segment.io" not in page.content()  # tracking off
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "fiftyone_grid.png"))
    both = _grid_pixels(page)
    _toggle(page, "pseudo_masks")
    heat_only = _grid_pixels(page)
    _toggle(page, "attention_cam")
    plain = _grid_pixels(page)
    # each overlay changes what is drawn on the tiles
    assert np.abs(both - heat_only).sum(axis=2).astype(bool).mean() > 0.05
    assert np.abs(heat_only - plain).sum(axis=2).astype(bool).mean() > 0.05
    _toggle(page, "pseudo_masks")
    _toggle(page, "attention_cam")
    page.locator("[data-cy='looker'], canvas").first.click()  # open the first sample
    page.wait_for_timeout(4000)
    page.screenshot(path=str(ARTIFACTS / "fiftyone_sample.png"))
    assert "cat" in page.inner_text("body")
    page.close()


def test_review_command_serves_the_app_and_stops_it_on_sigterm(app):
    """`ovseg review NAME` serves the App; SIGTERM closes the session, so the App server goes with it."""
    import signal
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ovseg.app.cli", "review", "app-test", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []  # its output, read as it comes (the App's server can answer before the URL is printed)
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not (serving(url) and any(f"{url}/datasets/app-test" in line for line in lines)) \
                and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert serving(url), f"ovseg review did not serve {url}"
        with urllib.request.urlopen(f"{url}/datasets/app-test", timeout=5) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # SIGTERM ignored: kill it, so that no App server is orphaned
            proc.kill()
            proc.wait(timeout=30)
        reader.join(timeout=10)
    out = "".join(lines)
    assert f"{url}/datasets/app-test" in out and "least-reliable" in out
    deadline = time.monotonic() + 30
    while serving(url) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not serving(url), "the App server outlived `ovseg review`"
