"""`cls_saliency`: Golub et al., WACV 2020 (seed 002): proxy labels -> guided-backprop saliency priors
S+ and S- -> class-agnostic segmenter on RGB + S+ + S- -> GrabCut.

Stand-ins: EfficientNet-Lite0 for VGG-19 (guided backprop through its ReLU6s), and an ASPP head on the same
backbone for DeepLabv3 on ResNet-50; the segmenter is trained on the base classes of coco_dev
(`ovseg train cls_saliency`) and ships in assets/checkpoints/cls_saliency/<variant>/.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ovseg.core.grabcut import GrabCutConfig, grabcut_refine
from ovseg.core.methods.base import ImageState, Method, upsample_map
from ovseg.core.proxy_labels import K, proxy_labels
from ovseg.core.registry import register_method
from ovseg.core.saliency import label_saliency, mean_saliency
from ovseg.core.segmenter import foreground_probability, load_segmenter, packaged_checkpoint
from ovseg.core.types import ConceptResult, Prior

PRESENCE_THRESHOLD = 0.05


@register_method("cls_saliency")
class ClsSaliency(Method):
    summary = "Golub et al.: WordNet proxy labels -> guided-backprop S+/S- -> 5-channel segmenter -> GrabCut"
    trained = True

    def __init__(self, models, checkpoint: str | Path | None = None, mapper: str = "wordnet",
                 grabcut: bool = True, threshold: float = 0.5, k: int = K):
        super().__init__(models, checkpoint=checkpoint, mapper=mapper, grabcut=grabcut, k=k)
        self.threshold = threshold  # used when GrabCut is off: P >= threshold
        self.mapper, self.k = mapper, k
        self.grabcut = GrabCutConfig(enabled=grabcut)
        self.segmenter = load_segmenter(checkpoint or packaged_checkpoint(), models.device)
        self.in_channels = self.segmenter.config.in_channels
        self.negatives = "classifier" if self.in_channels == 5 else "none"

    def presence(self, state: ImageState, concept, caption=None) -> float:
        """The classifier's probability mass on the classes the mapper relates to the word."""
        related = proxy_labels(self.models, concept, state.class_probs, self.mapper, self.k, "none").related
        return _probability_mass(state, related)

    def predict(self, state: ImageState, concept, negatives=(), caption=None) -> ConceptResult:
        t0 = time.perf_counter()
        probs = state.class_probs
        proxies = proxy_labels(self.models, concept, probs, self.mapper, self.k, self.negatives)
        # Words the user marks as negative join the classifier's distractors in S-.
        extra = [c for n in negatives for c in proxy_labels(self.models, n, probs, self.mapper, 1, "none").positive]
        neg_labels = tuple(dict.fromkeys(proxies.negative + tuple(extra)))
        maps = label_saliency(self.models.guided_net, state.cache, state.input, proxies.positive + neg_labels)
        shape = tuple(state.input.shape[-2:])
        s_pos = mean_saliency(maps, proxies.positive, shape).to(state.input.device)
        s_neg = mean_saliency(maps, neg_labels, shape).to(state.input.device)
        channels = [state.input, s_pos[None, None], s_neg[None, None]][: 1 + self.in_channels - 3]
        with torch.no_grad():
            prob = foreground_probability(self.segmenter(torch.cat(channels, dim=1)))[0]
        p = upsample_map(prob, state.size)
        if self.grabcut.enabled:
            mask = grabcut_refine(state.image, p, self.grabcut)
        else:
            mask = p >= self.threshold
        presence = _probability_mass(state, proxies.related)  # what presence() computes, proxies in hand
        priors = [Prior(upsample_map(s_pos, state.size), self.name, concept, "saliency_positive", presence),
                  Prior(upsample_map(s_neg, state.size), self.name, concept, "saliency_negative"),
                  Prior(p, self.name, concept, "probability", float(p.max()))]
        details = {"positive_proxies": proxies.names("positive"), "negative_proxies": proxies.names("negative"),
                   "mapper": proxies.source, "grabcut": self.grabcut.enabled}
        if proxies.note:
            details["note"] = proxies.note
        return ConceptResult(concept, self.name, np.asarray(mask, dtype=bool), presence,
                             presence >= PRESENCE_THRESHOLD, priors, details=details,
                             ms=(time.perf_counter() - t0) * 1000.0)


def _probability_mass(state: ImageState, classes) -> float:
    return float(state.class_probs[list(classes)].sum().clamp(0, 1))
