"""The small interface every method implements, and the per-image state the predictor caches."""

from __future__ import annotations

import inspect

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.core.models.backbone import BackboneFeatures
from ovseg.core.errors import OvsegError
from ovseg.core.models import Models
from ovseg.core.types import ConceptResult


# The least ImageNet-classifier probability mass on a word's related classes for it to count as present
# (`cam`, `cls_saliency`), chosen on base classes.
PRESENCE_THRESHOLD = 0.05


@dataclass
class ImageState:
    """What `Predictor.set_image` computes once: the RGB image (HWC uint8), the network input and the
    backbone features. `cache` holds per-image work a method wants to reuse across concepts."""

    image: np.ndarray
    input: torch.Tensor
    features: BackboneFeatures
    cache: dict = field(default_factory=dict)

    @classmethod
    def compute(cls, models: Models, rgb: np.ndarray, long_side: int) -> "ImageState":
        """The state of a decoded RGB image (HWC uint8): the network input at `long_side` and its backbone
        features, as `Predictor.set_image` makes it (trainers use it on dataset images)."""
        from ovseg.core.models.backbone import input_size, preprocess

        x = preprocess(rgb, input_size(rgb.shape[0], rgb.shape[1], long_side), models.device)
        with torch.no_grad():
            feats = models.backbone(x)
        return cls(image=rgb, input=x, features=feats)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    @property
    def class_probs(self) -> torch.Tensor:
        """(1000,) softmax of the classifier's logits on this image, computed once."""
        if "class_probs" not in self.cache:
            self.cache["class_probs"] = torch.softmax(self.features.logits[0].float(), dim=0)
        return self.cache["class_probs"]


class Method:
    """A segmentation method. Subclasses set `summary` and `trained`, and implement `predict`.

    `name` is set by `@register_method`.
    """

    name: str = ""
    summary: str = ""
    trained: bool = False  # needs a checkpoint from assets/ (or a user's)

    def __init__(self, models: Models, **options):
        self.models = models
        self.options = options
        self._threshold = float("nan")

    @property
    def threshold(self) -> float:
        """The mask threshold in [0, 1]; may be changed between predict calls."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise OvsegError(f"the {self.name} mask threshold must lie in [0, 1], got {value}")
        self._threshold = value

    @classmethod
    def default_threshold(cls) -> float | None:
        """The mask threshold an instance gets without options (its constructor's default); None if the
        method has no threshold."""
        param = inspect.signature(cls).parameters.get("threshold")
        if param is None or param.default is inspect.Parameter.empty or param.default is None:
            return None
        return float(param.default)

    def prepare(self, state: ImageState, concepts: list[str], caption: str | None = None) -> None:
        """Called with every word of a request before `predict`/`presence` run word by word: a method whose
        per-word work batches well (a text model over the captions) does it here for all words at once and
        keeps it in `state.cache`. The default does nothing."""

    def predict(
        self, state: ImageState, concept: str, negatives: tuple[str, ...] = (), caption: str | None = None
    ) -> ConceptResult:
        raise NotImplementedError

    def presence(self, state: ImageState, concept: str, caption: str | None = None) -> float:
        """The presence score of `predict` alone; methods override it where it is cheaper than a mask."""
        return self.predict(state, concept, (), caption).score


def upsample_map(score_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) tensor -> (H, W) float32 numpy, bilinear, clipped to [0, 1]."""
    up = F.interpolate(score_map[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    return up.clamp_(0.0, 1.0).cpu().numpy()
