"""The `ovseg` CLI end to end, in subprocesses, on a real bundled image and on bad inputs."""

from __future__ import annotations

import json
import re
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
    proc = run_cli("segment", str(EXAMPLES / "grace_hopper.jpg"), "person, tie, -cat", "--out", str(out),
                   "--methods", "cam")
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


def test_segment_runs_fused_by_default_and_writes_each_evidence_map(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("segment", str(EXAMPLES / "grace_hopper.jpg"), "person", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "summary.json").read_text())["results"][0]
    assert r["method"] == "fused" and r["present"] and r["details"]["decided_by"]
    # fused shows two attention and two probability maps: each gets its own file, named by what it is
    assert {"evidence_CAM", "evidence_CAM_on_object_proposals", "evidence_XPM_regions", "attention_refined",
            "fused_probability_relative_to_its_peak", "mask", "mask_overlay"} <= set(r["files"])
    assert len(set(r["files"].values())) == len(r["files"])
    for name in r["files"].values():
        assert np.asarray(Image.open(out / name)).shape[:2] == (600, 512)
    assert len(r["pseudo_labels"]) >= 1  # one instance per object: she is one


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
    proc = run_cli("segment", str(EXAMPLES / "cat.jpg"), "zorblax", "--out", str(tmp_path / "o"), "--methods", "cam")
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


@pytest.mark.slow
def test_eval_rejects_bad_method_options(tmp_path):
    if not COCO_DEV.is_dir():
        pytest.skip(f"shared data not found at {COCO_DEV}")
    proc = run_cli("eval", str(COCO_DEV), "--methods", "cam[colour=red]", "--out", str(tmp_path / "r"),
                   "--limit", "1", "--no-reference")
    assert proc.returncode == 2 and "has no option 'colour'" in proc.stderr and "threshold" in proc.stderr


def test_eval_rejects_a_malformed_method_spec(tmp_path):
    """Refused while parsing --methods, before any data is read: no shared data needed."""
    proc = run_cli("eval", str(tmp_path / "no-data"), "--methods", "cam[threshold", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "unclosed '['" in proc.stderr


def test_proxies_prints_the_mapper_comparison_table():
    proc = run_cli("proxies", "sofa", "tv", "puppy")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in proc.stdout.splitlines()[2:]}
    assert "studio couch" in rows["sofa"].split(" | ")[1]
    assert "falls back to the text encoder" in rows["tv"] and "television" in rows["tv"].split(" | ")[2]
    assert "via hypernym" in rows["puppy"]


def test_segment_gives_each_word_and_method_spec_its_own_files(tmp_path):
    """Words whose plain slugs collide (two non-Latin words; 'hot-dog' and 'hot dog') and two specs of one
    method: every result writes files of its own, readable ones, and summary.json points each at them."""
    out = tmp_path / "out"
    words = ["собака", "кошка", "hot-dog", "hot dog"]
    proc = run_cli("segment", str(EXAMPLES / "coffee.jpg"), ", ".join(words), "--methods", "cam,cam[threshold=0.9]",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "summary.json").read_text())["results"]
    assert sorted((r["word"], r["spec"]) for r in results) == sorted(
        (w, s) for w in words for s in ("cam", "cam[threshold=0.9]"))
    files = [f for r in results for f in r["files"].values()]
    assert len(files) == len(set(files)) == 3 * len(results), files  # mask, mask overlay, attention each
    assert {p.name for p in out.iterdir()} == set(files) | {"image.png", "summary.json"}
    for r in results:
        stem = r["files"]["mask"]
        assert r["word"].split("-")[0].split(" ")[0] in stem, stem  # readable: the word is in its file names
        mask = np.asarray(Image.open(out / r["files"]["mask"])) > 0
        assert abs(mask.mean() - r["mask_area"]) < 1e-4, r  # the file holds this result's mask, not another's


@pytest.mark.parametrize("words", ["-dog,cat", "-dog, cat"])
def test_word_list_starting_with_a_negative(tmp_path, words):
    proc = run_cli("segment", str(EXAMPLES / "cat.jpg"), words, "--methods", "cam", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [r["word"] for r in summary["results"]] == ["cat"] and summary["negatives"] == ["dog"]


def test_segment_shows_progress_over_many_words(tmp_path):
    words = ["cat", "dog", "car", "cup", "tree", "sky", "bed", "box", "pen", "hat", "bus", "cow"]
    proc = run_cli("segment", str(EXAMPLES / "cat.jpg"), ",".join(words), "--methods", "cam",
                   "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    bar = proc.stderr.replace("\r", "\n")
    assert "segment:" in bar and f"{len(words)}/{len(words)}" in bar, proc.stderr  # words done of all
    assert re.search(r"word/s|s/word", bar) and "<" in bar, proc.stderr  # the rate, and the time left (ETA)


def _unwritable_outputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """kind -> (an output folder that cannot be written, a phrase the one-line error must contain)."""
    (tmp / "a_file").write_text("not a folder\n")
    out = {"an existing file": (tmp / "a_file", "is a file"),
           "below a file": (tmp / "a_file" / "out", "is a file")}
    if Path("/sys").is_dir():  # sysfs: no one may create a file there, root included
        out["not writable"] = (Path("/sys") / "ovseg-test-out", "not writable")
    return out


# command -> its arguments before the output option, the option naming the folder it writes
WRITING_COMMANDS = {
    "segment": (["segment", str(EXAMPLES / "cat.jpg"), "cat"], "--out"),
    "eval": (["eval", str(COCO_DEV), "--methods", "cam"], "--out"),
    "export": (["export", "some-dataset"], "--out"),
    "train": (["train", "cls_saliency"], "--out"),
    "label": (["label", str(EXAMPLES), "--dataset", "some-dataset", "--words", "cat"], "--db-dir"),
    "retrain": (["retrain", "some-dataset"], "--db-dir"),
}


@pytest.mark.parametrize("command", sorted(WRITING_COMMANDS))
def test_unwritable_output_is_refused_before_any_work(command, tmp_path, monkeypatch, capsys):
    """Checked before any model (or FiftyOne) loads: the work itself is replaced by a trap, and the answer is a
    one-line error with exit status 2, in well under the seconds a model takes to load."""
    import dataclasses
    import time

    from ovseg.app.cli import main
    from ovseg.train import registry

    def trap(*args, **kwargs):
        raise AssertionError(f"`ovseg {command}` started its work before checking its output folder")

    trainers = registry.trainers()  # imports (registers) every trainer first
    monkeypatch.setattr(registry, "_TRAINERS", {n: dataclasses.replace(t, run=trap) for n, t in trainers.items()})
    for target in ("ovseg.core.predictor.Predictor", "ovseg.train.evaluate.evaluate", "ovseg.app.curate.export.export",
                   "ovseg.app.curate.label.label", "ovseg.app.curate.retrain.retrain"):
        monkeypatch.setattr(target, trap)
    args, option = WRITING_COMMANDS[command]
    for kind, (path, phrase) in _unwritable_outputs(tmp_path).items():
        t0 = time.monotonic()
        rc = main([*args, option, str(path)])
        elapsed = time.monotonic() - t0
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1, (kind, err)
        assert lines[0].startswith(f"ovseg {command}: error: {option} {path}") and phrase in lines[0], (kind, err)
        assert elapsed < 3.0, (kind, elapsed)


def test_segment_to_an_existing_file_is_a_one_line_error(tmp_path):
    (tmp_path / "taken").write_text("a file\n")
    proc = run_cli("segment", str(EXAMPLES / "cat.jpg"), "cat", "--methods", "cam", "--out", str(tmp_path / "taken"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "is a file" in lines[0], proc.stderr
    assert "models loaded" not in proc.stdout


def _small_coco(folder: Path, n: int = 3) -> list[dict]:
    """A COCO folder of the first `n` coco_dev images with a scored class: their image files, their entries
    of instances.json (images, annotations, every category). Returns the image entries."""
    from ovseg.train.coco import SCORED_CLASSES

    data = json.loads((COCO_DEV / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    scored = {a["image_id"] for a in data["annotations"] if names[a["category_id"]] in SCORED_CLASSES}
    images = sorted((im for im in data["images"] if im["id"] in scored), key=lambda im: im["id"])[:n]
    ids = {im["id"] for im in images}
    (folder / "images").mkdir(parents=True)
    for im in images:
        (folder / "images" / im["file_name"]).write_bytes((COCO_DEV / "images" / im["file_name"]).read_bytes())
    small = {"images": images, "categories": data["categories"],
             "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    (folder / "instances.json").write_text(json.dumps(small))
    return images


@pytest.mark.slow
def test_eval_skips_an_unreadable_image_and_names_it(tmp_path):
    if not COCO_DEV.is_dir():
        pytest.skip(f"shared data not found at {COCO_DEV}")
    coco = tmp_path / "coco"
    images = _small_coco(coco)
    missing = images[1]
    (coco / "images" / missing["file_name"]).unlink()
    out = tmp_path / "report"
    proc = run_cli("eval", str(coco), "--methods", "cam", "--no-reference", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    dataset = json.loads((out / "metrics.json").read_text())["dataset"]
    assert dataset["images"] == 2
    [skipped] = dataset["skipped_images"]
    assert skipped["id"] == missing["id"] and skipped["file"].endswith(missing["file_name"]), skipped
    assert "no such file" in skipped["why"].lower(), skipped
    report = (out / "report.md").read_text()
    assert "1 image skipped" in report and missing["file_name"] in report, report
    assert missing["file_name"] in proc.stderr  # said while it runs, too


@pytest.mark.slow
def test_eval_fails_only_when_no_image_could_be_scored(tmp_path):
    if not COCO_DEV.is_dir():
        pytest.skip(f"shared data not found at {COCO_DEV}")
    coco = tmp_path / "coco"
    images = _small_coco(coco, n=2)
    for im in images:
        (coco / "images" / im["file_name"]).unlink()
    proc = run_cli("eval", str(coco), "--methods", "cam", "--no-reference", "--out", str(tmp_path / "r"))
    lines = [line for line in proc.stderr.splitlines() if line.strip() and line.startswith("ovseg eval:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "no image could be scored" in lines[0] and images[0]["file_name"] in lines[0], lines[0]
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_eval_names_an_invalid_instances_file(tmp_path):
    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    (coco / "instances.json").write_text('{"images": [}')
    proc = run_cli("eval", str(coco), "--methods", "cam", "--no-reference", "--out", str(tmp_path / "r"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(coco / "instances.json") in lines[0] and "not valid" in lines[0], lines[0]


def test_scaling_takes_a_single_trainer_flag_as_its_train_args():
    from ovseg.app.cli import _parser, _words_not_options

    for argv, want in ((["--train-args", "--no-ablation"], "--no-ablation"),
                       (["--train-args", "--no-ablation --no-eval"], "--no-ablation --no-eval"),
                       (["--train-args=--epochs 2"], "--epochs 2")):
        args = _parser().parse_args(_words_not_options(["scaling", "concept_mask", *argv, "--fractions", "0.5"]))
        assert args.train_args == want and args.method == "concept_mask" and args.fractions == "0.5"
