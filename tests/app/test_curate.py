"""The curation loop on a real FiftyOne database (started by FiftyOne in the session's data folder, see
conftest): labelling, resuming after a kill, the oracle reviewer, COCO export and its pycocotools round
trip, retraining into a versioned checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg.core.errors import OvsegError
from helpers import COCO_DEV, ROOT

EXAMPLES = ROOT / "assets" / "examples"
needs_coco = pytest.mark.skipif(not COCO_DEV.is_dir(), reason="needs ../shared/data/coco_dev")


@pytest.fixture(scope="module")
def fo():
    from ovseg.app.curate.fo import fiftyone

    return fiftyone()


def _ovseg(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ovseg.app.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def _snapshot(ds) -> list[tuple]:
    """Everything a label run writes, sample by sample in dataset order (no ids or timestamps)."""
    from ovseg.app.curate.schema import LABEL_FIELD

    out = []
    heat_fields = sorted(f for f, v in ds.get_field_schema().items()
                         if "Heatmap" in str(getattr(v, "document_type", "")))
    for s in ds.iter_samples():
        dets = tuple((d.label, d["method"], round(d.confidence, 6), None if d["reliability"] is None else
                      round(d["reliability"], 6), tuple(np.round(d.bounding_box, 6)), d.mask.tobytes())
                     for d in s[LABEL_FIELD].detections)
        heats = tuple(s[f].map.tobytes() if s[f] is not None else None for f in heat_fields)
        out.append((s["ovseg_key"], s.filepath, s["word_source"], tuple(s["captions"]), dets, heats,
                    s["reliability"], s["agreement"]))
    return out


# ----------------------------------------------------------------------------------------- unit

def test_detection_mask_round_trip_is_exact(fo):
    from ovseg.app.curate.schema import detection_from_mask, mask_from_detection

    rng = np.random.default_rng(0)
    for _ in range(20):
        H, W = rng.integers(5, 90, size=2)
        m = np.zeros((H, W), bool)
        y0, x0 = rng.integers(0, H), rng.integers(0, W)
        m[y0:rng.integers(y0 + 1, H + 1), x0:rng.integers(x0 + 1, W + 1)] = True
        m &= rng.random((H, W)) > 0.3
        if not m.any():
            continue
        det = detection_from_mask(fo, m, "cat", 0.5, "cam")
        assert np.array_equal(mask_from_detection(det, (H, W)), m)
    assert detection_from_mask(fo, np.zeros((4, 4), bool), "cat", 0.5, "cam") is None


def test_heatmap_is_uint8_and_small():
    from ovseg.app.curate.schema import HEATMAP_SIDE, heatmap_array

    m = np.linspace(0, 1, 600 * 900, dtype=np.float32).reshape(600, 900)
    h = heatmap_array(m)
    assert h.dtype == np.uint8 and max(h.shape) == HEATMAP_SIDE and h.shape == (171, 256)
    assert h.min() <= 2 and h.max() >= 253  # area averaging of a ramp
    small = heatmap_array(np.full((10, 20), 0.5, np.float32))
    assert small.shape == (10, 20) and (small == 128).all()


@pytest.mark.parametrize("address, name, url", [
    ("127.0.0.1", "mine", "http://127.0.0.1:5151/datasets/mine"),
    ("127.0.0.1", "my data", "http://127.0.0.1:5151/datasets/my%20data"),  # one path segment, quoted
    ("127.0.0.1", "a&b?c#d%e", "http://127.0.0.1:5151/datasets/a%26b%3Fc%23d%25e"),
    ("127.0.0.1", "собака", "http://127.0.0.1:5151/datasets/%D1%81%D0%BE%D0%B1%D0%B0%D0%BA%D0%B0"),
    ("127.0.0.1", "runs/2024 v2", "http://127.0.0.1:5151/"),  # no page can hold a '/': the App's root opens it
    ("::1", "mine", "http://[::1]:5151/datasets/mine"),
])
def test_review_prints_a_usable_app_url(address, name, url):
    from urllib.parse import unquote, urlsplit

    from ovseg.app.curate.review import app_url

    assert app_url(address, 5151, name) == url
    path = urlsplit(url).path
    if path != "/":  # the App reads the name back from its one path segment
        assert path.count("/") == 2 and " " not in url and unquote(path.split("/")[2]) == name


def test_checkpoint_versions(tmp_path, monkeypatch):
    from ovseg.core import checkpoints as ck

    monkeypatch.setenv("OVSEG_DATA_DIR", str(tmp_path))
    assert ck.current_version("xpm") == "packaged" and ck.current_folder("xpm") is None
    assert ck.next_version("xpm") == "v1"
    for v in ("v1", "v2", "v10"):
        (ck.method_dir("xpm") / v).mkdir(parents=True)
    assert ck.versions("xpm") == ["v1", "v2", "v10"] and ck.next_version("xpm") == "v11"
    assert ck.use("xpm", "2") == "v2" and ck.current_folder("xpm") == ck.method_dir("xpm") / "v2"
    with pytest.raises(OvsegError, match="no xpm checkpoint 'v7'; there are: packaged, v1, v2, v10"):
        ck.use("xpm", "v7")
    assert ck.use("xpm", "packaged") == "packaged" and ck.current_folder("xpm") is None
    ck.use("xpm", "v1")
    (ck.method_dir("xpm") / "v1").rmdir()  # a version deleted by hand: back to the packaged one
    assert ck.current_version("xpm") == "packaged"


# ----------------------------------------------------------------------------------------- labelling

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Real photographs, plus odd ones (grayscale, RGBA, 16-bit) and a corrupt file."""
    d = tmp_path_factory.mktemp("folder")
    rgb = np.asarray(Image.open(EXAMPLES / "cat.jpg").convert("RGB"))
    Image.open(EXAMPLES / "cat.jpg").save(d / "a_cat.jpg")
    Image.open(EXAMPLES / "coffee.jpg").save(d / "b_coffee.jpg")
    (d / "sub").mkdir()
    Image.fromarray(rgb).convert("L").save(d / "sub" / "c_gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])).save(d / "sub" / "d_rgba.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(d / "e_16bit.png")
    (d / "f_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


@pytest.fixture(scope="module")
def folder_dataset(fo, image_folder):
    from ovseg.app.curate.label import label

    out = label(image_folder, "folder-test", words="cat, cup", methods="xpm,cam", batch_size=2, progress=False)
    return fo.load_dataset("folder-test"), out


def test_label_folder_writes_samples_fields_and_views(folder_dataset):
    from ovseg.app.curate.schema import HEATMAP_SIDE, LABEL_FIELD

    ds, out = folder_dataset
    assert out["images"] == 6 and out["labelled_images"] == 5 and out["samples_added"] == 10 == len(ds)
    assert [k for k, _ in out["failed"]] == ["f_corrupt.jpg"]
    assert sorted(ds.distinct("word")) == ["cat", "cup"]
    assert ds.distinct("image_key") == sorted(["a_cat.jpg", "b_coffee.jpg", "sub/c_gray.png", "sub/d_rgba.png",
                                               "e_16bit.png"])
    schema = ds.get_field_schema()
    for f in ("attention_cam", "probability_xpm", "noise_xpm", LABEL_FIELD, "reliability", "agreement", "score"):
        assert f in schema, f
    s = ds.match({"ovseg_key": "a_cat.jpg|cat"}).first()
    W, H = Image.open(EXAMPLES / "cat.jpg").size
    assert s["image_height"] == H and s["image_width"] == W
    methods = {d["method"] for d in s[LABEL_FIELD].detections}
    assert methods == {"xpm", "cam"}
    for d in s[LABEL_FIELD].detections:
        x, y, w, h = d.bounding_box
        assert 0 <= x and 0 <= y and x + w <= 1 + 1e-9 and y + h <= 1 + 1e-9
        assert d.mask.shape == (round(h * H), round(w * W)) and d.mask.dtype == bool and d.mask.any()
        assert 0.0 <= d.confidence <= 1.0 and d.label == "cat"
        assert (d["reliability"] is None) == (d["method"] == "cam")
    xpm_rel = [d["reliability"] for d in s[LABEL_FIELD].detections if d["method"] == "xpm"]
    assert s["reliability"] == pytest.approx(min(xpm_rel))
    assert 0.0 <= s["agreement"] <= 1.0
    for f in ("attention_cam", "noise_xpm"):
        assert s[f].map.dtype == np.uint8 and max(s[f].map.shape) <= HEATMAP_SIDE
    views = ds.list_saved_views()
    assert {"least-reliable", "disagreements", "to-review", "approved", "word-cat", "word-cup"} <= set(views)
    rel = ds.load_saved_view("least-reliable").values("reliability")
    assert rel == sorted(rel) and len(rel) == 10
    assert len(ds.load_saved_view("word-cup")) == 5


def test_label_again_adds_nothing_and_refuses_other_methods(fo, folder_dataset, image_folder):
    from ovseg.app.curate.label import label

    ds, _ = folder_dataset
    out = label(image_folder, "folder-test", words="cat", methods="xpm,cam", progress=False)
    assert out["samples_added"] == 0 and out["skipped_images"] == 6 - 1 and len(ds) == 10
    with pytest.raises(OvsegError, match="was labelled with xpm,cam"):
        label(image_folder, "folder-test", words="cat", methods="cam", progress=False)


def test_label_errors_are_clear(tmp_path):
    from ovseg.app.curate.label import label

    with pytest.raises(FileNotFoundError, match="no such folder"):
        label(tmp_path / "missing", "x", words="cat", progress=False)
    with pytest.raises(OvsegError, match="no images"):
        label(tmp_path, "x", words="cat", progress=False)
    with pytest.raises(OvsegError, match="nothing to label"):
        label(tmp_path, "x", progress=False)
    r = _ovseg("label", str(tmp_path), "--dataset", "x", "--words", "cat", "--captions")
    assert r.returncode == 2 and "no images" in r.stderr, r.stderr
    (tmp_path / "cat.jpg").write_bytes((EXAMPLES / "cat.jpg").read_bytes())  # a plain folder with an image
    r = _ovseg("label", str(tmp_path), "--dataset", "x", "--words", "cat", "--captions")
    assert r.returncode == 2 and "--captions needs a COCO folder" in r.stderr, r.stderr
    r = _ovseg("export", "no-such-dataset", "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "no FiftyOne dataset 'no-such-dataset'" in r.stderr


@needs_coco
@pytest.mark.slow
def test_killed_label_run_resumes_to_the_same_dataset(fo):
    """A run killed (SIGKILL) after some batches landed, then restarted, ends with exactly the dataset of a
    run that was never interrupted: same samples in the same order, same masks and heatmaps."""
    args = [str(COCO_DEV), "--words", "person, dog, car", "--split", "train", "--limit", "10", "--batch-size", "2",
            "--methods", "xpm,cam"]
    r = _ovseg("label", *args, "--dataset", "resume-ref")
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([sys.executable, "-m", "ovseg.app.cli", "label", *args, "--dataset", "resume-cut"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 300
        n = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if fo.dataset_exists("resume-cut"):
                n = fo.load_dataset("resume-cut").count()
                if n >= 6:
                    break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
    finally:  # whatever happened above, the run does not outlive the test
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    cut = fo.load_dataset("resume-cut")
    assert 6 <= len(cut) < 30
    r = _ovseg("label", *args, "--dataset", "resume-cut")
    assert r.returncode == 0, r.stderr
    assert "already labelled" in r.stdout
    ref = fo.load_dataset("resume-ref")
    cut.reload()
    assert len(ref) == len(cut) == 30
    assert _snapshot(cut) == _snapshot(ref)


@pytest.mark.slow
def test_two_label_workers_under_torchrun_give_the_dataset_of_one_and_a_lost_shard_resumes(fo):
    """`torchrun --nproc_per_node=2 ... label`: each worker writes its shard to the one dataset, which ends with
    the samples of a single worker's run; samples a killed worker never wrote are added by running it again."""
    from ovseg.app.curate.label import parse_shard

    args = [str(EXAMPLES), "--words", "cat, cup, person", "--methods", "xpm,cam", "--batch-size", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # torchrun's default; other thread counts round differently
    r = subprocess.run([sys.executable, "-m", "ovseg.app.cli", "label", *args, "--dataset", "workers-one"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
              "ovseg.app.cli", "label", *args, "--dataset", "workers-two"]
    r = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(shard 0/2)" in r.stdout and "(shard 1/2)" in r.stdout
    one, two = fo.load_dataset("workers-one"), fo.load_dataset("workers-two")
    assert len(one) == len(two) == 12
    assert sorted(_snapshot(two)) == sorted(_snapshot(one))
    # worker 1 (images 1 and 3 of the 4) "killed" before its last image landed: its samples are missing
    lost = two.match({"image_key": "grace_hopper.jpg"})
    assert len(lost) == 3
    two.delete_samples(lost)
    r = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(shard 1/2): 3 sample(s) added" in r.stdout and "(shard 0/2): 0 sample(s) added" in r.stdout
    two.reload()
    assert sorted(_snapshot(two)) == sorted(_snapshot(one))
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(ValueError, match="K/N"):
        parse_shard("1-4")
    with pytest.raises(ValueError, match="0..N-1"):
        parse_shard("4/4")


# ----------------------------------------------------------------------------------------- review, export

@pytest.fixture(scope="module")
def coco_dataset(fo):
    """Four captioned training images of coco_dev labelled with their caption nouns, reviewed by the oracle."""
    from ovseg.app.curate.label import label
    from ovseg.app.curate.review import oracle_review

    label(COCO_DEV, "coco-test", captions=True, split="train", limit=4, methods="xpm,cam", progress=False)
    review = oracle_review("coco-test", COCO_DEV, 0.5, progress=False)
    return fo.load_dataset("coco-test"), review


@needs_coco
@pytest.mark.slow
def test_oracle_review_tags_by_iou_with_ground_truth(coco_dataset):
    from ovseg.app.curate.schema import LABEL_FIELD

    ds, review = coco_dataset
    assert review["approved"] > 0 and review["rejected"] > 0
    assert review["approved"] + review["rejected"] == review["labels"]
    for s in ds.iter_samples():
        assert s["word_source"] == "caption" and s["captions"]
        for d in s[LABEL_FIELD].detections:
            assert ("approved" in d.tags) == (d["oracle_iou"] >= 0.5) != ("rejected" in d.tags)
    approved = ds.load_saved_view("approved")
    assert approved.count(f"{LABEL_FIELD}.detections") == review["approved"]


@needs_coco
@pytest.mark.slow
def test_export_reads_back_mask_for_mask_and_is_atomic(coco_dataset, tmp_path, monkeypatch):
    from ovseg.app.curate import export as ex
    from ovseg.app.curate.schema import LABEL_FIELD, mask_from_detection

    ds, review = coco_dataset
    out = ex.export("coco-test", tmp_path / "coco", ["approved"])
    assert out["annotations"] == review["approved"]
    back = ex.read_back(tmp_path / "coco")
    expected: dict = {}
    for s in ds.iter_samples():
        for d in s[LABEL_FIELD].detections:
            if "approved" in d.tags:
                m = mask_from_detection(d, (s["image_height"], s["image_width"]))
                expected.setdefault((s["coco_id"], d.label), []).append(m)
    assert back.keys() == expected.keys()
    for key, masks in expected.items():
        assert len(back[key]) == len(masks)
        for a, b in zip(back[key], masks):
            assert a.dtype == bool and np.array_equal(a, b)
    inst = json.loads((tmp_path / "coco" / "instances.json").read_text())
    caps = json.loads((tmp_path / "coco" / "captions.json").read_text())
    assert {c["name"] for c in inst["categories"]} == {k[1] for k in expected}
    assert all(a["segmentation"]["counts"] and a["iscrowd"] == 0 for a in inst["annotations"])
    assert len(caps["annotations"]) >= len(inst["images"])  # coco_dev images have five captions
    for im in inst["images"]:
        assert (tmp_path / "coco" / "images" / im["file_name"]).is_file()
    # the export is a COCO folder ovseg reads: label it again
    from ovseg.app.curate.label import read_source

    images, kind = read_source(tmp_path / "coco")
    assert kind == "coco" and len(images) == len(inst["images"]) and all(i.captions for i in images)

    # a crash half-way through a new export leaves the previous one whole
    before = (tmp_path / "coco" / "instances.json").read_bytes()

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "_link_or_copy", broken)
    with pytest.raises(OSError, match="disk full"):
        ex.export("coco-test", tmp_path / "coco", ["approved", "rejected"])
    assert (tmp_path / "coco" / "instances.json").read_bytes() == before
    assert len(list((tmp_path / "coco" / "images").iterdir())) == len(inst["images"])


@needs_coco
@pytest.mark.slow
def test_rejected_label_on_an_approved_sample_is_not_exported(coco_dataset, tmp_path):
    from ovseg.app.curate.export import curated_labels
    from ovseg.app.curate.schema import LABEL_FIELD

    ds, _ = coco_dataset
    s = ds.first()
    n = len(s[LABEL_FIELD].detections)
    rejected = sum("rejected" in d.tags for d in s[LABEL_FIELD].detections)
    s.tags.append("reviewed-ok")
    s.save()
    try:
        picked = [lab for lab in curated_labels(ds, ["reviewed-ok"]) if lab["filepath"] == s.filepath
                  and lab["word"] == s["word"]]
        assert len(picked) == n - rejected
    finally:
        s.tags.remove("reviewed-ok")
        s.save()


# ----------------------------------------------------------------------------------------- retrain

@needs_coco
@pytest.mark.slow
def test_retrain_writes_a_new_version_that_the_engine_uses(coco_dataset, predictor):
    from ovseg.core import checkpoints as ck
    from ovseg.core.checkpoints import packaged
    from ovseg.core.methods.xpm.method import XPM
    from ovseg.app.curate.retrain import RetrainConfig, retrain

    _, review = coco_dataset
    # other tests (the curation loop) may have retrained before: the version is the next one, whatever ran first
    ck.use("xpm", "packaged")
    ck.use("cls_saliency", "packaged")
    expected = ck.next_version("xpm")
    out = retrain(RetrainConfig(dataset="coco-test", epochs=2, evaluate=False, curated_only=True, segmenter=False),
                  progress=False)
    assert "segmenter" not in out and ck.current_version("cls_saliency") == "packaged"
    assert out["version"] == expected and ck.current_version("xpm") == expected
    folder = Path(out["folder"])
    assert {p.name for p in folder.iterdir()} >= {"student.pt", "teacher.pt", "student_plain.pt", "config.json",
                                                   "retrain.json"}
    assert out["curated"]["labels"] + out["curated"]["dropped_on_held_out"] == review["approved"]
    assert out["losses"]["loss"]["first"] > 0
    m = XPM(predictor.models)
    assert m.folder == folder  # the engine (and so the app) now loads the retrained student
    shipped = XPM(predictor.models, checkpoint=packaged("xpm")).net.state_dict()
    changed = [k for k, v in m.net.state_dict().items() if not np.array_equal(v.numpy(), shipped[k].numpy())]
    assert any(k.startswith("embedding.") for k in changed) and any(k.startswith("mask.") for k in changed)
    r = _ovseg("checkpoints", "xpm")
    assert r.returncode == 0 and f"* {expected}" in r.stdout and "  packaged" in r.stdout
    r = _ovseg("checkpoints", "xpm", "--use", "packaged")
    assert r.returncode == 0 and ck.current_version("xpm") == "packaged"
    assert XPM(predictor.models).folder == packaged("xpm")


@needs_coco
@pytest.mark.slow
def test_fiftyone_plugin_operator_retrains(coco_dataset):
    """The project's FiftyOne plugin is found on the plugin path and its operator runs a retrain."""
    import fiftyone.operators as foo
    import fiftyone.plugins as fop

    from ovseg.core import checkpoints as ck

    assert "@ovseg/curation" in [p.name for p in fop.list_plugins()]
    before = ck.versions("xpm")
    # in a thread of its own: where an event loop runs in this one (Playwright's, after a browser test),
    # FiftyOne hands back an asyncio task instead of the result
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        res = pool.submit(foo.execute_operator, "@ovseg/curation/retrain",
                          ctx={"dataset": "coco-test", "params": {"epochs": 1, "evaluate": False,
                                                                  "segmenter": False}}).result()
    assert res.error is None, res.error
    assert res.result["version"] not in before and res.result["labels"] > 0
    assert ck.current_version("xpm") == res.result["version"]
    ck.use("xpm", "packaged")


@needs_coco
@pytest.mark.slow
def test_retrain_fine_tunes_the_class_agnostic_segmenter_too(coco_dataset, predictor):
    """The default retrain also fine-tunes cls_saliency's segmenter on the curated (image, word) pairs plus the
    base pairs of their images; the new version is what cls_saliency loads, other variants stay packaged."""
    import torch

    from ovseg.core import checkpoints as ck
    from ovseg.core.methods.cls_saliency.method import ClsSaliency
    from ovseg.core.checkpoints import packaged
    from ovseg.core.ops.segmenter import load_segmenter
    from ovseg.app.curate.export import curated_labels
    from ovseg.app.curate.retrain import RetrainConfig, retrain
    from ovseg.train.coco import CocoConceptDataset, base_training_pairs

    ds, _ = coco_dataset
    ck.use("xpm", "packaged")  # whatever other tests left in use: retrain from the packaged checkpoints
    ck.use("cls_saliency", "packaged")
    xpm_before = ck.versions("xpm")
    expected = ck.next_version("cls_saliency")
    out = retrain(RetrainConfig(dataset="coco-test", epochs=1, evaluate=False, curated_only=True), progress=False)
    seg = out["segmenter"]
    assert out["version"] not in xpm_before and ck.current_version("xpm") == out["version"]
    assert seg["version"] == expected and ck.current_version("cls_saliency") == expected
    assert seg["variant"] == "sem2c_neg" and seg["saliency"] == "cam" and seg["from"] == "packaged"  # the default
    folder = Path(seg["folder"])
    assert {p.name for p in folder.iterdir()} == {"weights.pt", "config.json", "retrain.json"}

    # the pairs: curated (image, word) pairs unless the word is a base class annotated there, plus those base pairs
    coco = CocoConceptDataset(COCO_DEV)
    labels = curated_labels(ds, ["approved"])
    curated = {(lab["coco_id"], lab["word"]) for lab in labels}
    base = set(base_training_pairs(coco, sorted({i for i, _ in curated})))
    assert seg["pairs"]["base_replayed"] == len(base) > 0
    assert seg["pairs"]["curated"] == len(curated - base) > 0
    assert seg["pairs"]["images"] == len({i for i, _ in curated})
    assert seg["loss"]["steps"] >= 1 and np.isfinite(seg["loss"]["last_20"])

    m = ClsSaliency(predictor.models)
    shipped = load_segmenter(packaged("cls_saliency", "sem2c_neg-cam"), torch.device("cpu")).state_dict_small()
    new = m.segmenter.state_dict_small()
    assert any(not torch.equal(v, shipped[k]) for k, v in new.items())
    other = ClsSaliency(predictor.models, variant="sem1c").segmenter.state_dict_small()
    sem1c = load_segmenter(packaged("cls_saliency", "sem1c"), torch.device("cpu")).state_dict_small()
    assert all(torch.equal(v, sem1c[k]) for k, v in other.items())  # another variant is not the retrained one

    r = _ovseg("checkpoints", "cls_saliency")
    assert r.returncode == 0 and f"* {expected}" in r.stdout, r.stdout + r.stderr
    ck.use("cls_saliency", "packaged")
    ck.use("xpm", "packaged")
    back = ClsSaliency(predictor.models).segmenter.state_dict_small()
    assert all(torch.equal(v, shipped[k]) for k, v in back.items())


@needs_coco
def test_segmenter_pairs_union_masks_let_annotations_win_and_key_other_images_by_file():
    from ovseg.app.curate.retrain_segmenter import _PATH_KEY_OFFSET, _Images, training_pairs
    from ovseg.train.coco import BASE_CLASSES, CocoConceptDataset, base_training_pairs, training_mask

    coco = CocoConceptDataset(COCO_DEV)
    image_id, base_class = next(p for p in base_training_pairs(coco, coco.image_ids))
    h, w = coco.image_size(image_id)
    path = str(coco.image_path(image_id).resolve())
    a, b = np.zeros((h, w), bool), np.zeros((h, w), bool)
    a[:10, :10], b[20:30, 20:30] = True, True
    cat = EXAMPLES / "cat.jpg"
    W, H = Image.open(cat).size
    elsewhere = np.zeros((H, W), bool)
    elsewhere[5:50, 5:60] = True
    kept = [{"filepath": path, "word": "mug", "mask": a}, {"filepath": path, "word": "mug", "mask": b},
            {"filepath": path, "word": base_class, "mask": a},  # a base class annotated here: the annotation wins
            {"filepath": str(cat), "word": "kitten", "mask": elsewhere}]
    assert "mug" not in BASE_CLASSES
    images = _Images(coco)
    targets, base = training_pairs(kept, coco, {Path(path): image_id}, images)
    assert set(base) == set(base_training_pairs(coco, [image_id])) and (image_id, base_class) in base
    assert np.array_equal(targets[(image_id, "mug")], (a | b).astype(np.uint8))
    assert np.array_equal(targets[(image_id, base_class)], training_mask(coco, image_id, base_class))
    (key,) = [k for k, word in targets if word == "kitten"]
    assert key >= _PATH_KEY_OFFSET and np.array_equal(targets[(key, "kitten")], elsewhere.astype(np.uint8))
    assert images.load_rgb(key).shape == (H, W, 3) and images.load_rgb(image_id).shape == (h, w, 3)
    assert len(targets) == len(base) + 2
