"""`fused`: the default method. One mask and one calibrated presence probability per word, from the evidence
every other method computes on the cached image (`evidence.py`), combined by a model learned on base classes
with cross-fitting (`combiner.py`, trained by `ovseg train fused`).

The mask is the combined probability (on a working grid, bilinearly upsampled) at the combiner's threshold,
optionally refined with GrabCut (`refine=grabcut`). When the word is judged present, each connected part of
the mask is one instance (`PseudoLabel`: its score is the presence probability, its reliability the mean
combined probability inside it relative to the word's peak); a word judged absent keeps its mask and maps, marked absent, and offers no
instance to label. The result says which evidence decided it: the expert mix (by the word's familiarity) and the evidence
terms that pushed the mask's pixels most.

With a caption (or several, one per line), Cap2Seg's caption priors join the evidence and the combiner's caption
experts decide presence (`combiner.py`); the stripe prior V* and the local prior are shown beside the mask and
move its pixels only in a combiner trained with `--caption-pixels`. `captions=off` ignores captions (the
caption-free experts, as without one).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.core.checkpoints import packaged
from ovseg.core.errors import OvsegError
from ovseg.core.methods.base import ImageState, Method
from ovseg.core.image_io import pixel_key as image_key
from ovseg.core.methods.fused.combiner import CrossFitted, pixel_features, relative_mask
from ovseg.core.methods.fused.evidence import Evidence
from ovseg.core.registry import register_method
from ovseg.core.types import ConceptResult, Prior, PseudoLabel

MIN_INSTANCE = 0.01  # connected parts smaller than this share of the image are not instances
MIN_INSTANCE_OF_LARGEST = 0.2  # nor parts smaller than this share of the largest part (fragments)
REFINE = ("none", "grabcut")


@register_method("fused")
class Fused(Method):
    summary = "Default: CAM, XPM proposals and heads, Concept Mask attention -> learned, cross-fitted combiner"
    trained = True

    def __init__(self, models, checkpoint: str | Path | None = None, refine: str = "none",
                 threshold: float | None = None, captions: bool = True):
        """refine: "none" (the combined probability at the combiner's threshold) or "grabcut". threshold:
        overrides the combiner's per-word threshold (in [0, 1]). captions: read the caption priors when a
        caption is given (False: ignore captions)."""
        super().__init__(models, checkpoint=checkpoint, refine=refine, threshold=threshold, captions=captions)
        if not isinstance(captions, bool):
            raise OvsegError(f"fused captions must be on or off, got {captions!r}")
        if refine not in REFINE:
            raise OvsegError(f"fused refine must be one of {', '.join(REFINE)}, got {refine!r}")
        folder = Path(checkpoint) if checkpoint is not None else packaged("fused")
        if not (folder / "combiner.json").is_file():
            raise OvsegError(f"no fused combiner at {folder}: run `ovseg train fused --out {folder}`")
        self.combiners = CrossFitted(folder)
        self.evidence = Evidence(models, self.combiners.base_vocabulary)
        self.refine = refine
        self.use_captions = captions and self.combiners.all.reads_captions
        self.fixed_threshold = threshold
        if threshold is not None:
            self.threshold = threshold

    def _combiner(self, state: ImageState):
        key = ("fused", "combiner", str(self.combiners.folder))
        if key not in state.cache:
            state.cache[key] = self.combiners.for_image(image_key(state.image))
        return state.cache[key]

    def _captions(self, caption) -> tuple[str, ...]:
        from ovseg.core.methods.cap2seg.method import split_captions

        return tuple(split_captions(caption)) if self.use_captions else ()

    def prepare(self, state: ImageState, concepts, caption=None) -> None:
        captions = self._captions(caption)
        if captions:  # one pass of the entailment model for every word
            self.evidence.cap2seg.caption_priors_many(state, list(captions), list(concepts))

    def _probability(self, state: ImageState, concept: str, captions=()):
        ev = self.evidence.word(state, concept, captions)
        combiner, which = self._combiner(state)
        known = ev.scores["familiarity"]
        p, t, experts = combiner.pixel_probability(ev.maps, known)
        return ev, combiner, which, known, p, t, experts

    def presence(self, state: ImageState, concept, caption=None) -> float:
        ev = self.evidence.word(state, concept, self._captions(caption))
        combiner, _ = self._combiner(state)
        return combiner.presence_probability(ev.scores, ev.scores["familiarity"])[0]

    def predict(self, state: ImageState, concept, negatives=(), caption=None) -> ConceptResult:
        t0 = time.perf_counter()
        captions = self._captions(caption)
        with torch.no_grad():
            ev, combiner, which, known, p_grid, t, experts = self._probability(state, concept, captions)
            t = self.fixed_threshold if self.fixed_threshold is not None else t
            p = _upsample(p_grid, state.size)
            if self.refine == "grabcut" and p.max() > t:
                from ovseg.core.ops.grabcut import GrabCutConfig, grabcut_refine

                mask = grabcut_refine(state.image, p, GrabCutConfig())
            else:
                mask = p >= t * max(float(p.max()), 1e-6)
            for n in negatives:  # pixels a negative word explains better than this one are removed
                mask &= p >= _upsample(self._probability(state, n, captions)[4], state.size)
            presence, presence_experts = combiner.presence_probability(ev.scores, known)
        fam = ev.facts["familiarity"]
        captioned = "caption" in ev.facts and combiner.reads_captions
        k_expert, a_expert = combiner.experts(captioned, "pixel")
        details = {
            "decided_by": _decisive_evidence(combiner, ev.maps, known, relative_mask(p_grid, t), captioned),
            "experts": f"{k_expert.replace('_', ' ')} x {known:.2f} + {a_expert.replace('_', ' ')} x {1 - known:.2f}",
            "familiarity": {"nearest_base_class": fam["nearest_base_class"],
                            "base_similarity": round(fam["base_similarity"], 3),
                            "imagenet_similarity": round(fam["imagenet_similarity"], 3)},
            "presence_experts": {k: round(v, 3) for k, v in presence_experts.items()},
            "evidence_scores": {k: round(float(v), 3) for k, v in ev.scores.items()},
            "threshold": round(float(t), 3),
            "present_at": round(combiner.presence_threshold(known, captioned), 3),
            "cam_classes": ev.facts["cam_top_classes"],
            "combiner": which,
            "refine": self.refine,
        }
        size = state.size
        priors = [Prior(_upsample(ev.maps["cam"], size), self.name, concept, "attention", ev.scores["cam_mass"],
                        "evidence: CAM"),
                  Prior(_upsample(ev.maps["cam_regions"], size), self.name, concept, "attention",
                        ev.scores["cam_region_best"], "evidence: CAM on object proposals"),
                  Prior(_upsample(ev.maps["xpm"], size), self.name, concept, "probability", ev.scores["xpm_best"],
                        "evidence: XPM regions"),
                  Prior(_upsample(ev.maps["attention"], size), self.name, concept, "attention_refined",
                        ev.scores["verification"], "evidence: Concept Mask attention"),
                  Prior(p / max(float(p.max()), 1e-6), self.name, concept, "probability", presence,
                        "fused probability, relative to its peak")]
        if captioned:
            cap = ev.facts["caption"]
            details.update(caption_occurrence=round(cap["occurrence"], 4), captions=cap["captions"],
                           fused_stripes=[round(float(v), 3) for v in cap["stripes"]])
            priors.insert(0, Prior(_upsample(ev.maps["caption_stripes"], size), self.name, concept, "caption",
                                   cap["occurrence"], "evidence: caption stripes V* (Cap2Seg)"))
            if float(ev.maps["local"].max()) > 0:
                priors.insert(1, Prior(_upsample(ev.maps["local"], size), self.name, concept, "local",
                                       float(ev.maps["local"].max()), "evidence: Cap2Seg local prior"))
        elif caption and not self.use_captions:
            details["captions"] = "ignored (captions=off, or a combiner trained without caption experts)"
        mask = np.asarray(mask, dtype=bool)
        present = presence >= combiner.presence_threshold(known, captioned)
        return ConceptResult(concept, self.name, mask, presence, present, priors,
                             pseudo_labels=_instances(mask, p, concept, presence, self.name) if present else [],
                             details=details, ms=(time.perf_counter() - t0) * 1000.0)


def _upsample(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    up = F.interpolate(grid[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    return up.clamp_(0.0, 1.0).cpu().numpy().astype(np.float32)


def _decisive_evidence(combiner, maps: dict, known: float, inside: torch.Tensor,
                       captioned: bool = False) -> list[tuple[str, float]]:
    """The evidence terms that raised the mask's pixels most: each feature's weight times its standardised
    value, averaged over the mask's grid pixels and mixed over the experts like the probabilities."""
    if not bool(inside.any()):
        return []
    totals: dict[str, float] = {}
    k_expert, a_expert = combiner.experts(captioned, "pixel")
    for expert, share in ((k_expert, known), (a_expert, 1.0 - known)):
        if share <= 0:
            continue
        m = combiner.pixel[expert]
        x = pixel_features(maps, m.names)[inside.reshape(-1)]
        z = (x - torch.from_numpy(m.mean).float()) / torch.from_numpy(m.std).float()
        contrib = (z * torch.from_numpy(m.weights).float()).mean(0)
        for name, c in zip(m.names, contrib.tolist()):
            totals[name] = totals.get(name, 0.0) + share * c
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return [(k, round(v, 2)) for k, v in ranked[:3]]


def _instances(mask: np.ndarray, p: np.ndarray, concept: str, presence: float, method: str) -> list[PseudoLabel]:
    """One PseudoLabel per connected part of the mask; fragments (under MIN_INSTANCE of the image, or under
    MIN_INSTANCE_OF_LARGEST of the largest part) are no instance of their own."""
    import cv2

    if not mask.any():
        return []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    least = max(MIN_INSTANCE * mask.size, MIN_INSTANCE_OF_LARGEST * float(areas.max()))
    out = []
    for k in range(1, n):
        if areas[k - 1] < least:
            continue
        part = labels == k
        reliability = float(p[part].mean()) / max(float(p.max()), 1e-6)  # support relative to the word's peak
        out.append(PseudoLabel(part, concept, float(presence), method, reliability=min(1.0, reliability)))
    out.sort(key=lambda pl: -int(pl.mask.sum()))
    return out
