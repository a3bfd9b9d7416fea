"""Tests of ovseg.app.report on a small fabricated metrics dict for two methods."""

import json

import numpy as np
import pytest
from PIL import Image

from ovseg.app.report import format_table, write_report
from ovseg.core.ops.metrics import precision_recall_curve
from ovseg.train.coco import BASE_CLASSES, TARGET_CLASSES

CLASSES = TARGET_CLASSES[:4] + BASE_CLASSES[:6]


def _method(seed: int, miou_target: float) -> dict:
    rng = np.random.default_rng(seed)
    per_class_iou = {c: float(rng.uniform(0.1, 0.9)) for c in CLASSES}
    per_class_iou[CLASSES[1]] = float("nan")  # a class no pair of which was scored
    return {
        "concept_miou": {"target": miou_target, "base": 0.5, "h": 2 * miou_target * 0.5 / (miou_target + 0.5)},
        "concept_miou_lenient": {"target": 0.2, "base": 0.3, "h": 0.24},
        "acceptance": {"target_0.5": 0.25, "target_0.75": 0.1, "base_0.5": 0.5, "base_0.75": 0.2},
        "presence_ap": {"target": 0.61234, "base": float("nan"), "h": float("nan")},
        "ms_per_image": 123.456,
        "ms_per_concept": 7.89,
        "images_per_second": 8.1,
        "per_class_iou": per_class_iou,
        "per_class_ap": {c: float(rng.uniform(0.2, 1.0)) for c in CLASSES},
    }


@pytest.fixture()
def metrics():
    return {
        "dataset": {"root": "/data/coco_dev", "images": 464, "pairs_target": 313, "pairs_base": 1059},
        "methods": {"attention": _method(0, 0.4), "saliency-prior": _method(1, 0.3456)},
        "reference": {
            "clipseg_architecture": {"ms_per_forward": 250.0, "params_millions": 150.7, "note": "random weights"},
            "whole_image_mask": {
                "concept_miou": {"target": 0.111, "base": 0.222, "h": 0.148},
                "concept_miou_lenient": {"target": 0.05, "base": 0.06, "h": 0.0545},
            },
        },
        "environment": {"device": "cpu", "torch": "2.13.0", "threads": 8, "date": "2025-01-01"},
    }


@pytest.fixture()
def pr_curves():
    rng = np.random.default_rng(3)
    curves = {}
    for m, shift in (("attention", 0.8), ("saliency-prior", 0.3)):
        curves[m] = {}
        for c in CLASSES:
            labels = rng.random(60) < 0.3
            scores = rng.random(60) + shift * labels
            precision, recall, _ = precision_recall_curve(scores, labels)
            curves[m][c] = (precision, recall)
    # a class with no positive image: NaN recall must not break the plot
    precision, recall, _ = precision_recall_curve([0.2, 0.1], [0, 0])
    curves["attention"][BASE_CLASSES[10]] = (precision, recall)
    return curves


def test_format_table(metrics):
    table = format_table(metrics)
    lines = table.splitlines()
    assert "attention" in table and "saliency-prior" in table
    assert "0.400" in table and "0.346" in table and "0.612" in table  # 3 decimals
    assert "n/a" in table  # NaN AP
    assert "123.5" in table and "7.9" in table
    assert "250.0 ms" in table and "0.148" in table
    # aligned: the header, rule and method rows have the same width
    assert len({len(line) for line in lines[:4]}) == 1


def test_format_table_needs_methods():
    with pytest.raises(ValueError, match="methods"):
        format_table({"methods": {}})


def test_write_report(tmp_path, metrics, pr_curves):
    out = tmp_path / "new" / "report"
    paths = write_report(out, metrics, pr_curves)
    assert set(paths) == {"metrics", "report", "per_class_iou", "presence_pr"}
    for path in paths.values():
        assert path.is_file() and path.parent == out
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    text = paths["metrics"].read_text()
    assert "NaN" not in text
    loaded = json.loads(text)
    assert loaded["methods"]["attention"]["presence_ap"]["base"] is None
    assert loaded["methods"]["attention"]["per_class_iou"][CLASSES[1]] is None
    assert loaded["methods"]["attention"]["presence_ap"]["target"] == pytest.approx(0.61234)
    assert loaded["dataset"] == metrics["dataset"]
    assert loaded["reference"] == metrics["reference"]

    for key in ("per_class_iou", "presence_pr"):
        assert paths[key].stat().st_size > 10_000
        with Image.open(paths[key]) as image:
            image.verify()
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and min(image.size) > 300
            assert len(image.convert("RGB").getcolors(1 << 20)) > 20  # not a blank canvas

    report = paths["report"].read_text()
    assert "| attention |" in report and "0.400" in report
    assert "per_class_iou.png" in report and "presence_pr.png" in report
    assert report.index("Target classes") < report.index("Base classes")
    assert f"| {TARGET_CLASSES[0]} |" in report and f"| {BASE_CLASSES[0]} |" in report


def test_write_report_overwrites_and_accepts_no_curves(tmp_path, metrics):
    write_report(tmp_path, metrics, {})
    metrics["methods"]["attention"]["ms_per_image"] = 1.0
    paths = write_report(tmp_path, metrics, None)
    assert json.loads(paths["metrics"].read_text())["methods"]["attention"]["ms_per_image"] == 1.0
    assert paths["presence_pr"].stat().st_size > 0


def test_import_has_no_backend_side_effect():
    import subprocess
    import sys

    code = "import sys, ovseg.app.report; print('matplotlib.pyplot' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_many_methods_get_a_heat_map_instead_of_bars(tmp_path, metrics, monkeypatch):
    from ovseg.app import report

    calls = []
    heatmap = report._plot_per_class_heatmap
    monkeypatch.setattr(report, "_plot_per_class_heatmap", lambda methods: calls.append(len(methods)) or heatmap(methods))
    write_report(tmp_path / "two", metrics)
    assert calls == []  # two methods: grouped bars
    many = {f"cls_saliency[variant=v{i},grabcut=on]": _method(i, 0.1 * i) for i in range(report.MAX_BAR_METHODS + 2)}
    metrics["methods"] = many
    paths = write_report(tmp_path / "many", metrics)
    assert calls == [len(many)]
    heat = Image.open(paths["per_class_iou"])
    assert heat.width > heat.height  # one row per method, one column per class
    assert np.asarray(heat.convert("RGB")).std() > 10  # drawn, not blank
