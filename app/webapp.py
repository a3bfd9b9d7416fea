"""`ovseg-app`: the browser workbench. Type words, see where they are in an image (gradio, offline).

Gradio is imported inside functions only. The Segment event runs with `preprocess=False`: gradio's own
image preprocessing opens the upload with PIL and fails on a non-image with a developer-oriented message,
so the handler takes the uploaded file's path and lets the engine's loader validate it instead.

The Review tab works on a labelled FiftyOne dataset (`ovseg label`) through `ovseg.curate.corrections`: pick a
sample (least reliable first) and one of its pseudo-masks, approve or reject it, or paint a corrected mask
(optionally under another word, optionally refined with GrabCut) and save it; every action is written to
the database at once. "Retrain from approved labels" fine-tunes XPM's student and cls_saliency's segmenter on
the dataset's approved labels (each stage shown as it runs) and makes the Segment tab load the new checkpoints.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
import threading
from importlib import resources
from pathlib import Path

from ovseg.core.concepts import parse_concepts
from ovseg.core.errors import OvsegError
from ovseg.core.registry import available_methods, get_method

log = logging.getLogger(__name__)

# Results at their own aspect ratio (not square cells), all rows visible, compact status tables.
CSS = """
#results .thumbnail-item { aspect-ratio: auto; height: auto; }
#results .thumbnail-lg > img { height: auto; }
#results .fixed-height { max-height: none; min-height: 240px; }
#results .caption-label { max-width: 96%; font-size: var(--text-md); }
#status table { font-size: var(--text-sm); margin: 0.4em 0 1em; }
#status th, #status td { padding: 3px 10px; }
"""

DEFAULT_METHOD = "cam"
NO_IMAGE = "Upload an image or pick an example first"
READY = "Pick an image, type words, press **Segment**."
UNEXPECTED = "something went wrong on the server (its log has the details); try another image or other words"


def _offline_env() -> None:
    """No telemetry, no hub look-ups: the app runs offline."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def example_images() -> list[Path]:
    """The bundled example photos."""
    folder = Path(str(resources.files("ovseg.assets") / "examples"))
    return sorted(folder.glob("*.jpg"))


def has_option(method: str, option: str) -> bool:
    """Whether the method's constructor takes `option`."""
    return option in inspect.signature(get_method(method)).parameters


def has_grabcut(method: str) -> bool:
    """Whether the method has GrabCut post-processing to switch (a `grabcut` constructor argument)."""
    return has_option(method, "grabcut")


# The saliency priors a method with a `saliency` option can use, as (label shown, option value).
SALIENCY_CHOICES = [("guided backprop (the paper's)", "guided_backprop"), ("CAM-gated guided backprop", "cam_gated"),
                    ("class activation maps (dense)", "cam")]


def default_threshold(method: str) -> float | None:
    """The method's default mask threshold, None if it has none."""
    return get_method(method).default_threshold()


class Engine:
    """One Predictor shared by every browser tab, created on first use; a lock serialises its use
    (gradio runs handlers in threads, and the predictor holds the current image)."""

    def __init__(self, predictor=None, device: str = "auto"):
        self.device = device
        self._predictor = predictor
        self._image_path: str | None = None
        self._lock = threading.Lock()

    def _get(self):
        if self._predictor is None:
            from ovseg.core.predictor import Predictor

            log.info("loading the models (device %s)", self.device)
            self._predictor = Predictor(device=self.device)
            log.info("models loaded in %.1f s", self._predictor.models.load())
        return self._predictor

    def reload_methods(self) -> None:
        """Drop the predictor's method instances, so that each loads its checkpoint in use again (after a
        retrain made a new one current); the models and the current image stay."""
        with self._lock:
            if self._predictor is not None:
                self._predictor._methods.clear()

    def run(self, path: str, words: str, caption: str, method: str, threshold: float, grabcut: bool = True,
            saliency: str | None = None):
        """-> (Prediction, RGB image, set_image ms or None when the image was already set, device)."""
        with self._lock:
            predictor = self._get()
            set_ms = None
            if path != self._image_path:
                self._image_path = None
                predictor.set_image(path)
                self._image_path, set_ms = path, predictor.last_set_image_ms
            if saliency and has_option(method, "saliency"):
                if saliency not in {v for _, v in SALIENCY_CHOICES}:
                    raise OvsegError(f"unknown saliency prior {saliency!r}")
                method = f"{method}[saliency={saliency}]"
            instance = predictor.method(method)
            if hasattr(instance, "threshold"):
                instance.threshold = threshold
            if hasattr(instance, "grabcut"):
                from ovseg.core.grabcut import GrabCutConfig

                instance.grabcut = GrabCutConfig(enabled=grabcut)
            out = predictor.predict(words, caption=caption, methods=[method])
            return out, predictor.image, set_ms, str(predictor.device)


def _check_threshold(value) -> float:
    t = float(value)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"the threshold must lie in [0, 1], got {t}")
    return t


def gallery_items(out, image) -> list[tuple]:
    """Per word: each prior as a heatmap overlay, then the mask overlay, with readable captions."""
    from ovseg.app.render import NOISY_BELOW, colour, mask_overlay, prior_overlay, pseudo_label_overlay

    words = list(dict.fromkeys(r.concept for r in out.results))
    items = []
    for r in out.results:
        for prior in r.priors:
            score = r.score if math.isnan(prior.score) else prior.score
            overlay, note = prior_overlay(image, prior.map, prior.kind)
            kind = prior.kind.replace("_", " ") + (f" ({note})" if note else "")
            items.append((overlay, f"{r.concept} · {kind} · score {score:.2f}"))
        rgb = tuple(int(c) for c in colour(words.index(r.concept)))
        items.append((mask_overlay(image, r.mask, rgb), f"{r.concept} · mask · {r.ms:.0f} ms"))
        # each instance pseudo-label (XPM): noise map inside the mask, outline coloured by reliability,
        # the least reliable first so that the noisy ones stand out
        order = sorted(r.pseudo_labels, key=lambda pl: 1.0 if pl.reliability is None else pl.reliability)
        for k, pl in enumerate(order, 1):
            rel = "" if pl.reliability is None else f" · reliability {pl.reliability:.2f}"
            flag = " · NOISY" if pl.reliability is not None and pl.reliability < NOISY_BELOW else ""
            items.append((pseudo_label_overlay(image, pl),
                          f"{r.concept} · pseudo-mask {k} · score {pl.score:.2f}{rel}{flag}"))
    return items


def _cell(value) -> str:
    """A details value as one Markdown table cell."""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:.3g}"
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
        text = ", ".join(f"{a} ({b:.3g})" if isinstance(b, float) else f"{a} ({b})" for a, b in value)
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    else:
        text = str(value)
    return _md(text).replace("\n", " ")


def summary(out, image, set_ms, device: str) -> str:
    """The status box: one line about the run, then a small table per word."""
    h, w = image.shape[:2]
    set_text = "already set" if set_ms is None else f"{set_ms:.0f} ms"
    lines = [f"**Done** · image {w}×{h} · set_image {set_text} · device {device}"]
    if out.negatives:
        lines.append(f"\nnegative words: {', '.join(out.negatives)}")
    if out.caption:
        lines.append(f"\ncaption: {_cell(out.caption)}")
    for r in out.results:
        lines += ["", f"| {_cell(r.concept)} | {r.method} |", "|---|---|",
                  f"| presence score | {r.score:.2f} |", f"| present | {'yes' if r.present else 'no'} |",
                  f"| time | {r.ms:.0f} ms |"]
        lines += [f"| {_cell(k.replace('_', ' '))} | {_cell(v)} |" for k, v in r.details.items()]
    return "\n".join(lines)


def _md(text: str) -> str:
    """Escape the characters Markdown would act on in a user's file name or word."""
    return "".join("\\" + ch if ch in "\\`*_[]<>|#" else ch for ch in text)


def _message(exc: Exception, image: dict) -> str:
    """One line for the user: the error's own message (with the server's temporary path replaced by the
    file's name) for errors meant for users, a generic line for bugs (whose traceback goes to the log)."""
    if not isinstance(exc, (OvsegError, ValueError)):
        log.error("segment failed", exc_info=exc)
        return UNEXPECTED
    lines = str(exc).strip().splitlines()
    msg = lines[0] if lines else type(exc).__name__
    path = image.get("path")
    msg = msg.replace(path, image.get("orig_name") or "the image") if path else msg
    log.info("refused: %s", msg)
    return msg


def _error(exc: Exception, image: dict) -> str:
    """Toast the message and return it for the status box."""
    import gradio as gr

    msg = _message(exc, image)
    gr.Warning(msg)
    return f"**Error:** {_md(msg)}"


def check_upload(image):
    """On upload: decode with the engine's loader, so that a bad file is named at once and cleared from
    the image box (no broken preview). -> (image update, status)."""
    import gradio as gr

    from ovseg.core.image_io import load_image

    image = image or {}
    if not image.get("path"):
        return gr.skip(), READY
    try:
        h, w = load_image(image["path"]).shape[:2]
    except Exception as exc:
        return None, _error(exc, image)
    name = _md(image.get("orig_name") or "image")
    return gr.skip(), f"**{name}** · {w}×{h} · now type words and press **Segment**."


def make_handler(engine: Engine):
    """The Segment handler: raw gradio payloads in, (gallery items, status Markdown) out; never raises."""

    def segment(image, words, caption, method, threshold, grabcut=True, saliency=None):
        image = image or {}
        try:
            if not image.get("path"):
                raise OvsegError(NO_IMAGE)
            if method not in available_methods():
                raise OvsegError(f"unknown method {method!r}; available: {', '.join(available_methods())}")
            parse_concepts(words or "")  # a bad word list is refused before any model loads
            out, rgb, set_ms, device = engine.run(
                image["path"], words or "", caption or "", method, _check_threshold(threshold), bool(grabcut),
                saliency,
            )
            return gallery_items(out, rgb), summary(out, rgb, set_ms, device)
        except Exception as exc:
            return [], _error(exc, image)

    return segment


def build_app(predictor=None, device: str = "auto"):
    """The page: the Segment tab (inputs on the left, results on the right) and the Review tab; launch it
    with `css=CSS`. `predictor`: a ready Predictor to share (else one is created on first use, on `device`)."""
    _offline_env()
    import gradio as gr

    engine = Engine(predictor, device)
    methods = available_methods()
    first = DEFAULT_METHOD if DEFAULT_METHOD in methods else methods[0]
    with gr.Blocks(title="ovseg") as demo:
        gr.Markdown("## ovseg — open-vocabulary segmentation\nType words, see where they are in the image.")
        with gr.Tabs():
            with gr.Tab("Segment", id="segment", elem_id="segment-tab"):
                _segment_tab(gr, engine, methods, first)
            with gr.Tab("Review", id="review", elem_id="review-tab") as review_tab:
                _review_tab(gr, Review(engine), review_tab)
    return demo


def _segment_tab(gr, engine: Engine, methods: list[str], first: str) -> None:
    """The Segment tab: inputs on the left, results on the right."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             label="Image", elem_id="image", height=340)
            gr.Examples([[str(p)] for p in example_images()], inputs=[image], label="Examples",
                        elem_id="examples")
            words = gr.Textbox(label="Words", placeholder="dog, frisbee, -person", elem_id="words",
                               info="comma-separated; a leading '-' marks a negative word")
            caption = gr.Textbox(label="Caption (optional)", elem_id="caption",
                                 placeholder="a dog catching a frisbee in a park")
            with gr.Row():
                method = gr.Dropdown(methods, value=first, label="Method", elem_id="method")
                threshold = _threshold_slider(gr, first)
            grabcut = gr.Checkbox(True, label="GrabCut post-processing", elem_id="grabcut",
                                  visible=has_grabcut(first),
                                  info="off: the segmenter's probability >= the mask threshold")
            saliency = gr.Radio(SALIENCY_CHOICES, value="guided_backprop", label="Saliency priors",
                                elem_id="saliency", visible=has_option(first, "saliency"),
                                info="CAM-gated: S+/S- weighted by the proxy labels' class activation "
                                     "maps; CAM: those maps themselves (both not in the paper)")
            button = gr.Button("Segment", variant="primary", elem_id="segment-btn")
        with gr.Column(scale=3, min_width=360):
            gallery = gr.Gallery(label="Results", elem_id="results", columns=2, interactive=False,
                                 object_fit="contain", height="auto")
            status = gr.Markdown(READY, elem_id="status")
    image.upload(check_upload, image, [image, status], preprocess=False)
    def method_changed(name):
        return (_threshold_slider(gr, name, render=False), gr.Checkbox(visible=has_grabcut(name)),
                gr.Radio(visible=has_option(name, "saliency")))

    method.change(method_changed, method, [threshold, grabcut, saliency])
    inputs, outputs = [image, words, caption, method, threshold, grabcut, saliency], [gallery, status]
    gr.on([button.click, words.submit], make_handler(engine), inputs, outputs, preprocess=False)


# ----------------------------------------------------------------------------------------- Review tab

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
    lines = [f"**Retrained** · new checkpoint **{_md(str(out.get('version')))}** (from "
             f"{_md(str(out.get('from') or 'the packaged model'))}), now in use by the Segment tab · "
             f"{cur.get('labels', 0)} curated label(s) on {cur.get('images', 0)} image(s)"]
    if cur.get("new_words"):
        lines.append(f"\nnew words: {_md(', '.join(cur['new_words']))}")
    seg = out.get("segmenter")
    if seg and "error" in seg:
        lines.append(f"\nclass-agnostic segmenter not retrained: {_md(seg['error'])}")
        seg = None
    if seg:
        p = seg.get("pairs", {})
        lines.append(f"\nclass-agnostic segmenter (cls_saliency) · new checkpoint **{_md(str(seg.get('version')))}** "
                     f"(from {_md(str(seg.get('from') or 'the packaged model'))}) · {p.get('curated', 0)} curated and "
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
                lines.append(f"| {_md(head)}: {name} | {_figure(b)} | {_figure(a)} |")
    else:
        lines.append("\n(no held-out evaluation in this run)")
    return "\n".join(lines)


def _figure(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


class Review:
    """The Review tab's handlers, on `ovseg.curate.corrections`. Each takes the tab's values and returns
    its updates; none raises: a refusal (or a bug, whose traceback goes to the log) is a status line.

    `state` is the loaded sample: {"dataset", "id", "image", "word", "masks" (see `corrections.load`),
    "start" (the mask the editor was last given: GrabCut reads the strokes as changes to it)}."""

    def __init__(self, engine: Engine, retrain_options: dict | None = None):
        self.engine = engine
        self.retrain_options = dict(retrain_options or {})

    @staticmethod
    def _fail(exc: Exception) -> str:
        return _error(exc, {})

    def datasets(self, current=None):
        """-> (dataset dropdown, status)."""
        import gradio as gr

        from ovseg.curate import corrections

        try:
            names = corrections.list_datasets()
        except Exception as exc:
            return gr.Dropdown(choices=[], value=None), self._fail(exc)
        value = current if current in names else (names[0] if names else None)
        return gr.Dropdown(choices=names, value=value), REVIEW_READY if names else NO_DATASETS

    def pick_dataset(self, name):
        """-> (sample dropdown, status)."""
        import gradio as gr

        from ovseg.curate import corrections

        if not name:
            return gr.Dropdown(choices=[], value=None), NO_DATASETS
        try:
            items = corrections.samples(name)
        except Exception as exc:
            return gr.Dropdown(choices=[], value=None), self._fail(exc)
        choices = [(text, sid) for sid, text in items]
        status = (f"**{_md(name)}** · {len(items)} sample(s), least reliable first" if items
                  else f"dataset **{_md(name)}** has no samples")
        return gr.Dropdown(choices=choices, value=choices[0][1] if choices else None), status

    def pick_sample(self, name, sample_id, index=0, status: str | None = None):
        """-> (state, mask dropdown, word, overlay, editor, status)."""
        import gradio as gr

        from ovseg.curate import corrections

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
            status = (f"**{_md(data['image_key'])} · {_md(data['word'])}** · {len(data['masks'])} pseudo-mask(s): "
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

        from ovseg.curate import corrections

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
                                                      f"({_md(str(method))}) · saved")
        if fresh is None:
            return data, gr.skip(), gr.skip(), gr.skip(), gr.skip(), status
        fresh["start"] = data.get("start")  # the editor keeps what is painted in it
        return fresh, chooser, gr.skip(), gr.skip(), gr.skip(), status

    def save(self, data, index, editor_value, word):
        """-> (state, mask dropdown, word, overlay, editor, status)."""
        import gradio as gr

        from ovseg.curate import corrections

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
        from ovseg.curate import corrections

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
        from ovseg.curate.retrain import RetrainConfig, retrain

        try:
            if not name:
                raise OvsegError("pick a dataset first")
            out = retrain(RetrainConfig(dataset=name, **self.retrain_options), progress=False, on_stage=on_stage)
        except Exception as exc:
            return self._fail(exc)
        self.engine.reload_methods()
        return retrain_summary(out)


def _review_tab(gr, review: Review, tab) -> None:
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


def _threshold_slider(gr, method: str, render: bool = True):
    t = default_threshold(method)
    return gr.Slider(0.0, 1.0, value=0.5 if t is None else t, step=0.01, label="Mask threshold",
                     interactive=t is not None, elem_id="threshold", render=render)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ovseg-app", description="Open-vocabulary segmentation in the browser.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                        help="port (default 7860, or GRADIO_SERVER_PORT)")
    parser.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"],
                        help="where the models run; auto takes a GPU when there is one (default)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    _offline_env()
    from ovseg.core.device import resolve_device

    try:
        device = str(resolve_device(args.device))
    except OvsegError as exc:
        raise SystemExit(f"ovseg-app: {exc}") from None
    demo = build_app(device=device)
    try:
        demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                    show_error=False, ssr_mode=False, css=CSS)
    except OSError as exc:
        raise SystemExit(f"ovseg-app: cannot serve on {args.host}:{args.port}: {exc}") from None
    log.info("models load on the first Segment click (device %s)", device)
    print(f"ovseg-app: open {demo.local_url}", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
