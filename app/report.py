"""Write evaluation results: a plain-text table, metrics.json, report.md and two plots.

The eval runner builds a `metrics` dict::

    {
      "dataset": {"root": str, "images": int, "pairs_target": int, "pairs_base": int},
      "methods": {name: {
          "concept_miou": {"target": float, "base": float, "h": float},      # strict: the headline
          "concept_miou_lenient": {"target": float, "base": float, "h": float},  # unlabelled pixels ignored
          "acceptance": {"target_0.5": float, "target_0.75": float, "base_0.5": float, "base_0.75": float},
          "presence_ap": {"target": float, "base": float, "h": float},
          "presence_ap_held_out": {"target": float, "base": float, "h": float},
          "ms_per_image": float, "ms_per_concept": float, "images_per_second": float,
          "per_class_iou": {class_name: float},
          "per_class_ap": {class_name: float},
      }},
      "reference": {"clipseg_architecture": {"ms_per_forward": float, "params_millions": float, "note": str},
                    "whole_image_mask": {"concept_miou": {...}, "concept_miou_lenient": {...}}},
      "environment": {"device": str, "torch": str, "threads": int, "date": str},
      "protocol": [str, ...],   # optional: replaces the default protocol lines of report.md
    }

and, separately, PR curves `{method: {class_name: (precision array, recall array)}}` as returned by
`ovseg.core.ops.metrics.precision_recall_curve`. Scores are in [0, 1] and NaN where undefined; NaN is written
as `null` in JSON and `n/a` in tables. Every file is written atomically (temp file + os.replace).
Plots are drawn on `matplotlib.figure.Figure` with the Agg canvas: no pyplot, no global backend state.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ovseg.core.cache import atomic_write_bytes
from ovseg.train.coco import BASE_CLASSES, TARGET_CLASSES

logger = logging.getLogger(__name__)

__all__ = ["format_table", "write_report"]

_SCORE_COLUMNS = (
    # (header, section, key)
    ("mIoU tgt", "concept_miou", "target"),
    ("tgt held-out", "concept_miou", "target_held_out"),
    ("mIoU base", "concept_miou", "base"),
    ("base held-out", "concept_miou", "base_held_out"),
    ("mIoU h", "concept_miou", "h"),
    ("IoU>=.5 tgt", "acceptance", "target_0.5"),
    ("IoU>=.5 base", "acceptance", "base_0.5"),
    ("lenient h", "concept_miou_lenient", "h"),
    ("AP tgt", "presence_ap", "target"),
    ("AP base", "presence_ap", "base"),
    ("AP tgt held-out", "presence_ap_held_out", "target"),
    ("AP base held-out", "presence_ap_held_out", "base"),
)
_TIME_COLUMNS = (("ms/image", "ms_per_image"), ("ms/concept", "ms_per_concept"))

_DEFAULT_PROTOCOL = (
    "Images: every image of the data set; concepts: the 17 target (held out of training) and 48 base COCO "
    "thing classes.",
    "Concept mIoU (strict, the headline): each method segments each (image, class present) pair; IoU with the "
    "union of the class's masks over all pixels (COCO annotates every instance of its thing classes, so a pixel "
    "outside them is not the class; only the class's own crowd regions are ignored), averaged over pairs.",
    "IoU>=.5: the share of pairs with strict IoU at least 0.5 (a mask a person would keep); metrics.json also "
    "has the share at 0.75.",
    "Base held-out: base-class mIoU over the images `ovseg train` holds out (20%, seed 0): images no "
    "trained part has seen.",
    "Lenient mIoU: the older rule, IoU over the annotated pixels only (unlabelled pixels ignored); it flatters "
    "big masks.",
    "Presence AP: per class, the image-level score of the concept ranks all images (positive: the class has "
    "an instance), non-interpolated AP averaged over classes; h is the harmonic mean of target and base. "
    "'Held-out' ranks only the images training held out (a trained method may remember the training "
    "images' tags).",
    "Timing: ms/image is the median of `set_image` (decode, resize, backbone, once per image); ms/concept the "
    "median per word (maps and mask, over the classes present) once the image is set; one forward of the "
    "CLIPSeg architecture (random weights) is timed in the same run as a reference, on the device listed above.",
)


# ---------------------------------------------------------------------------------------------------- values


def _number(value: Any) -> float:
    """float of value; NaN for None, missing or non-numeric values."""
    if value is None or isinstance(value, bool):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(value: Any, decimals: int = 3) -> str:
    number = _number(value)
    if math.isnan(number):
        return "n/a"
    return f"{number:.{decimals}f}"


def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, Mapping) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def _methods(metrics: Mapping) -> Mapping[str, Mapping]:
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
    methods = metrics.get("methods")
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError("metrics['methods'] must be a non-empty dict {method name: results}")
    return methods


def _to_jsonable(value: Any) -> Any:
    """Plain JSON types: NaN/inf -> None, numpy scalars and arrays -> Python numbers and lists, Path -> str."""
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _to_jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"metrics holds a value of type {type(value).__name__} that JSON cannot store: {value!r}")


# ---------------------------------------------------------------------------------------------------- tables


def _rows(metrics: Mapping) -> tuple[list[str], list[list[str]]]:
    header = ["method"] + [c[0] for c in _SCORE_COLUMNS] + [c[0] for c in _TIME_COLUMNS]
    rows = []
    for name, result in _methods(metrics).items():
        row = [str(name)]
        row += [_fmt(_get(result, section, key)) for _, section, key in _SCORE_COLUMNS]
        row += [_fmt(_get(result, key), 1) for _, key in _TIME_COLUMNS]
        rows.append(row)
    return header, rows


def _reference_lines(metrics: Mapping) -> list[str]:
    lines = []
    clipseg = _get(metrics, "reference", "clipseg_architecture")
    if isinstance(clipseg, Mapping):
        text = (
            f"Reference, CLIPSeg architecture: {_fmt(clipseg.get('ms_per_forward'), 1)} ms per forward, "
            f"{_fmt(clipseg.get('params_millions'), 1)} M parameters"
        )
        if clipseg.get("note"):
            text += f" ({clipseg['note']})"
        lines.append(text)
    whole = _get(metrics, "reference", "whole_image_mask")
    if isinstance(whole, Mapping):
        miou = whole.get("concept_miou") or {}
        lenient = whole.get("concept_miou_lenient") or {}
        lines.append(
            "Reference, whole-image mask: concept mIoU "
            f"tgt {_fmt(_get(miou, 'target'))} / base {_fmt(_get(miou, 'base'))} / h {_fmt(_get(miou, 'h'))}, "
            f"lenient h {_fmt(_get(lenient, 'h'))}"
        )
    return lines


def format_table(metrics: Mapping) -> str:
    """A plain-text table, one row per method, then the reference lines.

    Columns: strict concept mIoU target/base/h, the share of pairs with IoU >= 0.5, lenient mIoU h, presence AP
    target/base (3 decimals), ms/image and ms/concept (1 decimal). Missing or NaN values read `n/a`.

    Raises:
        ValueError: metrics has no non-empty "methods" dict.
    """
    header, rows = _rows(metrics)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first] + rest).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out += _reference_lines(metrics)
    return "\n".join(out)


def _markdown_table(header: list[str], rows: list[list[str]], align_left: int = 1) -> list[str]:
    aligns = [":---"] * align_left + ["---:"] * (len(header) - align_left)
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _class_groups(methods: Mapping[str, Mapping], key: str) -> list[tuple[str, list[str]]]:
    """[(group title, class names)] for target, base and any other class found under `key`."""
    seen: list[str] = []
    for result in methods.values():
        for name in _get(result, key) or {}:
            if name not in seen:
                seen.append(name)
    groups = [
        ("target", [c for c in TARGET_CLASSES if c in seen]),
        ("base", [c for c in BASE_CLASSES if c in seen]),
        ("other", [c for c in seen if c not in TARGET_CLASSES and c not in BASE_CLASSES]),
    ]
    return [(title, names) for title, names in groups if names]


def _calibration_section(methods: Mapping[str, Mapping]) -> list[str]:
    """A reliability diagram per method, as a table: base classes on the held-out images, by presence score."""
    rows = []
    for m, r in methods.items():
        cal = r.get("presence_calibration_held_out_base") or {}
        for b in cal.get("bins", []):
            rows.append([m, f"{b['bin'][0]:.1f}-{b['bin'][1]:.1f}", str(b["pairs"]), _fmt(b["mean_score"]),
                         _fmt(b["share_present"]), _fmt(cal.get("brier"))])
    if not rows:
        return []
    lines = ["", "## Presence calibration (base classes, held-out images)", "",
             "A presence score that is a probability has its share present near its mean score in every bin.", ""]
    return lines + _markdown_table(["method", "score bin", "pairs", "mean score", "share present", "Brier"], rows,
                                   align_left=2)


def _attention_section(methods: Mapping[str, Mapping]) -> list[str]:
    """Concept Mask's Table 1 measures for every method with attention priors, and every method's mask
    precision / recall (the binary mask, per pair, over every pixel but the class's crowd regions)."""
    lines = ["", "## Masks: precision and recall", ""]
    rows = [[m, _fmt(_get(r, "mask_precision", "target")), _fmt(_get(r, "mask_recall", "target")),
             _fmt(_get(r, "concept_miou", "target")), _fmt(_get(r, "mask_precision", "base")),
             _fmt(_get(r, "mask_recall", "base")), _fmt(_get(r, "concept_miou", "base"))]
            for m, r in methods.items()]
    lines += _markdown_table(["method", "precision target", "recall target", "IoU target", "precision base",
                              "recall base", "IoU base"], rows)
    rows = []
    for m, r in methods.items():
        for kind, a in (r.get("attention") or {}).items():
            rows.append([m, kind, _fmt(_get(a, "pointing_game", "target")), _fmt(_get(a, "soft_iou", "target")),
                         _fmt(_get(a, "pointing_game", "base")), _fmt(_get(a, "soft_iou", "base"))])
    if rows:
        lines += ["", "## Attention maps (Concept Mask's Table 1 measures)", "",
                  "Pointing game: the share of (image, class) pairs whose map peaks inside the class's mask, "
                  "averaged per class; soft IoU: eq. 5, sum(a * G) / sum(max(a, G)) over the labelled pixels.", ""]
        lines += _markdown_table(["method", "map", "pointing target", "soft IoU target", "pointing base",
                                  "soft IoU base"], rows, align_left=2)
    return lines


def _report_markdown(metrics: Mapping, files: Mapping[str, str]) -> str:
    methods = _methods(metrics)
    header, rows = _rows(metrics)
    lines = ["# Evaluation report", ""]
    dataset = metrics.get("dataset") or {}
    if dataset:
        lines += [
            f"Data set `{dataset.get('root', '?')}`: {dataset.get('images', '?')} images, "
            f"{dataset.get('pairs_target', '?')} target and {dataset.get('pairs_base', '?')} base "
            "(image, class) pairs"
            + (f"; base classes segmented only on the {dataset.get('held_out_images', '?')} images held out of "
               "training (target classes on every image)" if dataset.get("base_on_held_out_only") else
               f"; 'base held-out' averages the base pairs of the {dataset.get('held_out_images', '?')} "
               "images held out of training")
            + "; 'tgt held-out' averages the target pairs of the held-out images only (XPM trains on "
              "caption pseudo-labels of the others).",
            "",
        ]
        skipped = dataset.get("skipped_images") or []
        if skipped:  # images that could not be read: left out of every figure, each named
            lines += [f"**{len(skipped)} image{'s' if len(skipped) > 1 else ''} skipped** (could not be read; left "
                      "out of every figure):", ""]
            lines += [f"- `{s.get('file', '?')}` (id {s.get('id', '?')}): {s.get('why', '?')}" for s in skipped]
            lines += [""]
    lines += _markdown_table(header, rows)
    lines += [""] + [f"{text}  " for text in _reference_lines(metrics)]
    env = metrics.get("environment") or {}
    if env:
        lines += [
            "",
            "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        ]

    lines += _attention_section(methods)
    lines += _calibration_section(methods)
    lines += ["", "## Protocol", ""]
    protocol = metrics.get("protocol") or _DEFAULT_PROTOCOL
    lines += [f"{i}. {text}" for i, text in enumerate(protocol, 1)]

    names = list(methods)
    lines += ["", "## Per-class IoU", ""]
    for title, classes in _class_groups(methods, "per_class_iou"):
        lines += [f"### {title.capitalize()} classes", ""]
        table_rows = [
            [c] + [_fmt(_get(methods[m], "per_class_iou", c)) for m in names] for c in classes
        ]
        lines += _markdown_table(["class"] + names, table_rows) + [""]

    lines += ["## Plots", ""]
    lines += [f"- [Per-class IoU]({files['per_class_iou']})", f"- [Presence PR curves]({files['presence_pr']})"]
    lines += ["", f"![Per-class IoU]({files['per_class_iou']})", "", f"![Presence PR curves]({files['presence_pr']})"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _method_colours(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


MAX_BAR_METHODS = 4  # more methods than this (an ablation) are drawn as a heat map instead of bars


def _plot_per_class_heatmap(methods: Mapping[str, Mapping]) -> bytes:
    """A heat map per class group (target on top): one row per method, one column per class, and first
    the group's mean over its classes (not over pairs, as the concept mIoU is); each cell shows its IoU."""
    names = list(methods)
    groups = _class_groups(methods, "per_class_iou") or [("target", [])]
    widest = max(len(classes) for _, classes in groups) + 1
    figure = _new_figure(max(8.0, 1.6 + 0.42 * widest + 0.07 * max(len(n) for n in names)),
                         1.0 + sum(0.9 + 0.32 * len(names) for _ in groups))
    axes = figure.subplots(len(groups), 1, squeeze=False)[:, 0]
    image = None
    for ax, (title, classes) in zip(axes, groups):
        columns = ["mean"] + classes
        values = np.array([[_nanmean(methods[m], classes)] + [_number(_get(methods[m], "per_class_iou", c))
                                                              for c in classes] for m in names])
        image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            text = "" if math.isnan(v) else f"{v:.2f}"[1:] if v < 1 else "1"
            ax.text(j, i, text, ha="center", va="center", fontsize=6,
                    color="black" if not math.isnan(v) and v > 0.6 else "white")
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.axvline(0.5, color="white", linewidth=2)
        ax.set_title(f"{title.capitalize()} classes ({len(classes)}): concept IoU per class "
                     "(first column: mean over its classes)", fontsize=9, loc="left")
    figure.colorbar(image, ax=list(axes), shrink=0.6, label="IoU (unlabelled pixels ignored)")
    return _png_bytes(figure)


def _plot_per_class_iou(methods: Mapping[str, Mapping]) -> bytes:
    """Horizontal grouped bars, one panel per class group (target on top), one colour per method; a heat
    map when there are more than MAX_BAR_METHODS methods."""
    from matplotlib.patches import Patch

    if len(methods) > MAX_BAR_METHODS:
        return _plot_per_class_heatmap(methods)

    names = list(methods)
    colours = _method_colours(names)
    groups = _class_groups(methods, "per_class_iou") or [("target", [])]
    n_classes = sum(len(classes) for _, classes in groups)
    slot = max(0.22, 0.11 * len(names))  # inches per class
    figure = _new_figure(8.0, 1.4 + slot * n_classes + 0.5 * len(groups))
    axes = figure.subplots(
        len(groups), 1, squeeze=False, sharex=True,
        gridspec_kw={"height_ratios": [max(len(c), 1) + 1.5 for _, c in groups]},
    )[:, 0]
    bar = 0.8 / max(len(names), 1)
    for ax, (title, classes) in zip(axes, groups):
        y = np.arange(len(classes))
        for j, method in enumerate(names):
            values = np.array([_number(_get(methods[method], "per_class_iou", c)) for c in classes])
            offsets = y - 0.4 + bar * (j + 0.5)
            ax.barh(offsets, np.nan_to_num(values, nan=0.0), height=bar, color=colours[method])
            for off, v in zip(offsets, values):
                if math.isnan(v):
                    ax.text(0.005, off, "n/a", va="center", fontsize=6, color="0.4")
            mean = _nanmean(methods[method], classes) if classes else float("nan")
            if not math.isnan(mean):
                ax.axvline(mean, color=colours[method], linestyle="--", linewidth=1.2, alpha=0.9)
        ax.set_yticks(y, classes, fontsize=8)
        ax.set_ylim(len(classes) - 0.5, -0.5)  # first class on top
        ax.set_xlim(0, 1)
        ax.grid(axis="x", color="0.88", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.set_title(f"{title.capitalize()} classes ({len(classes)}); dashed: mean over classes",
                     loc="left", fontsize=9, fontweight="bold")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if title == "target":
            ax.set_facecolor("#fff6e8")
    axes[-1].set_xlabel("IoU (annotated pixels only)")
    axes[-1].tick_params(axis="x", labelbottom=True)
    figure.suptitle("Per-class concept IoU", x=0.01, ha="left", fontsize=11, fontweight="bold")
    handles = [Patch(color=colours[m], label=m) for m in names]
    figure.legend(handles=handles, loc="outside upper right", ncol=min(len(names), 4), fontsize=8, frameon=False)
    return _png_bytes(figure)


def _nanmean(result: Mapping, classes: list[str]) -> float:
    """Mean per-class IoU of one method over `classes`, NaN values skipped (NaN if all are)."""
    values = [_number(_get(result, "per_class_iou", c)) for c in classes]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _interpolated_precision(precision, recall, grid: np.ndarray) -> np.ndarray | None:
    """Interpolated precision max_{r' >= r} p(r') on the recall grid; None when the curve is undefined."""
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    if precision.shape != recall.shape or precision.size == 0:
        raise ValueError(
            f"a PR curve needs precision and recall of equal length, got {precision.shape} and {recall.shape}"
        )
    keep = np.isfinite(precision) & np.isfinite(recall)
    if not keep[:-1].any():
        return None
    precision, recall = precision[keep], recall[keep]
    order = np.argsort(recall, kind="mergesort")
    recall, precision = recall[order], precision[order]
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # max precision at recall >= r
    idx = np.searchsorted(recall, grid, side="left")
    out = np.zeros_like(grid)
    inside = idx < recall.size
    out[inside] = envelope[idx[inside]]
    return out


def _plot_presence_pr(metrics: Mapping, pr_curves: Mapping[str, Mapping]) -> bytes:
    """One panel per method: faint per-class curves, bold interpolated mean per class group."""
    methods = _methods(metrics)
    names = list(dict.fromkeys(list(methods) + list(pr_curves)))
    grid = np.linspace(0.0, 1.0, 101)
    group_colour = {"target": "#d95f02", "base": "#1b9e77", "other": "#7570b3"}
    cols = min(len(names), 3)
    rows = int(math.ceil(len(names) / cols))
    figure = _new_figure(4.2 * cols, 4.0 * rows + 0.4)
    axes = figure.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, method in zip(axes.flat, names):
        curves = pr_curves.get(method) or {}
        by_group: dict[str, list[np.ndarray]] = {}
        for cls, curve in curves.items():
            group = "target" if cls in TARGET_CLASSES else "base" if cls in BASE_CLASSES else "other"
            precision, recall = curve[0], curve[1]
            precision = np.asarray(precision, dtype=np.float64)
            recall = np.asarray(recall, dtype=np.float64)
            if not np.isfinite(recall[:-1]).any():
                continue
            ax.plot(recall, precision, drawstyle="steps-post", color=group_colour[group], alpha=0.18, linewidth=0.7)
            interp = _interpolated_precision(precision, recall, grid)
            if interp is not None:
                by_group.setdefault(group, []).append(interp)
        for group in ("target", "base", "other"):
            if group not in by_group:
                continue
            mean = np.mean(by_group[group], axis=0)
            ap = _get(methods.get(method, {}), "presence_ap", group)
            label = f"{group} mean ({len(by_group[group])} classes)"
            if ap is not None:
                label += f", AP {_fmt(ap)}"
            ax.plot(grid, mean, color=group_colour[group], linewidth=2.4, label=label)
        if not curves:
            ax.text(0.5, 0.5, "no PR curves", ha="center", va="center", color="0.4", transform=ax.transAxes)
        ax.set_title(method, fontsize=10, fontweight="bold")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(color="0.9", linewidth=0.8)
        ax.set_aspect("equal", adjustable="box")
        if by_group:
            ax.legend(loc="lower left", fontsize=7.5, frameon=True, framealpha=0.85)
    for ax in axes[-1, :]:
        ax.set_xlabel("recall")
    for ax in axes[:, 0]:
        ax.set_ylabel("precision")
    figure.suptitle(
        "Concept presence: precision-recall per class (faint) and interpolated mean (bold)",
        fontsize=10, fontweight="bold",
    )
    return _png_bytes(figure)


# ---------------------------------------------------------------------------------------------------- files


def write_report(out_dir, metrics: Mapping, pr_curves: Mapping[str, Mapping] | None = None) -> dict[str, Path]:
    """Write metrics.json, report.md, per_class_iou.png and presence_pr.png into out_dir (created if missing).

    Args:
        out_dir: the output folder.
        metrics: the eval runner's dict (see the module docstring); NaN values are written as null.
        pr_curves: {method: {class name: (precision array, recall array)}}; None or {} draws empty panels.

    Returns:
        {"metrics": .../metrics.json, "report": .../report.md, "per_class_iou": .../per_class_iou.png,
         "presence_pr": .../presence_pr.png}

    Raises:
        ValueError: metrics has no non-empty "methods" dict, or a PR curve is malformed.
        TypeError: metrics holds a value JSON cannot store.
    """
    methods = _methods(metrics)
    pr_curves = pr_curves or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": out_dir / "metrics.json",
        "report": out_dir / "report.md",
        "per_class_iou": out_dir / "per_class_iou.png",
        "presence_pr": out_dir / "presence_pr.png",
    }

    payload = json.dumps(_to_jsonable(metrics), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(paths["metrics"], payload.encode("utf-8"))
    atomic_write_bytes(paths["per_class_iou"], _plot_per_class_iou(methods))
    atomic_write_bytes(paths["presence_pr"], _plot_presence_pr(metrics, pr_curves))
    relative = {key: path.name for key, path in paths.items()}
    atomic_write_bytes(paths["report"], _report_markdown(metrics, relative).encode("utf-8"))
    logger.info("report written to %s", out_dir)
    return paths
