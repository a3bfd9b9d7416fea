"""What the app's tabs share: offline settings, the page's CSS, method introspection for the controls, and
the one-line error messages shown to the user."""

from __future__ import annotations

import inspect
import logging
import os
from importlib import resources
from pathlib import Path

from ovseg.core.errors import OvsegError
from ovseg.core.registry import get_method

log = logging.getLogger("ovseg.app.webapp")

# Results at their own aspect ratio (not square cells), all rows visible, compact status tables.
CSS = """
#results .thumbnail-item { aspect-ratio: auto; height: auto; }
#results .thumbnail-lg > img { height: auto; }
#results .fixed-height { max-height: none; min-height: 240px; }
#results .caption-label { max-width: 96%; font-size: var(--text-md); }
#status table { font-size: var(--text-sm); margin: 0.4em 0 1em; }
#status th, #status td { padding: 3px 10px; }
"""

DEFAULT_METHOD = "fused"
NO_IMAGE = "Upload an image or pick an example first"
READY = "Pick an image, type words, press **Segment**."
UNEXPECTED = "something went wrong on the server (its log has the details); try another image or other words"
# Words (negatives included) one Segment request may hold: each word is its own pass of the method, and a
# request holds the engine while it runs, so one long list would make every other session wait.
MAX_WORDS = 20


def offline_env() -> None:
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
SALIENCY_CHOICES = [("class activation maps (dense)", "cam"), ("guided backprop (the paper's)", "guided_backprop"),
                    ("CAM-gated guided backprop", "cam_gated")]


def default_threshold(method: str) -> float | None:
    """The method's default mask threshold, None if it has none."""
    return get_method(method).default_threshold()



def check_threshold(value) -> float:
    t = float(value)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"the threshold must lie in [0, 1], got {t}")
    return t


def md(text: str) -> str:
    """Escape the characters Markdown would act on in a user's file name or word."""
    return "".join("\\" + ch if ch in "\\`*_[]<>|#" else ch for ch in text)


def user_message(exc: Exception, image: dict) -> str:
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



def error_status(exc: Exception, image: dict) -> str:
    """Toast the message and return it for the status box."""
    import gradio as gr

    msg = user_message(exc, image)
    gr.Warning(msg)
    return f"**Error:** {md(msg)}"
