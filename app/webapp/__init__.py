"""`ovseg-app`: the browser workbench. Type words, see where they are in an image (gradio, offline).

Gradio is imported inside functions only. The Segment event runs with `preprocess=False`: gradio's own
image preprocessing opens the upload with PIL and fails on a non-image with a developer-oriented message,
so the handler takes the uploaded file's path and lets the engine's loader validate it instead.

The Review tab works on a labelled FiftyOne dataset (`ovseg label`) through `ovseg.app.curate.corrections`: pick a
sample (least reliable first) and one of its pseudo-masks, approve or reject it, or paint a corrected mask
(optionally under another word, optionally refined with GrabCut) and save it; every action is written to
the database at once. "Retrain from approved labels" fine-tunes XPM's student and cls_saliency's segmenter on
the dataset's approved labels (each stage shown as it runs) and makes the Segment tab load the new checkpoints.
"""


from __future__ import annotations

import argparse
import logging
import os

from ovseg.app.webapp.common import (CSS, DEFAULT_METHOD, NO_IMAGE, READY, SALIENCY_CHOICES, default_threshold,
                                     example_images, has_grabcut, has_option, offline_env)
from ovseg.app.webapp.engine import Engine
from ovseg.app.webapp.review_tab import (BACKGROUND_COLOUR, MASK_COLOUR, NEW_MASK, Review, mask_layer, painted,
                                         png_file, retrain_summary, review_tab)
from ovseg.app.webapp.segment_tab import check_upload, gallery_items, make_handler, segment_tab, summary  # noqa: F401
from ovseg.core.errors import OvsegError
from ovseg.core.registry import available_methods

log = logging.getLogger(__name__)


def build_app(predictor=None, device: str = "auto"):
    """The page: the Segment tab (inputs on the left, results on the right) and the Review tab; launch it
    with `css=CSS`. `predictor`: a ready Predictor to share (else one is created on first use, on `device`)."""
    offline_env()
    import gradio as gr

    engine = Engine(predictor, device)
    methods = available_methods()
    first = DEFAULT_METHOD if DEFAULT_METHOD in methods else methods[0]
    with gr.Blocks(title="ovseg") as demo:
        gr.Markdown("## ovseg — open-vocabulary segmentation\nType words, see where they are in the image.")
        with gr.Tabs():
            with gr.Tab("Segment", id="segment", elem_id="segment-tab"):
                segment_tab(gr, engine, methods, first)
            with gr.Tab("Review", id="review", elem_id="review-tab") as tab:
                review_tab(gr, Review(engine), tab)
    return demo


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
    offline_env()
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
