"""`concept_mask`: Concept Mask (Wang et al., ECCV 2018, seed 001): a word -> PMI word vector (or the text
encoder's vector mapped into the PMI space) -> coarse attention map (eq. 1) of the image at two input sizes ->
refined attention (the refinement network; for a word without box supervision, blended with its nearest
refined concept, sec. 4.4) -> label-agnostic segmentation network on the image + the two attention maps ->
mask; presence from the attention-weighted verification score (supplementary 5), calibrated on base classes
(`verification.py`): per-concept thresholds, a probability, and a gate that empties the mask only when a
base concept is confidently absent. Any other word judged absent keeps its mask and maps, marked.

Stand-ins (see the README): EfficientNet-Lite0 for ResNet-50 (frozen), coco_dev's training images for the
paper's 6M-image Stock-18K and its box and mask sets, the project's segmenter for the Inception-V2 streams.
Trained by `ovseg train concept_mask`; ships in assets/checkpoints/concept_mask/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ovseg.core.models.backbone import input_size, preprocess
from ovseg.core.image_io import pixel_key
from ovseg.core.methods.concept_mask.attention import ConceptAttentionModel
from ovseg.core.methods.concept_mask.verification import Calibration, CalibrationSet
from ovseg.core.checkpoints import packaged
from ovseg.core.errors import OvsegError
from ovseg.core.methods.base import ImageState, Method, upsample_map
from ovseg.core.registry import register_method
from ovseg.core.ops.segmenter import foreground_probability, load_segmenter
from ovseg.core.types import ConceptResult, Prior

ATTENTION_VARIANTS = {"refined": "attention", "nosd": "attention_nosd", "original": "attention_original"}


def _chosen_threshold(config: dict, scales: int) -> float:
    """The mask threshold training chose for the segmenter with this many attention channels (0.5 when the
    model's config.json has none)."""
    return float(config.get("mask_threshold", {}).get("segmenter" if scales == 2 else "segmenter_single", 0.5))


@register_method("concept_mask")
class ConceptMask(Method):
    summary = "Concept Mask: PMI word embedding -> attention at two scales -> refinement -> label-agnostic segmenter"
    trained = True

    def __init__(self, models, checkpoint: str | Path | None = None, attention: str = "refined", scales: int = 2,
                 threshold: float | None = None, verify: bool = True):
        """attention: "refined" (the method), "nosd" (refinement trained without the spatial discrimination
        loss) or "original" (the stage-1 embedding network's coarse maps, no refinement): Table 1's columns.
        scales: 2 (attention at both input sizes, the method) or 1 (the larger size only: the ablation).
        threshold: on the segmenter's foreground probability (default: the one training chose on held-out
        base-class pairs). verify: the gate (a base concept confidently judged absent gets an empty mask);
        off: never emptied."""
        super().__init__(models, checkpoint=checkpoint, attention=attention, scales=scales, verify=verify)
        if attention not in ATTENTION_VARIANTS:
            raise OvsegError(f"concept_mask attention must be one of {', '.join(ATTENTION_VARIANTS)}, got {attention!r}")
        if scales not in (1, 2):
            raise OvsegError(f"concept_mask scales must be 1 or 2, got {scales!r}")
        folder = Path(checkpoint) if checkpoint is not None else packaged("concept_mask")
        self.model = ConceptAttentionModel(folder, models.device, ATTENTION_VARIANTS[attention])
        self.segmenter = load_segmenter(folder / ("segmenter" if scales == 2 else "segmenter_single"), models.device)
        self.attention_variant, self.n_scales, self.verify = attention, scales, bool(verify)
        self.scales = tuple(self.model.config["scales"])
        self.threshold = _chosen_threshold(self.model.config, scales) if threshold is None else threshold
        path = folder / "verification.json"
        # a model trained before the calibration existed: its one threshold, no gate
        self.calibrations = CalibrationSet.load(path) if path.is_file() else CalibrationSet(
            Calibration(self.model.presence_threshold), [], {"note": "uncalibrated: no verification.json"})

    @classmethod
    def default_threshold(cls) -> float | None:
        """The threshold training chose for the packaged two-scale segmenter (None without a packaged model)."""
        path = packaged("concept_mask") / "config.json"
        return _chosen_threshold(json.loads(path.read_text()), scales=2) if path.is_file() else None

    def _text_vector(self, word: str) -> np.ndarray:
        return self.models.embed_words([word])[0].cpu().numpy()

    def _image(self, state: ImageState) -> dict:
        """Per image and attention variant: head features and attention-network maps at each input size."""
        key = ("concept_mask", str(self.model.folder), self.attention_variant)
        if key not in state.cache:
            feats = state.cache.setdefault("backbone_heads", {})
            out = {}
            for s in self.scales:
                if s not in feats:
                    x = preprocess(state.image, input_size(*state.size, s), self.models.device)
                    with torch.no_grad():
                        feats[s] = self.models.backbone(x).head.float()
                out[s] = {"head": feats[s], "maps": self.model.maps(feats[s])}
            state.cache[key] = out
        return state.cache[key]

    def _word(self, word: str):
        try:
            return self.model.word(word, self._text_vector)
        except KeyError as exc:
            raise OvsegError(str(exc)) from None

    def attention_maps(self, state: ImageState, word: str) -> dict:
        """{"word": WordAttention, "coarse": {scale: (h, w)}, "attention": {scale: (h, w)}}, maps in [0, 1]."""
        image, w = self._image(state), self._word(word)
        out = {"word": w, "coarse": {}, "attention": {}}
        for s in self.scales:
            a = self.model.attention(image[s]["maps"], w)
            if self.attention_variant == "original":  # the stage-1 network has no trained refinement
                a["attention"] = a["coarse"]
            out["coarse"][s], out["attention"][s] = a["coarse"], a["attention"]
        return out

    def _verification(self, state: ImageState, att: dict) -> float:
        s = self.scales[-1]
        head = self._image(state)[s]["head"]
        with torch.no_grad():
            return float(self.model.net.verification(head, att["attention"][s][None], att["word"].vector)[0])

    def verification(self, state: ImageState, concept: str) -> float:
        """The verification cosine of the word on the image (supplementary 5)."""
        return self._verification(state, self.attention_maps(state, concept))

    def calibration(self, state: ImageState) -> tuple[Calibration, str]:
        """The calibration that judges this image (cross-fitted for the images it was fitted on)."""
        key = ("concept_mask", "calibration", str(self.model.folder))
        if key not in state.cache:
            state.cache[key] = self.calibrations.for_image(pixel_key(state.image))
        return state.cache[key]

    def presence(self, state: ImageState, concept, caption=None) -> float:
        """P(present) from the calibrated verification cosine."""
        return self.calibration(state)[0].probability(concept, self.verification(state, concept))

    def predict(self, state: ImageState, concept, negatives=(), caption=None) -> ConceptResult:
        t0 = time.perf_counter()
        att = self.attention_maps(state, concept)
        used = list(self.scales) if self.n_scales == 2 else [self.scales[-1]]
        hw = tuple(state.input.shape[-2:])
        channels = [state.input] + [torch.nn.functional.interpolate(att["attention"][s][None, None], size=hw,
                                                                    mode="bilinear", align_corners=False)
                                    for s in used]
        with torch.no_grad():
            prob = foreground_probability(self.segmenter(torch.cat(channels, dim=1)))[0]
        p = upsample_map(prob, state.size)
        cosine = self._verification(state, att)
        calibration, fold = self.calibration(state)
        threshold, own = calibration.threshold(concept)
        probability = calibration.probability(concept, cosine)
        present = cosine >= threshold
        mask = p >= self.threshold
        emptied = self.verify and calibration.empties(concept, cosine)
        if emptied:
            mask = np.zeros_like(mask)
        attention = upsample_map(att["attention"][self.scales[-1]], state.size)
        for n in negatives:  # pixels where a negative word's attention beats the word's are removed
            mask &= attention >= upsample_map(self.attention_maps(state, n)["attention"][self.scales[-1]], state.size)
        score = probability
        w = att["word"]
        if emptied:
            gate = f"emptied: confidently absent (P(present) {probability:.2f} < {calibration.gate:g})"
        elif not present:
            gate = ("kept: judged absent, not confidently" if calibration.covers(concept) else
                    "kept: judged absent, but verification is not calibrated for this word")
        else:
            gate = "kept: verified present"
        details = {"word_vector": w.source, "refined_concept": w.refined, "verification_cosine": round(cosine, 4),
                   "presence_threshold": round(threshold, 4), "threshold_source": "its own" if own else "shared",
                   "presence_probability": round(probability, 4), "gate_level": calibration.gate,
                   "gate": gate, "calibration": fold, "attention": self.attention_variant,
                   "scales": used, "verified_present": bool(present)}
        if not w.refined:
            details.update(nearest_refined=w.neighbour, nearest_similarity=round(w.neighbour_similarity, 3),
                           theta=self.model.theta)
        if w.source == "text encoder":
            details["note"] = "not a tag of the training corpus: its text-encoder vector was mapped into the PMI space"
        absent = "" if present else " (judged absent)"
        priors = [Prior(upsample_map(att["coarse"][self.scales[-1]], state.size), self.name, concept, "attention", score,
                        label=f"attention{absent}"),
                  Prior(attention, self.name, concept, "attention_refined", score, label=f"attention refined{absent}"),
                  Prior(p, self.name, concept, "probability", float(p.max()))]
        return ConceptResult(concept, self.name, np.asarray(mask, dtype=bool), score, bool(present), priors,
                             details=details, ms=(time.perf_counter() - t0) * 1000.0)
