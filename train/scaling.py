"""`ovseg scaling METHOD`: does more data pay? Train METHOD on nested shares of the training split
(`--fraction`: 0.25 is inside 0.5, which is inside 1) with the same settings, score each checkpoint with
`ovseg eval`'s protocol on the held-out images (strict concept mIoU, target and base classes apart), and
draw every method studied in the output folder on one plot (scaling.png).

A trainer takes part when it accepts `--fraction` and its method reads `checkpoint=FOLDER`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ovseg.core.cache import atomic_write_bytes, atomic_write_json
from ovseg.train.registry import trainers

log = logging.getLogger(__name__)


def parse_fractions(text: str) -> list[float]:
    try:
        out = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--fractions must be comma-separated numbers in (0, 1], got {text!r}") from None
    if not out or not all(0.0 < f <= 1.0 for f in out):
        raise ValueError(f"--fractions must be comma-separated numbers in (0, 1], got {text!r}")
    return out


def trainer_args(method: str, fraction: float, out: Path, extra: list[str]) -> argparse.Namespace:
    """The trainer's own parser on `extra` plus --fraction and --out (so its defaults apply)."""
    trainer = trainers().get(method)
    if trainer is None:
        raise ValueError(f"no trainer {method!r}; trainers: {', '.join(trainers())}")
    parser = argparse.ArgumentParser(prog=f"ovseg train {method}")
    trainer.add_arguments(parser)
    if not any(a.dest == "fraction" for a in parser._actions):
        raise ValueError(f"`ovseg train {method}` has no --fraction yet, so it cannot be studied")
    args = parser.parse_args([*extra, "--fraction", str(fraction), "--out", str(out)])
    args.method = method
    return args


def trained_folder(ckpt: Path) -> Path | None:
    """The folder a trainer wrote under --out `ckpt`: `ckpt` itself, or the one model folder inside it (a
    trainer such as cls_saliency writes <out>/<variant>/); None when nothing finished there."""
    if (ckpt / "training.json").is_file():
        return ckpt
    inside = [d for d in sorted(ckpt.glob("*/training.json"))] if ckpt.is_dir() else []
    return inside[0].parent if len(inside) == 1 else None


def study(method: str, fractions: list[float], out_dir: str | Path, coco_dir: str, extra: list[str],
          progress: bool = True) -> dict:
    """Train and score METHOD at each fraction (a fraction whose checkpoint and scores exist is reused);
    writes out_dir/<method>/scaling.json and redraws out_dir/scaling.png."""
    from ovseg.train.evaluate import evaluate

    out_dir = Path(out_dir)
    folder = out_dir / method
    record_path = folder / "scaling.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"method": method, "rows": {}}
    for f in fractions:
        key = f"{f:g}"
        ckpt = folder / f"fraction-{key}"
        row = record["rows"].get(key)
        trained = trained_folder(ckpt)
        if row and trained and row.get("extra") == extra:
            log.info("%s at %s: already measured", method, key)
            continue
        if trained and not row:  # trained already (by hand, or an interrupted study)
            log.info("%s at %s: scoring the checkpoint already in %s", method, key, trained)
            seconds = json.loads((trained / "training.json").read_text()).get("seconds")
            train_s = seconds.get("total", seconds.get("training")) if isinstance(seconds, dict) else None
        else:
            t0 = time.perf_counter()
            trainers()[method].run(trainer_args(method, f, ckpt, extra))
            train_s = time.perf_counter() - t0
            trained = trained_folder(ckpt)
            if trained is None:
                raise ValueError(f"`ovseg train {method} --out {ckpt}` left no training.json there")
        spec = f"{method}[checkpoint={trained}]"
        metrics, _ = evaluate(coco_dir, [spec], progress=progress, reference=False, held_out_only=True)
        m = metrics["methods"][spec]
        summary = json.loads((trained / "training.json").read_text())
        images = summary.get("data", {}).get("images") if isinstance(summary.get("data"), dict) else None
        if images is None:  # the trainer does not count them: the share of the default training split
            from ovseg.train.coco import CocoConceptDataset, fraction_of, split_image_ids

            images = len(fraction_of(split_image_ids(CocoConceptDataset(coco_dir).image_ids)[0], f))
        record["rows"][key] = {"fraction": f, "images": images, "extra": extra,
                               "miou_target": round(m["concept_miou"]["target"], 4),
                               "miou_base": round(m["concept_miou"]["base"], 4),
                               "held_out_images": metrics["dataset"]["images"],
                               "train_seconds": round(train_s, 1) if train_s is not None else None}
        atomic_write_json(record_path, record)
    plot(out_dir)
    return record


def plot(out_dir: str | Path) -> Path:
    """scaling.png: strict held-out mIoU against the share of training images, target (solid) and base
    (dashed), one colour per method studied in out_dir."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    top = 0.1
    for i, path in enumerate(sorted(out_dir.glob("*/scaling.json"))):
        rec = json.loads(path.read_text())
        rows = sorted(rec["rows"].values(), key=lambda r: r["fraction"])
        x = [100 * r["fraction"] for r in rows]
        color = f"C{i}"
        ax.plot(x, [r["miou_target"] for r in rows], "o-", color=color, label=f"{rec['method']} target")
        ax.plot(x, [r["miou_base"] for r in rows], "s--", color=color, label=f"{rec['method']} base")
        top = max([top] + [r["miou_target"] for r in rows] + [r["miou_base"] for r in rows])
    ax.set_xlabel("share of the training images (%)")
    ax.set_ylabel("strict concept mIoU, held-out images")
    ax.set_xticks([25, 50, 75, 100])
    ax.set_ylim(0, 1.5 * top)  # from zero: small differences are not drawn as slopes
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Does more data pay? (ovseg scaling)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(out_dir / "scaling.png", buf.getvalue())
