"""The Review tab: approve, reject or repaint a labelled dataset's pseudo-masks, and retrain from them."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

from ovseg.app.webapp.common import error_status, md
from ovseg.app.webapp.engine import Engine
from ovseg.core.errors import OvsegError


NEW_MASK = -1  # the pseudo-mask chooser's value for "paint a new pseudo-mask"
REVIEW_READY = "Pick a dataset labelled with `ovseg label`, then a sample and one of its pseudo-masks."
NO_DATASETS = ("No labelled dataset yet: create one with `ovseg label SOURCE --dataset NAME`, then press "
               "**Refresh**.")
# Brush colours of the mask editor: the object's mask, and strokes that mark background for GrabCut.
MASK_COLOUR = "#e6194b"
BACKGROUND_COLOUR = "#4363d8"
PAINT_ALPHA = 0.55


_png_dir: str | None = None


def png_file(array) -> str:
    """The image as a PNG file named by its content, in a folder of this process's (removed at exit).

    The Review tab hands gradio files, not arrays: gradio rewrites its cached copy of an array each time one
    with the same content is sent again, and a browser fetching that copy meanwhile gets a truncated file
    (and the server log a traceback); a file it copies into its cache once."""
    global _png_dir
    import atexit
    import hashlib
    import shutil
    import tempfile

    import cv2
    import numpy as np

    array = np.ascontiguousarray(array)
    code = cv2.COLOR_RGBA2BGRA if array.ndim == 3 and array.shape[2] == 4 else cv2.COLOR_RGB2BGR
    ok, data = cv2.imencode(".png", cv2.cvtColor(array, code))
    if not ok:
        raise OvsegError("could not encode an image for the browser")
    if _png_dir is None:
        _png_dir = tempfile.mkdtemp(prefix="ovseg-review-")
        atexit.register(shutil.rmtree, _png_dir, True)
    path = Path(_png_dir) / f"{hashlib.sha256(data.tobytes()).hexdigest()[:32]}.png"
    if not path.exists():
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, path)
    return str(path)


def _hex_rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def mask_layer(mask, colour: str = MASK_COLOUR, alpha: float = PAINT_ALPHA):
    """A bool HxW mask as an RGBA editor layer: `colour` at `alpha` on the mask, transparent elsewhere."""
    import numpy as np

    layer = np.zeros((*mask.shape, 4), np.uint8)
    layer[mask.astype(bool)] = (*_hex_rgb(colour), round(255 * alpha))
    return layer


def painted(editor_value, hw: tuple[int, int]):
    """(mask, background strokes) painted in the editor's layers (RGBA arrays or image files), bool HxW
    each: the painted pixels nearer
    MASK_COLOUR than BACKGROUND_COLOUR make the mask, the others the background strokes. Layers of another
    size than the image (the editor's own canvas) are resized with nearest neighbour."""
    import cv2
    import numpy as np

    mask, background = np.zeros(hw, bool), np.zeros(hw, bool)
    layers = (editor_value or {}).get("layers") or []
    fg_rgb, bg_rgb = (np.array(_hex_rgb(c), np.float32) for c in (MASK_COLOUR, BACKGROUND_COLOUR))
    for layer in layers:
        if layer is None:
            continue
        if isinstance(layer, (str, Path)):
            from PIL import Image

            layer = Image.open(layer).convert("RGBA")
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[2] != 4:
            continue
        if layer.shape[:2] != hw:
            layer = cv2.resize(layer, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
        on = layer[..., 3] > 0
        rgb = layer[..., :3].astype(np.float32)
        nearer_fg = np.sum((rgb - fg_rgb) ** 2, -1) <= np.sum((rgb - bg_rgb) ** 2, -1)
        mask |= on & nearer_fg
        background |= on & ~nearer_fg
    return mask & ~background, background


def _editor_value(image, mask) -> dict:
    """The mask editor's value: the image as background, the mask as its painted layer, and their
    composite."""
    import numpy as np

    layer = mask_layer(mask)
    alpha = layer[..., 3:4].astype(np.float32) / 255.0
    composite = (image.astype(np.float32) * (1 - alpha) + layer[..., :3].astype(np.float32) * alpha).astype(np.uint8)
    return {"background": png_file(image), "layers": [png_file(layer)], "composite": png_file(composite)}


def _mask_choice(m: dict) -> tuple[str, int]:
    rel = "" if m["reliability"] is None else f" · reliability {m['reliability']:.2f}"
    tags = f" · {', '.join(m['tags'])}" if m["tags"] else ""
    return f"{m['index'] + 1} · {m['method']} · {m['label']} · confidence {m['confidence'] or 0:.2f}{rel}{tags}", m["index"]


def retrain_summary(out: dict) -> str:
    """The status after a retrain: the new version, what it learnt from, and the held-out figures before and
    after when the retrain evaluated."""
    cur = out.get("curated", {})
    lines = [f"**Retrained** · new checkpoint **{md(str(out.get('version')))}** (from "
             f"{md(str(out.get('from') or 'the packaged model'))}), now in use by the Segment tab · "
             f"{cur.get('labels', 0)} curated label(s) on {cur.get('images', 0)} image(s)"]
    if cur.get("new_words"):
        lines.append(f"\nnew words: {md(', '.join(cur['new_words']))}")
    seg = out.get("segmenter")
    if seg and "error" in seg:
        lines.append(f"\nclass-agnostic segmenter not retrained: {md(seg['error'])}")
        seg = None
    if seg:
        p = seg.get("pairs", {})
        lines.append(f"\nclass-agnostic segmenter (cls_saliency) · new checkpoint **{md(str(seg.get('version')))}** "
                     f"(from {md(str(seg.get('from') or 'the packaged model'))}) · {p.get('curated', 0)} curated and "
                     f"{p.get('base_replayed', 0)} base (image, word) pair(s)")
    rows = [(f"xpm, held-out ({out['evaluation'].get('images', '?')} images)", out["evaluation"])
            ] if out.get("evaluation") else []
    if seg and seg.get("evaluation"):
        rows.append((f"segmenter, held-out ({seg['evaluation'].get('images', '?')} images)", seg["evaluation"]))
    if rows:
        lines += ["", "| concept mIoU | before | after |", "|---|---|---|"]
        for head, ev in rows:
            for key, name in (("target_miou", "target"), ("base_miou", "base")):
                b, a = ev.get("before", {}).get(key), ev.get("after", {}).get(key)
                lines.append(f"| {md(head)}: {name} | {_figure(b)} | {_figure(a)} |")
    else:
        lines.append("\n(no held-out evaluation in this run)")
    return "\n".join(lines)


def _figure(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


class Review:
    """The Review tab's handlers, on `ovseg.app.curate.corrections`. Each takes the tab's values and returns
    its updates; none raises: a refusal (or a bug, whose traceback goes to the log) is a status line.

    `state` is the loaded sample: {"dataset", "id", "image", "word", "masks" (see `corrections.load`),
    "start" (the mask the editor was last given: GrabCut reads the strokes as changes to it)}."""

    def __init__(self, engine: Engine, retrain_options: dict | None = None):
        self.engine = engine
        self.retrain_options = dict(retrain_options or {})

    @staticmethod
    def _fail(exc: Exception) -> str:
        return error_status(exc, {})

    def datasets(self, current=None):
        """-> (dataset dropdown, status)."""
        import gradio as gr

        from ovseg.app.curate import corrections

        try:
            names = corrections.list_datasets()
        except Exception as exc:
            return gr.Dropdown(choices=[], value=None), self._fail(exc)
        value = current if current in names else (names[0] if names else None)
        return gr.Dropdown(choices=names, value=value), REVIEW_READY if names else NO_DATASETS

    def pick_dataset(self, name):
        """-> (sample dropdown, status)."""
        import gradio as gr

        from ovseg.app.curate import corrections

        if not name:
            return gr.Dropdown(choices=[], value=None), NO_DATASETS
        try:
            items = corrections.samples(name)
        except Exception as exc:
            return gr.Dropdown(choices=[], value=None), self._fail(exc)
        choices = [(text, sid) for sid, text in items]
        status = (f"**{md(name)}** · {len(items)} sample(s), least reliable first" if items
                  else f"dataset **{md(name)}** has no samples")
        return gr.Dropdown(choices=choices, value=choices[0][1] if choices else None), status

    def pick_sample(self, name, sample_id, index=0, status: str | None = None):
        """-> (state, mask dropdown, word, overlay, editor, status)."""
        import gradio as gr

        from ovseg.app.curate import corrections

        if not name or not sample_id:
            return None, gr.Dropdown(choices=[], value=None), "", None, None, status or REVIEW_READY
        try:
            data = corrections.load(name, sample_id)
        except Exception as exc:
            return (None, gr.Dropdown(choices=[], value=None), "", None, None, self._fail(exc))
        data["dataset"] = name
        choices = [_mask_choice(m) for m in data["masks"]] + [("new pseudo-mask (paint it)", NEW_MASK)]
        index = index if index is not None and any(v == index for _, v in choices) else choices[0][1]
        overlay, editor = self._show(data, index)
        if status is None:
            status = (f"**{md(data['image_key'])} · {md(data['word'])}** · {len(data['masks'])} pseudo-mask(s): "
                      "approve or reject one, or paint a correction and save it")
        return data, gr.Dropdown(choices=choices, value=index), data["word"], overlay, editor, status

    def _mask(self, data, index):
        import numpy as np

        if index is None or index == NEW_MASK or not 0 <= index < len(data["masks"]):
            return np.zeros(data["image"].shape[:2], bool)
        return data["masks"][index]["mask"]

    def _show(self, data, index, mask=None):
        """(overlay, editor value) of the pseudo-mask `index` (or of `mask`); records the editor's start."""
        from ovseg.app.render import mask_overlay

        mask = self._mask(data, index) if mask is None else mask
        data["start"] = mask
        editor = _editor_value(data["image"], mask)
        return png_file(mask_overlay(data["image"], mask)), editor

    def pick_mask(self, data, index):
        """-> (state, word, overlay, editor, status)."""
        if not data:
            return data, "", None, None, REVIEW_READY
        overlay, editor = self._show(data, index)
        word = data["word"] if index == NEW_MASK else data["masks"][index]["label"]
        what = "paint a new pseudo-mask" if index == NEW_MASK else f"pseudo-mask {index + 1}"
        return data, word, overlay, editor, f"{what}: approve, reject, or paint a correction"

    def verdict(self, data, index, verdict: str):
        """-> (state, mask dropdown, word, overlay, editor, status)."""
        import gradio as gr

        from ovseg.app.curate import corrections

        try:
            if not data:
                raise OvsegError("pick a dataset and a sample first")
            if index is None or index == NEW_MASK:
                raise OvsegError("pick one of the sample's pseudo-masks to approve or reject")
            corrections.set_verdict(data["dataset"], data["id"], int(index), verdict)
        except Exception as exc:
            return data, gr.skip(), gr.skip(), gr.skip(), gr.skip(), self._fail(exc)
        method = data["masks"][int(index)]["method"]
        fresh, chooser, *_, status = self.pick_sample(data["dataset"], data["id"], int(index),
                                                      f"**{verdict.capitalize()}** pseudo-mask {int(index) + 1} "
                                                      f"({md(str(method))}) · saved")
        if fresh is None:
            return data, gr.skip(), gr.skip(), gr.skip(), gr.skip(), status
        fresh["start"] = data.get("start")  # the editor keeps what is painted in it
        return fresh, chooser, gr.skip(), gr.skip(), gr.skip(), status

    def save(self, data, index, editor_value, word):
        """-> (state, mask dropdown, word, overlay, editor, status)."""
        import gradio as gr

        from ovseg.app.curate import corrections

        try:
            if not data:
                raise OvsegError("pick a dataset and a sample first")
            mask, _ = painted(editor_value, data["image"].shape[:2])
            target = None if index is None or index == NEW_MASK else int(index)
            saved = corrections.save_correction(data["dataset"], data["id"], target, mask, word)
        except Exception as exc:
            return data, gr.skip(), gr.skip(), gr.skip(), gr.skip(), self._fail(exc)
        what = "new pseudo-mask" if target is None else "correction of pseudo-mask"
        return self.pick_sample(data["dataset"], data["id"], saved,
                                f"**Saved** {what} {saved + 1} ({int(mask.sum())} pixels), tagged corrected "
                                "and approved")

    def refine(self, data, editor_value):
        """GrabCut from the painted mask (the chosen pseudo-mask when nothing is painted): strokes added to
        the start mask are sure foreground, erased or background-coloured ones sure background.
        -> (state, overlay, editor, status)."""
        import gradio as gr

        from ovseg.app.render import mask_overlay
        from ovseg.app.curate import corrections

        try:
            if not data:
                raise OvsegError("pick a dataset and a sample first")
            image = data["image"]
            mask, background = painted(editor_value, image.shape[:2])
            start = data.get("start")
            if start is None or start.shape != mask.shape:
                start = mask
            if not mask.any():  # nothing painted (or the editor shows no layer): start from the pseudo-mask
                mask = start
            refined = corrections.grabcut_from_strokes(image, mask, mask & ~start, background | (start & ~mask))
        except Exception as exc:
            return data, gr.skip(), gr.skip(), self._fail(exc)
        data["start"] = refined
        editor = _editor_value(image, refined)
        return (data, png_file(mask_overlay(image, refined)), editor,
                f"**Refined** with GrabCut: {int(refined.sum())} pixels · press **Save correction** to keep it")

    def retrain(self, name, on_stage=None):
        """Fine-tune on the dataset's approved labels, then make the engine reload its methods (the new
        checkpoints). `on_stage(text)` hears each stage as it starts. -> status."""
        from ovseg.app.curate.retrain import RetrainConfig, retrain

        try:
            if not name:
                raise OvsegError("pick a dataset first")
            out = retrain(RetrainConfig(dataset=name, **self.retrain_options), progress=False, on_stage=on_stage)
        except Exception as exc:
            return self._fail(exc)
        self.engine.reload_methods()
        return retrain_summary(out)



def review_tab(gr, review: Review, tab) -> None:
    """The Review tab: sample and pseudo-mask choosers with the overlay on the left, the mask editor on
    the right, the retrain button below."""
    state = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            with gr.Row():
                dataset = gr.Dropdown([], value=None, label="Dataset", elem_id="review-dataset", scale=4)
                refresh = gr.Button("Refresh", elem_id="review-refresh", scale=1, min_width=80)
            sample = gr.Dropdown([], value=None, label="Sample (least reliable first)", elem_id="review-sample")
            mask = gr.Dropdown([], value=None, label="Pseudo-mask", elem_id="review-mask")
            overlay = gr.Image(label="Pseudo-mask", interactive=False, elem_id="review-overlay", height=320,
                               buttons=[])
            with gr.Row():
                approve = gr.Button("Approve", variant="primary", elem_id="review-approve")
                reject = gr.Button("Reject", variant="stop", elem_id="review-reject")
            status = gr.Markdown(REVIEW_READY, elem_id="review-status")
        with gr.Column(scale=3, min_width=360):
            editor = gr.ImageEditor(
                label="Corrected mask (red: the object; blue: background for GrabCut; erase to remove)",
                type="numpy", image_mode="RGBA", sources=[], transforms=[], format="png",
                brush=gr.Brush(colors=[(MASK_COLOUR, PAINT_ALPHA), (BACKGROUND_COLOUR, PAINT_ALPHA)],
                               default_color=(MASK_COLOUR, PAINT_ALPHA), color_mode="fixed"),
                eraser=gr.Eraser(), elem_id="review-editor", height=420)
            word = gr.Textbox(label="Word", elem_id="review-word",
                              info="the pseudo-mask's label; change it to save the mask under another word")
            with gr.Row():
                save = gr.Button("Save correction", variant="primary", elem_id="review-save")
                grabcut = gr.Button("Refine with GrabCut", elem_id="review-grabcut")
            retrain = gr.Button("Retrain from approved labels", elem_id="review-retrain")
    sample_outputs = [state, mask, word, overlay, editor, status]
    gr.on([tab.select, refresh.click], review.datasets, dataset, [dataset, status])
    dataset.change(review.pick_dataset, dataset, [sample, status])
    sample.change(review.pick_sample, [dataset, sample], sample_outputs)
    mask.input(review.pick_mask, [state, mask], [state, word, overlay, editor, status])
    approve.click(lambda d, i: review.verdict(d, i, "approved"), [state, mask], sample_outputs)
    reject.click(lambda d, i: review.verdict(d, i, "rejected"), [state, mask], sample_outputs)
    save.click(review.save, [state, mask, editor, word], sample_outputs)
    grabcut.click(review.refine, [state, editor], [state, overlay, editor, status])

    def retrain_showing_stages(name, progress=gr.Progress()):
        return review.retrain(name, on_stage=lambda text: progress(None, desc=text))

    retrain.click(retrain_showing_stages, dataset, status, concurrency_limit=1)
