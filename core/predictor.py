"""The predictor: `set_image` once (decode, validate, backbone features), then `predict` for many words."""

from __future__ import annotations

import inspect
import logging
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ovseg.core.concepts import parse_concepts, parse_words
from ovseg.core.errors import OvsegError
from ovseg.core.image_io import load_image
from ovseg.core.methods.base import ImageState, Method
from ovseg.core.models import Models
from ovseg.core.registry import get_method, parse_methods, split_method_spec
from ovseg.core.types import Prediction

log = logging.getLogger(__name__)

DEFAULT_LONG_SIDE = 448
DEFAULT_METHODS = ("fused",)  # what predict() runs when no method is named
# Method instances kept at once: each spec ("cam[threshold=0.4]") is an instance, and a trained one holds
# its networks; the least recently used beyond this many is dropped (and rebuilt if asked for again).
MAX_METHOD_INSTANCES = 8


class Predictor:
    """Open-vocabulary segmentation of one image at a time.

    >>> p = Predictor()                       # CPU; Predictor(device="auto") takes a GPU when there is one
    >>> p.set_image("photo.jpg")              # path, PIL image or HWC array
    >>> out = p.predict("dog, frisbee, -person")  # the default method, fused; or methods=["cam", ...]
    >>> out.get("dog").mask                   # HxW bool at image size

    Args:
        device: "cpu" (default), "cuda" or "auto".
        long_side: the network input's long side in pixels (each side is then rounded to a multiple of 32).
        max_pixels: refuse larger images (see `ovseg.core.image_io`).
        text_encoder_path: a local Hugging Face folder to use instead of the packaged MiniLM.
        method_options: {method name: {option: value}} passed to the method's constructor.
        methods: the method specs `predict` runs when it names none (default: `fused`).

    A Predictor holds the current image: threads that share one must serialise set_image + predict.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        long_side: int = DEFAULT_LONG_SIDE,
        max_pixels: int | None = None,
        text_encoder_path: str | Path | None = None,
        method_options: dict[str, dict] | None = None,
        models: Models | None = None,
        methods=DEFAULT_METHODS,
    ):
        if long_side < 64:
            raise ValueError(f"long_side must be at least 64 pixels, got {long_side}")
        self.models = models if models is not None else Models(device, text_encoder_path)
        self.long_side = long_side
        self.max_pixels = max_pixels
        self.method_options = dict(method_options or {})
        self.methods = parse_methods(methods)  # the default of predict() and presence()
        self._methods: OrderedDict[str, Method] = OrderedDict()  # spec -> instance, least recently used first
        self._state: ImageState | None = None
        self.last_set_image_ms = float("nan")

    @property
    def device(self) -> torch.device:
        return self.models.device

    def method(self, spec: str) -> Method:
        """The method instance of a spec, "cam" or "cls_saliency[variant=sem1c,grabcut=off]" (created on
        first use, with `method_options` of its name updated by the spec's own options). Instances of
        different specs share the image's cached work (features, saliency maps)."""
        spec = parse_methods([spec])[0]
        if spec in self._methods:
            self._methods.move_to_end(spec)
        else:
            name, spec_options = split_method_spec(spec)
            cls = get_method(name)
            options = {**self.method_options.get(name, {}), **spec_options}
            accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "models")]
            unknown = [k for k in options if k not in accepted]
            if unknown:
                raise OvsegError(f"method {name!r} has no option {unknown[0]!r}; its options: "
                                 + (", ".join(accepted) or "none"))
            self._methods[spec] = cls(self.models, **options)
            while len(self._methods) > MAX_METHOD_INSTANCES:
                self._methods.popitem(last=False)
        return self._methods[spec]

    def reload_methods(self) -> None:
        """Drop every method instance, so that each loads its checkpoint in use again (after `ovseg retrain`
        made a new one current); the models and the current image stay."""
        self._methods.clear()

    def set_image(self, image, name: str | None = None) -> None:
        """Decode and validate `image` (path, PIL image, or HWC array; see `load_image`) and cache its
        backbone features. Raises `ImageError` with a message naming what was wrong (and the image by
        `name`, default its path)."""
        t0 = time.perf_counter()
        self._state = None  # never leave the previous image's features behind a failed call
        rgb = load_image(image, self.max_pixels, name)
        self._state = ImageState.compute(self.models, rgb, self.long_side)
        self.last_set_image_ms = (time.perf_counter() - t0) * 1000.0

    @property
    def image(self) -> np.ndarray:
        return self._require_state().image

    def _require_state(self) -> ImageState:
        if self._state is None:
            raise OvsegError("no image set: call set_image(image) before predict()")
        return self._state

    def presence(self, concepts, method: str | None = None, caption=None) -> dict[str, float]:
        """{word: presence score in [0, 1]} of one method on the current image, without computing masks.
        caption: as `predict` takes it."""
        state = self._require_state()
        positives, _ = parse_concepts(concepts)
        m = self.method(method or self.methods[0])
        caption = _caption_text(caption)
        m.prepare(state, positives, caption)
        return {w: m.presence(state, w, caption) for w in positives}

    def predict(
        self,
        concepts,
        negatives=(),
        caption=None,
        methods=None,
    ) -> Prediction:
        """Run each method on each concept of the current image.

        Args:
            concepts: "dog, frisbee, -person" or a list of words; words with a leading '-' are negatives.
            negatives: more negative words (regions to exclude): "dog, cat" or a list.
            caption: an optional caption of the image, or several (a list, or one per line); the caption
                methods read them (cap2seg: each caption's priors), the others ignore them.
            methods: method specs, or "cam,cls_saliency[grabcut=off]" (see `method`); default: the
                Predictor's `methods` (`fused` unless it was built with others).
        """
        state = self._require_state()
        positives, inline_negatives = parse_concepts(concepts)
        negs = tuple(n for n in dict.fromkeys(inline_negatives + parse_words(negatives or ())) if n not in positives)
        caption = _caption_text(caption)
        results = []
        for name in parse_methods(methods) if methods else self.methods:
            method = self.method(name)
            method.prepare(state, [*positives, *negs], caption)
            for concept in positives:
                results.append(method.predict(state, concept, negs, caption))
        return Prediction(image_size=state.size, results=results, negatives=negs, caption=caption)


def _caption_text(caption) -> str | None:
    """One caption, several (a list or tuple of strings), or None -> the methods' form: the captions one per
    line, or None when there is none."""
    if caption is None:
        return None
    if isinstance(caption, str):
        lines = caption.splitlines()
    elif isinstance(caption, (list, tuple)) and all(isinstance(c, str) for c in caption):
        lines = [line for c in caption for line in c.splitlines()]
    else:
        raise OvsegError(f"caption must be a string or a list of strings, got {type(caption).__name__}")
    text = "\n".join(line.strip() for line in lines if line.strip())
    return text or None
