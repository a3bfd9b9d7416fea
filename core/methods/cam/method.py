"""`cam`: the training-free reference. A word's nearest ImageNet classes -> class activation map.

The word is related to ImageNet classes by WordNet (the classes its sense covers, `Lexicon.imagenet_match`)
and by the text encoder (the TEXT_NEIGHBOURS class names nearest to the word). Each class c gets a weight
a_c = w_c * p_c, with w_c = 1 for WordNet classes and the cosine similarity for text neighbours, and p_c the
classifier's softmax probability on this image, so that the classes the image supports dominate.
The map is the CAM of the weighted classes, sum_c a_c * (W_c . f(x, y)) (Zhou et al. 2016; linear, so one
matrix product), rectified and divided by its maximum; the mask is map >= threshold; the presence score is
sum_c a_c, clipped to [0, 1]. Negative words remove the pixels where their map exceeds the word's.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ovseg.core.models.imagenet import imagenet_classes
from ovseg.core.methods.base import PRESENCE_THRESHOLD, ImageState, Method, upsample_map
from ovseg.core.registry import register_method
from ovseg.core.types import ConceptResult, Prior

TEXT_NEIGHBOURS = 5
# Chosen on the base classes (first 200 coco_dev images) by strict mIoU; see the README threshold table.
DEFAULT_THRESHOLD = 0.3


@register_method("cam")
class CAM(Method):
    summary = "Class activation map of the word's nearest ImageNet classes (training-free reference)"
    trained = False

    def __init__(self, models, threshold: float = DEFAULT_THRESHOLD, text_neighbours: int = TEXT_NEIGHBOURS):
        super().__init__(models, threshold=threshold, text_neighbours=text_neighbours)
        self.threshold = threshold  # validated by Method.threshold
        self.text_neighbours = text_neighbours
        self._relatives: dict[str, dict] = {}

    def related_classes(self, word: str) -> dict:
        """{"classes": LongTensor, "weights": FloatTensor, "wordnet": ImageNetMatch, "text": [(idx, sim)]}."""
        if word not in self._relatives:
            models = self.models
            match = models.lexicon.imagenet_match(word)
            top = torch.topk(models.class_similarity(word), self.text_neighbours)
            weights = {c: 1.0 for c in match.classes}
            text = []
            for s, c in zip(top.values.tolist(), top.indices.tolist()):
                text.append((c, s))
                weights.setdefault(c, max(s, 0.0))
            idx = torch.tensor(list(weights), dtype=torch.long, device=models.device)
            w = torch.tensor(list(weights.values()), dtype=torch.float32, device=models.device)
            self._relatives[word] = {"classes": idx, "weights": w, "wordnet": match, "text": text}
        return self._relatives[word]

    def _map(self, state: ImageState, word: str) -> tuple[torch.Tensor, float, dict]:
        """Low-resolution normalised CAM (h, w) in [0, 1], presence score, facts."""
        rel, a = self._class_weights(state, word)
        presence = float(a.sum().clamp(0.0, 1.0))
        if float(a.sum()) < 1e-12:  # the image supports none of the classes: weigh them by prior alone
            a = rel["weights"] if float(rel["weights"].sum()) > 0 else torch.ones_like(rel["weights"])
        fc = self.models.backbone.classifier.weight  # (1000, 1280)
        v = (a[:, None] * fc[rel["classes"]]).sum(0) / a.sum()
        cam = torch.einsum("c,chw->hw", v, state.features.head[0].float()).clamp_min(0.0)
        peak = float(cam.max())
        cam = cam / peak if peak > 0 else cam
        order = torch.argsort(a, descending=True)[:5]
        names = imagenet_classes()
        facts = {
            "top_classes": [(names[int(rel["classes"][i])].name, round(float(a[i]), 4)) for i in order],
            "wordnet_synset": rel["wordnet"].synset,
            "wordnet_via": rel["wordnet"].via,
            "wordnet_classes": len(rel["wordnet"].classes),
            "known_to_wordnet": rel["wordnet"].known,
        }
        return cam, presence, facts

    def _class_weights(self, state: ImageState, word: str) -> tuple[dict, torch.Tensor]:
        """The word's related classes and their weights a_c = w_c * p_c on this image."""
        rel = self.related_classes(word)
        return rel, rel["weights"] * state.class_probs[rel["classes"]]

    def presence(self, state, concept, caption=None) -> float:
        return float(self._class_weights(state, concept)[1].sum().clamp(0.0, 1.0))

    def predict(self, state, concept, negatives=(), caption=None) -> ConceptResult:
        t0 = time.perf_counter()
        with torch.no_grad():
            cam, presence, facts = self._map(state, concept)
            attention = _unit_peak(upsample_map(cam, state.size))
            mask = attention >= self.threshold
            if negatives:
                neg = np.max([_unit_peak(upsample_map(self._map(state, n)[0], state.size)) for n in negatives], axis=0)
                mask &= attention >= neg
        if not facts["wordnet_classes"]:
            facts["note"] = "no ImageNet relative in WordNet: the text encoder's nearest class names were used"
        facts["threshold"] = self.threshold
        prior = Prior(attention, self.name, concept, "attention", presence)
        return ConceptResult(
            concept=concept,
            method=self.name,
            mask=mask,
            score=presence,
            present=presence >= PRESENCE_THRESHOLD,
            priors=[prior],
            details=facts,
            ms=(time.perf_counter() - t0) * 1000.0,
        )


def _unit_peak(attention: np.ndarray) -> np.ndarray:
    """Rescale so that the maximum at image size is 1 (bilinear upsampling lowers the low-res peak)."""
    peak = float(attention.max())
    return attention / peak if peak > 0 else attention
