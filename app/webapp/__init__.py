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
import ipaddress
import logging
import os
import sys

from ovseg.app.webapp.common import (CSS, DEFAULT_METHOD, MAX_WORDS, NO_IMAGE, READY, SALIENCY_CHOICES,
                                     default_threshold, example_images, has_grabcut, has_option, offline_env)
from ovseg.app.webapp.engine import Engine
from ovseg.app.webapp.review_tab import (BACKGROUND_COLOUR, MASK_COLOUR, NEW_MASK, Review, mask_layer, painted,
                                         png_file, retrain_summary, review_tab)
from ovseg.app.webapp.segment_tab import check_upload, gallery_items, make_handler, segment_tab, summary  # noqa: F401
from ovseg.core.errors import OvsegError
from ovseg.core.registry import available_methods

# What the tabs' modules offer, re-exported here (the tests and scripts use `ovseg.app.webapp.X`).
__all__ = ["BACKGROUND_COLOUR", "CSS", "DEFAULT_METHOD", "Engine", "MASK_COLOUR", "MAX_WORDS", "NEW_MASK", "NO_IMAGE",
           "READY", "Review", "SALIENCY_CHOICES", "build_app", "check_upload", "default_threshold", "example_images",
           "gallery_items", "has_grabcut", "has_option", "main", "make_handler", "mask_layer", "painted",
           "parse_args", "png_file", "retrain_summary", "summary"]

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
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only); any other, e.g. 0.0.0.0 "
                             "to serve a LAN, needs --auth or --insecure")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                        help="ask for this user name and password (gradio's login page)")
    parser.add_argument("--insecure", action="store_true",
                        help="serve a non-loopback --host without a password (anyone who can reach it may use it)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                        help="port (default 7860, or GRADIO_SERVER_PORT)")
    parser.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"],
                        help="where the models run; auto takes a GPU when there is one (default)")
    return parser.parse_args(argv)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host`: localhost, 127.0.0.0/8, ::1. A host name other than
    localhost may resolve to any interface, so it is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def launch_options(args: argparse.Namespace) -> dict:
    """gradio's `launch` arguments for the address and the login: {"server_name", "auth"}. A non-loopback
    --host (other machines can reach the app) needs --auth USER:PASSWORD unless --insecure says otherwise.
    Raises OvsegError with one line saying what to add."""
    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not (sep and user.strip() and password):
            raise OvsegError("--auth reads USER:PASSWORD, e.g. --auth ada:correct-horse (both non-empty)")
        auth = (user.strip(), password)
    if auth is None and not args.insecure and not is_loopback(args.host):
        raise OvsegError(f"--host {args.host} serves other machines: add --auth USER:PASSWORD (or --insecure to "
                         "serve it without a password)")
    return {"server_name": args.host, "auth": auth}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        serving = launch_options(args)
    except OvsegError as exc:
        print(f"ovseg-app: error: {exc}", file=sys.stderr)
        return 2
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
        demo.launch(**serving, server_port=args.port, prevent_thread_lock=True, quiet=True,
                    show_error=False, ssr_mode=False, css=CSS)
    except OSError as exc:
        raise SystemExit(f"ovseg-app: cannot serve on {args.host}:{args.port}: {exc}") from None
    log.info("models load on the first Segment click (device %s)", device)
    if serving["auth"] is None and not is_loopback(args.host):
        log.warning("serving %s without a password (--insecure): anyone who can reach it may use it", args.host)
    print(f"ovseg-app: open {demo.local_url}", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
