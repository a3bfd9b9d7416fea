"""The engine behind every browser tab: one Predictor, created on first use, used under a lock."""

from __future__ import annotations

import logging
import os
import threading

from ovseg.app.webapp.common import SALIENCY_CHOICES, default_threshold, has_option
from ovseg.core.errors import OvsegError

log = logging.getLogger("ovseg.app.webapp")


def method_spec(method: str, threshold: float | None, grabcut: bool = True, saliency: str | None = None) -> str:
    """The method spec of the controls' values ("cls_saliency[threshold=0.5,grabcut=off,saliency=cam]"): each
    option only where the method takes it, so the Predictor builds (and keeps) one instance per setting."""
    from ovseg.core.registry import format_method_spec

    options = {}
    if threshold is not None and default_threshold(method) is not None:  # else the method sets its own
        options["threshold"] = round(float(threshold), 4)
    if has_option(method, "grabcut"):
        options["grabcut"] = bool(grabcut)
    if saliency and has_option(method, "saliency"):
        if saliency not in {v for _, v in SALIENCY_CHOICES}:
            raise OvsegError(f"unknown saliency prior {saliency!r}")
        options["saliency"] = saliency
    return format_method_spec(method, options)


def image_key(path: str) -> tuple:
    """What identifies an image file's content for the engine: its path, size and modification time (another
    image saved under the same path is another image)."""
    try:
        st = os.stat(path)
    except OSError:
        return (path,)  # set_image says what is wrong with it
    return (path, st.st_size, st.st_mtime_ns)


class Engine:
    """One Predictor shared by every browser tab, created on first use; a lock serialises its use
    (gradio runs handlers in threads, and the predictor holds the current image)."""

    def __init__(self, predictor=None, device: str = "auto"):
        self.device = device
        self._predictor = predictor
        self._image_key: tuple | None = None  # the file whose features the predictor holds (see image_key)
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
                self._predictor.reload_methods()

    def run(self, path: str, words: str, caption: str, method: str, threshold: float, grabcut: bool = True,
            saliency: str | None = None):
        """-> (Prediction, RGB image, set_image ms or None when the image was already set, device)."""
        with self._lock:
            predictor = self._get()
            set_ms = None
            key = image_key(path)  # each request names its image: set it unless it is the one held
            if key != self._image_key:
                self._image_key = None
                predictor.set_image(path)
                self._image_key, set_ms = key, predictor.last_set_image_ms
            spec = method_spec(method, threshold, grabcut, saliency)
            out = predictor.predict(words, caption=caption, methods=[spec])
            return out, predictor.image, set_ms, str(predictor.device)
