"""`ovseg scaling`: fractions parsed and checked, every registered trainer with --fraction can be studied, a
study trains and scores each share once (a measured share is reused), and the plot is drawn."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from ovseg.train import scaling
from ovseg.train.registry import _TRAINERS, register_trainer


def test_fractions_are_sorted_and_checked():
    assert scaling.parse_fractions("1,0.25, 0.5") == [0.25, 0.5, 1.0]
    for bad in ("0", "1.5", "a", ""):
        with pytest.raises(ValueError, match="--fractions"):
            scaling.parse_fractions(bad)


def test_ovsegmentor_takes_a_fraction_and_a_trainer_without_one_is_refused():
    args = scaling.trainer_args("ovsegmentor", 0.25, "runs/x", ["--no-ablation"])
    assert args.fraction == 0.25 and args.no_ablation and args.out == "runs/x" and args.method == "ovsegmentor"
    with pytest.raises(ValueError, match="no --fraction"):
        scaling.trainer_args("fused", 0.5, "runs/x", [])
    with pytest.raises(ValueError, match="no trainer 'nope'"):
        scaling.trainer_args("nope", 0.5, "runs/x", [])


def test_a_study_trains_each_share_once_scores_it_and_draws_the_plot(tmp_path, monkeypatch):
    runs = []

    def add_arguments(p: argparse.ArgumentParser):
        p.add_argument("--fraction", type=float, default=1.0)
        p.add_argument("--out")
        p.add_argument("--epochs", type=int, default=3)

    def run(args):
        runs.append((args.fraction, args.epochs))
        out = tmp_path / "study" / "toy" / f"fraction-{args.fraction:g}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "training.json").write_text(json.dumps({"data": {"images": int(100 * args.fraction)}}))
        return out

    def fake_evaluate(root, methods, **kw):
        frac = float(methods[0].split("fraction-")[1].rstrip("]"))
        return ({"methods": {methods[0]: {"concept_miou": {"target": 0.1 + 0.1 * frac, "base": 0.2 * frac}}},
                 "dataset": {"images": 93}}, {})

    monkeypatch.setitem(_TRAINERS, "toy", None)
    register_trainer("toy", "a toy trainer", add_arguments, run) if _TRAINERS.pop("toy") is None else None
    monkeypatch.setattr("ovseg.train.evaluate.evaluate", fake_evaluate)
    try:
        rec = scaling.study("toy", [0.5, 1.0], tmp_path / "study", "coco", ["--epochs", "1"], progress=False)
        assert runs == [(0.5, 1), (1.0, 1)]
        assert rec["rows"]["0.5"]["miou_target"] == pytest.approx(0.15) and rec["rows"]["1"]["images"] == 100
        rec = scaling.study("toy", [0.25, 0.5, 1.0], tmp_path / "study", "coco", ["--epochs", "1"], progress=False)
        assert runs[2:] == [(0.25, 1)] and sorted(rec["rows"]) == ["0.25", "0.5", "1"]  # measured shares reused
        done = tmp_path / "study" / "toy" / "fraction-0.75"  # trained by hand: scored, not trained again
        done.mkdir()
        (done / "training.json").write_text(json.dumps({"data": {"images": 75}, "seconds": {"total": 12.0}}))
        rec = scaling.study("toy", [0.75], tmp_path / "study", "coco", ["--epochs", "1"], progress=False)
        assert len(runs) == 3 and rec["rows"]["0.75"]["train_seconds"] == 12.0
        png = np.asarray(Image.open(tmp_path / "study" / "scaling.png"))
        assert png.shape[0] > 300 and png.shape[1] > 500 and png.std() > 10
    finally:
        _TRAINERS.pop("toy", None)


def test_fractions_of_the_training_split_are_nested_and_keep_the_order():
    from ovseg.train.coco import fraction_of

    ids = list(range(100, 300))
    quarter, half, whole = (fraction_of(ids, f, seed=3) for f in (0.25, 0.5, 1.0))
    assert len(quarter) == 50 and len(half) == 100 and whole == ids
    assert set(quarter) <= set(half) and quarter == sorted(quarter) and half == sorted(half)
    assert fraction_of(ids, 0.25, seed=4) != quarter  # the seed picks them
    with pytest.raises(ValueError, match="--fraction"):
        fraction_of(ids, 0.0)


def test_a_trainer_that_writes_a_model_folder_inside_out_is_scored_from_that_folder(tmp_path):
    ckpt = tmp_path / "fraction-0.5"
    assert scaling.trained_folder(ckpt) is None  # nothing there yet
    (ckpt / "sem2c_neg.resume").mkdir(parents=True)  # an interrupted run's state is not a model
    assert scaling.trained_folder(ckpt) is None
    (ckpt / "sem2c_neg").mkdir()
    (ckpt / "sem2c_neg" / "training.json").write_text("{}")
    assert scaling.trained_folder(ckpt) == ckpt / "sem2c_neg"
    (ckpt / "training.json").write_text("{}")  # a trainer writing into --out itself wins
    assert scaling.trained_folder(ckpt) == ckpt
    args = scaling.trainer_args("cls_saliency", 0.25, tmp_path / "x", ["--epochs", "1"])
    assert args.fraction == 0.25 and args.epochs == 1 and args.resume is False and args.device == "auto"
