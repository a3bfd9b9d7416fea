"""`cls_saliency`: Golub et al., WACV 2020 (seed 002): proxy labels -> saliency priors S+ and S- ->
class-agnostic segmenter on RGB + S+ + S- -> GrabCut.

The paper's priors are guided backpropagation (`saliency=guided_backprop`); through this classifier they are
nearly the same picture for every class (median correlation of S+ and S- 0.99), so the default is the proxy
labels' class activation maps (`saliency=cam`, not the paper's), the variant that scores best on held-out
target classes (README, issue 17). Each result says how much S+ and S- differ (`saliency_correlation`).

Stand-ins: EfficientNet-Lite0 for VGG-19 (guided backprop through its ReLU6s), and an ASPP head on the same
backbone for DeepLabv3 on ResNet-50; the segmenter is trained on the base classes of coco_dev
(`ovseg train cls_saliency`) and ships in assets/checkpoints/cls_saliency/<variant>/.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from ovseg.core.errors import OvsegError
from ovseg.core.ops.grabcut import GrabCutConfig, grabcut_refine
from ovseg.core.models.imagenet import imagenet_classes
from ovseg.core.methods.base import PRESENCE_THRESHOLD, ImageState, Method, upsample_map
from ovseg.core.methods.cls_saliency.proxy_labels import K, proxy_labels
from ovseg.core.registry import register_method
from ovseg.core.methods.cls_saliency.saliency import (SALIENCY_MODES, cam_gate, cam_prior, class_activation, guided_net,
                                                      label_saliency, mean_saliency)
from ovseg.core.checkpoints import current_folder, packaged
from ovseg.core.ops.segmenter import foreground_probability, load_segmenter
from ovseg.core.types import ConceptResult, Prior

VARIANT_NEGATIVES = {"sem0c": "none", "sem1c": "none", "sem2c_rand": "random", "sem2c_neg": "classifier"}
DEFAULT_SALIENCY = "cam"  # the best on held-out target classes; "guided_backprop" is the paper's


def checkpoint_name(variant: str = "sem2c_neg", saliency: str = "guided_backprop") -> str:
    """The folder name of a trained segmenter under assets/checkpoints/cls_saliency/."""
    return variant if saliency == "guided_backprop" else f"{variant}-{saliency}"


def default_checkpoint(variant: str | None = None, saliency: str | None = None) -> Path:
    """The segmenter folder for a variant and saliency mode (None: the defaults): the version `ovseg retrain`
    made current when it was trained that way, else the packaged one."""
    current = current_folder("cls_saliency")
    if current is not None:
        trained = json.loads((current / "config.json").read_text()).get("train", {})
        if (variant in (None, trained.get("variant", "sem2c_neg"))
                and saliency in (None, trained.get("saliency", "guided_backprop"))):
            return current
    variant = variant or "sem2c_neg"
    if saliency is None:  # the default prior where a segmenter was trained on it (the paper's ablation: guided)
        with_default = packaged("cls_saliency", checkpoint_name(variant, DEFAULT_SALIENCY))
        saliency = DEFAULT_SALIENCY if with_default.is_dir() else "guided_backprop"
    return packaged("cls_saliency", checkpoint_name(variant, saliency))


@register_method("cls_saliency")
class ClsSaliency(Method):
    summary = "Golub et al.: WordNet proxy labels -> guided-backprop S+/S- -> 5-channel segmenter -> GrabCut"
    trained = True

    def __init__(self, models, variant: str | None = None, saliency: str | None = None,
                 checkpoint: str | Path | None = None, mapper: str = "wordnet", grabcut: bool = True,
                 threshold: float = 0.5, k: int = K):
        """variant: the paper's ablation (sem0c: RGB only; sem1c: + S+; sem2c_rand: + S- of random labels;
        sem2c_neg: + S- of the classifier's top unrelated labels, the method and the default). saliency:
        "cam" (the labels' CAM itself, `cam_prior`; the default), "guided_backprop" (the paper's) or
        "cam_gated" (guided backprop gated by the same labels' CAM; see
        `ovseg.core.methods.cls_saliency.saliency.cam_gate`). Both select a packaged checkpoint; a
        `checkpoint` folder instead brings its own variant and saliency in its config.json."""
        super().__init__(models, variant=variant, saliency=saliency, checkpoint=checkpoint, mapper=mapper,
                         grabcut=grabcut, k=k)
        if variant is not None and variant not in VARIANT_NEGATIVES:
            raise OvsegError(f"cls_saliency variant must be one of {', '.join(VARIANT_NEGATIVES)}, got {variant!r}")
        if saliency is not None and saliency not in SALIENCY_MODES:
            raise OvsegError(f"cls_saliency saliency must be one of {', '.join(SALIENCY_MODES)}, got {saliency!r}")
        if checkpoint is None:
            checkpoint = default_checkpoint(variant, saliency)
        self.segmenter = load_segmenter(checkpoint, models.device)
        trained = json.loads((Path(checkpoint) / "config.json").read_text()).get("train", {})
        self.variant = trained.get("variant", "sem2c_neg")
        self.saliency = trained.get("saliency", "guided_backprop")
        for asked, found, what in ((variant, self.variant, "variant"), (saliency, self.saliency, "saliency")):
            if asked is not None and asked != found:
                raise OvsegError(f"checkpoint {checkpoint} was trained with {what} {found!r}, not {asked!r}")
        self.threshold = threshold  # used when GrabCut is off: P >= threshold
        self.mapper, self.k = mapper, k
        self.grabcut = GrabCutConfig(enabled=bool(grabcut))
        self.in_channels = self.segmenter.config.in_channels
        self.negatives = VARIANT_NEGATIVES[self.variant]

    def presence(self, state: ImageState, concept, caption=None) -> float:
        """The classifier's probability mass on the classes the mapper relates to the word (kept in the
        image's cache: every variant of the method shares it)."""
        key = ("cls_saliency_presence", self.mapper, self.k, concept)
        if key not in state.cache:
            related = proxy_labels(self.models, concept, state.class_probs, self.mapper, self.k, "none").related
            state.cache[key] = _probability_mass(state, related)
        return state.cache[key]

    def priors(self, state: ImageState, concept, negatives=()):
        """(proxies, negative labels, S+, S-), the maps at the network input's size. S- is zeros for
        sem0c/sem1c unless the user gave negative words, whose nearest classes join the negative labels."""
        probs = state.class_probs
        proxies = proxy_labels(self.models, concept, probs, self.mapper, self.k, self.negatives,
                               seed=zlib.crc32(concept.encode()))
        # Words the user marks as negative join the classifier's distractors in S-.
        extra = [c for n in negatives for c in proxy_labels(self.models, n, probs, self.mapper, 1, "none").positive]
        neg_labels = tuple(dict.fromkeys(proxies.negative + tuple(extra)))
        shape = tuple(state.input.shape[-2:])
        head, fc = state.features.head[0].float(), self.models.backbone.classifier.weight
        if self.saliency == "cam":  # dense CAM priors: no guided backprop at all
            s_pos = cam_prior(class_activation(head, fc, proxies.positive), shape)
            s_neg = cam_prior(class_activation(head, fc, neg_labels), shape)
            return proxies, neg_labels, s_pos, s_neg
        maps = label_saliency(guided_net(self.models), state.cache, state.input, proxies.positive + neg_labels)
        s_pos = mean_saliency(maps, proxies.positive, shape).to(state.input.device)
        s_neg = mean_saliency(maps, neg_labels, shape).to(state.input.device)
        if self.saliency == "cam_gated":
            s_pos = cam_gate(s_pos, class_activation(head, fc, proxies.positive))
            s_neg = cam_gate(s_neg, class_activation(head, fc, neg_labels))
        return proxies, neg_labels, s_pos, s_neg

    def predict(self, state: ImageState, concept, negatives=(), caption=None) -> ConceptResult:
        t0 = time.perf_counter()
        proxies, neg_labels, s_pos, s_neg = self.priors(state, concept, negatives)
        channels = [state.input, s_pos[None, None], s_neg[None, None]][: 1 + self.in_channels - 3]
        with torch.no_grad():
            prob = foreground_probability(self.segmenter(torch.cat(channels, dim=1)))[0]
        p = upsample_map(prob, state.size)
        if self.grabcut.enabled:
            mask = grabcut_refine(state.image, p, self.grabcut)
        else:
            mask = p >= self.threshold
        presence = self.presence(state, concept)
        priors = [Prior(upsample_map(s_pos, state.size), self.name, concept, "saliency_positive", presence),
                  Prior(upsample_map(s_neg, state.size), self.name, concept, "saliency_negative"),
                  Prior(p, self.name, concept, "probability", float(p.max()))]
        names = imagenet_classes()
        details = {"positive_proxies": proxies.names("positive"),
                   "negative_proxies": [names[i].name for i in neg_labels],
                   "mapper": proxies.source, "grabcut": self.grabcut.enabled, "variant": self.variant,
                   "saliency": self.saliency}
        if neg_labels:  # how much S- says that S+ does not: 1 means the same picture
            details["saliency_correlation"] = round(prior_correlation(s_pos, s_neg), 4)
        if proxies.note:
            details["note"] = proxies.note
        return ConceptResult(concept, self.name, np.asarray(mask, dtype=bool), presence,
                             presence >= PRESENCE_THRESHOLD, priors, details=details,
                             ms=(time.perf_counter() - t0) * 1000.0)


def prior_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps' pixels (0 where either is constant)."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a @ b) / denom) if denom > 0 else 0.0


def _probability_mass(state: ImageState, classes) -> float:
    return float(state.class_probs[list(classes)].sum().clamp(0, 1))
