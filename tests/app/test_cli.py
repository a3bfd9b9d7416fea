"""The `ovseg` CLI end to end, in subprocesses, on a real bundled image and on bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from helpers import COCO_DEV, ROOT

EXAMPLES = ROOT / "assets" / "examples"


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ovseg.app.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=dict(os.environ),
    )


def test_segment_writes_masks_overlays_and_summary(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("segment", str(EXAMPLES / "grace_hopper.jpg"), "person, tie, -cat", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [r["word"] for r in summary["results"]] == ["person", "tie"]
    assert summary["negatives"] == ["cat"]
    h, w = summary["size"]
    assert (h, w) == (600, 512)
    for r in summary["results"]:
        assert 0.0 <= r["score"] <= 1.0 and 0.0 <= r["mask_area"] <= 1.0
        mask = np.asarray(Image.open(out / r["files"]["mask"]))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert abs((mask > 0).mean() - r["mask_area"]) < 1e-4
        overlay = np.asarray(Image.open(out / r["files"]["attention"]))
        assert overlay.shape == (h, w, 3)
    # The tie is a ImageNet class ("Windsor tie"): the reference finds it with a higher score than a cat.
    tie = summary["results"][1]
    assert tie["details"]["wordnet_synset"] == "necktie.n.01"
    assert "tie" in proc.stdout and "person" in proc.stdout


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase the one-line error must contain)."""
    good = (EXAMPLES / "cat.jpg").read_bytes()
    (tmp / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tmp / "empty.jpg").write_bytes(b"")
    (tmp / "notes.png").write_text("this is not an image\n")
    Image.new("L", (12000, 9000)).save(tmp / "huge.png", optimize=False, compress_level=1)
    return {
        "corrupt": (tmp / "truncated.jpg", "corrupt"),
        "zero bytes": (tmp / "empty.jpg", "empty"),
        "text as png": (tmp / "notes.png", "not an image"),
        "huge": (tmp / "huge.png", "MP"),
        "missing": (tmp / "nope.jpg", "no such file"),
    }


def test_segment_with_xpm_writes_each_pseudo_label(tmp_path):
    out = tmp_path / "xpm"
    proc = run_cli("segment", str(EXAMPLES / "cat.jpg"), "cat", "--methods", "xpm", "--caption",
                   "A cat on a blanket.", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "summary.json").read_text())["results"][0]
    assert result["files"].keys() >= {"mask", "probability", "noise"}
    labels = result["pseudo_labels"]
    assert labels, "the cat is found"
    with Image.open(EXAMPLES / "cat.jpg") as im:
        width, height = im.size
    for pl in labels:
        x0, y0, x1, y1 = pl["box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert 0.0 <= pl["reliability"] <= 1.0 and 0.0 < pl["area"] <= 1.0 and 0.0 <= pl["score"] <= 1.0
        with Image.open(out / pl["file"]) as im:
            assert im.size == (width, height)


def test_bad_images_give_one_line_errors(tmp_path):
    for name, (path, phrase) in _bad_inputs(tmp_path).items():
        proc = run_cli("segment", str(path), "cat", "--out", str(tmp_path / "o"))
        assert proc.returncode == 2, (name, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert lines[0].startswith("ovseg segment: error:") and phrase in lines[0], (name, lines[0])


def test_sixteen_bit_png_works(tmp_path):
    rgb = np.asarray(Image.open(EXAMPLES / "cat.jpg").convert("L"), dtype=np.uint16) * 257
    Image.fromarray(rgb).save(tmp_path / "cat16.png")  # mode I;16
    assert Image.open(tmp_path / "cat16.png").mode.startswith("I")
    proc = run_cli("segment", str(tmp_path / "cat16.png"), "cat", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["size"] == [300, 451]


@pytest.mark.parametrize(
    "words, phrase",
    [(" , ", "no word to look for"), ("-person, -dog", "no word to look for"), ("???", "not a word")],
)
def test_bad_word_lists(tmp_path, words, phrase):
    proc = run_cli("segment", str(EXAMPLES / "cat.jpg"), words, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and phrase in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_word_gets_a_map_from_the_text_encoder(tmp_path):
    proc = run_cli("segment", str(EXAMPLES / "cat.jpg"), "zorblax", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "o" / "summary.json").read_text())["results"][0]
    assert r["details"]["known_to_wordnet"] is False and "text encoder" in r["details"]["note"]
    attention = np.asarray(Image.open(tmp_path / "o" / r["files"]["attention"]))
    assert attention.shape == (300, 451, 3)


def test_unknown_method_and_missing_coco_folder(tmp_path):
    proc = run_cli("segment", str(EXAMPLES / "cat.jpg"), "cat", "--out", str(tmp_path), "--methods", "nope")
    assert proc.returncode == 2 and "unknown method 'nope'" in proc.stderr and "cam" in proc.stderr
    proc = run_cli("eval", str(tmp_path / "missing"), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(tmp_path / "missing") in proc.stderr


def test_methods_lists_the_registry():
    proc = run_cli("methods")
    assert proc.returncode == 0 and proc.stdout.startswith("cam")


@pytest.mark.slow
def test_eval_on_coco_dev_writes_report(tmp_path):
    if not COCO_DEV.is_dir():
        pytest.skip(f"shared data not found at {COCO_DEV}")
    out = tmp_path / "report"
    proc = run_cli("eval", str(COCO_DEV), "--methods", "cam, cam[threshold=0.9]", "--out", str(out),
                   "--limit", "6")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    cam = metrics["methods"]["cam"]
    for key in ("concept_miou_lenient", "presence_ap"):
        assert set(cam[key]) == {"target", "base", "h"}
    assert set(cam["acceptance"]) == {"target_0.5", "target_0.75", "base_0.5", "base_0.75"}
    # the strict headline counts unlabelled pixels as negatives: never above the lenient measure
    assert cam["concept_miou"]["base"] <= cam["concept_miou_lenient"]["base"] + 1e-9
    assert set(cam["concept_miou"]) == {"target", "base", "h", "base_held_out", "target_held_out"}
    # a spec with options is its own row; a higher threshold gives smaller masks, so a different score
    high = metrics["methods"]["cam[threshold=0.9]"]
    assert high["concept_miou"]["base"] != cam["concept_miou"]["base"]
    assert high["presence_ap"] == cam["presence_ap"]  # presence does not depend on the mask threshold
    assert 0.0 < cam["concept_miou"]["base"] <= 1.0
    assert cam["ms_per_image"] > 0 and cam["ms_per_concept"] > 0
    assert metrics["dataset"]["images"] == 6
    assert metrics["reference"]["clipseg_architecture"]["ms_per_forward"] > 0
    for name in ("report.md", "per_class_iou.png", "presence_pr.png"):
        assert (out / name).stat().st_size > 500
    assert "cam" in proc.stdout and "mIoU" in proc.stdout
    assert "eval:" in proc.stderr  # the progress bar (rate, ETA) goes to stderr


@pytest.mark.slow
def test_eval_base_on_held_out_images_only(tmp_path):
    if not COCO_DEV.is_dir():
        pytest.skip(f"shared data not found at {COCO_DEV}")
    from ovseg.train.coco import held_out_image_ids
    from ovseg.train.coco import BASE_CLASSES, CocoConceptDataset

    dataset = CocoConceptDataset(COCO_DEV)
    first = dataset.image_ids[:20]
    held = held_out_image_ids(dataset.image_ids)
    expected = sum(1 for i in first if i in held for c in dataset.concept_targets(i).gt if c in BASE_CLASSES)
    assert 0 < len(held.intersection(first)) < 20
    out = tmp_path / "report"
    proc = run_cli("eval", str(COCO_DEV), "--methods", "cam", "--out", str(out), "--limit", "20",
                   "--base-on-held-out", "--no-reference")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"]["pairs_base"] == expected and metrics["dataset"]["base_on_held_out_only"]
    miou = metrics["methods"]["cam"]["concept_miou"]
    assert miou["base"] == pytest.approx(miou["base_held_out"])  # every base pair is a held-out one
    assert "held out of training" in (out / "report.md").read_text()


def test_eval_rejects_bad_method_options(tmp_path):
    proc = run_cli("eval", str(COCO_DEV), "--methods", "cam[colour=red]", "--out", str(tmp_path / "r"),
                   "--limit", "1", "--no-reference")
    assert proc.returncode == 2 and "has no option 'colour'" in proc.stderr and "threshold" in proc.stderr
    proc = run_cli("eval", str(COCO_DEV), "--methods", "cam[threshold", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "unclosed '['" in proc.stderr


def test_proxies_prints_the_mapper_comparison_table():
    proc = run_cli("proxies", "sofa", "tv", "puppy")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in proc.stdout.splitlines()[2:]}
    assert "studio couch" in rows["sofa"].split(" | ")[1]
    assert "falls back to the text encoder" in rows["tv"] and "television" in rows["tv"].split(" | ")[2]
    assert "via hypernym" in rows["puppy"]
