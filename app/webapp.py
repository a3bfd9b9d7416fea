"""`ovseg-app`: the browser workbench. Type words, see where they are in an image (gradio, offline).

Gradio is imported inside functions only. The Segment event runs with `preprocess=False`: gradio's own
image preprocessing opens the upload with PIL and fails on a non-image with a developer-oriented message,
so the handler takes the uploaded file's path and lets the engine's loader validate it instead.
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
    """The page: inputs on the left, results on the right; launch it with `css=CSS`.
    `predictor`: a ready Predictor to share (else one is created on first use, on `device`)."""
    _offline_env()
    import gradio as gr

    engine = Engine(predictor, device)
    methods = available_methods()
    first = DEFAULT_METHOD if DEFAULT_METHOD in methods else methods[0]
    with gr.Blocks(title="ovseg") as demo:
        gr.Markdown("## ovseg — open-vocabulary segmentation\nType words, see where they are in the image.")
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
    return demo


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
