"""`xpm`: XPM (Huynh et al., CVPR 2022, seed 003): instance pseudo-masks for words, with per-pixel noise maps
and a reliability score per mask, from the robust student trained by `ovseg train xpm`.

For a word w (and negatives), every class-agnostic proposal r gets the softmax over (background = the zero
vector, w, the negatives) of the scores v^T g_Emb(f_r) (eq. 1). The instances of w are the proposals where w
wins with probability >= threshold, after NMS. When no proposal reaches the threshold, the best-scoring
proposal is taken, as cross-modal pseudo-labelling does (eq. 2): by default for any word (`align=always`,
the better setting measured on coco_dev: a word typed is a word the user expects to see), with
`align=caption` only for the object nouns of the given caption (the paper's pseudo-labelling), with
`align=off` never. The presence score (the best proposal's probability) still tells an absent word.
Each instance's mask is the mask head's (logit >= 0), its noise map g_Noise's variance above its floor (1e-4),
scaled so that the training set's 99th percentile pixel variance shows as 1, and its reliability eq. 7's
eta / mean noise (clipped to 1).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ovseg.core.ops.boxes import nms, paste_masks, rescale_boxes
from ovseg.core.models.caption_nouns import object_nouns
from ovseg.core.checkpoints import in_use
from ovseg.core.errors import OvsegError
from ovseg.core.methods.base import ImageState, Method
from ovseg.core.registry import register_method
from ovseg.core.types import ConceptResult, Prior, PseudoLabel
from ovseg.core.methods.xpm.losses import mean_noise, reliability
from ovseg.core.methods.xpm.model import LOG_VAR_MIN, XPMNet, word_scores

NETWORKS = ("student", "student_plain", "teacher")
ALIGN = ("always", "caption", "off")
MAX_INSTANCES = 20
NMS_IOU = 0.5


@register_method("xpm")
class XPM(Method):
    summary = "XPM: caption nouns -> teacher-aligned pseudo-masks -> robust student with noise maps and reliability"
    trained = True

    def __init__(self, models, checkpoint: str | Path | None = None, network: str = "student",
                 threshold: float = 0.5, align: str = "always"):
        """network: "student" (the robust student, the method), "student_plain" (no noise estimation) or
        "teacher" (the paper's Table 3 rows). threshold: the least probability of an instance.
        align: when to fall back on the best region (eq. 2): always, for caption nouns, or never ("off")."""
        super().__init__(models, checkpoint=checkpoint, network=network, align=align)
        if network not in NETWORKS:
            raise OvsegError(f"xpm network must be one of {', '.join(NETWORKS)}, got {network!r}")
        if align not in ALIGN:
            raise OvsegError(f"xpm align must be one of {', '.join(ALIGN)}, got {align!r}")
        folder = Path(checkpoint) if checkpoint is not None else in_use("xpm")
        path = folder / f"{network}.pt"
        if not path.is_file():
            raise OvsegError(f"no XPM {network} network at {path}: run `ovseg train xpm --out {folder}`")
        self.net, extra = XPMNet.load(path, models.device)
        self.folder, self.network, self.align = folder, network, align
        self.eta = float(extra.get("eta", float("nan")))
        self.noise_scale = float(extra.get("noise_scale", 1.0))
        self.threshold = threshold

    def _image(self, state: ImageState) -> dict:
        key = ("xpm", str(self.folder), self.network)
        if key not in state.cache:
            with torch.no_grad():
                pyr = self.net.pyramid(state.features)
                input_hw = tuple(state.input.shape[-2:])
                boxes, _ = self.net.proposals(pyr, input_hw)
                emb = self.net.embed(pyr, boxes)
            state.cache[key] = {"pyr": pyr, "boxes": boxes, "image_boxes": rescale_boxes(boxes, input_hw, state.size),
                                "emb": emb}
        return state.cache[key]

    def _probabilities(self, state: ImageState, words: list[str]) -> torch.Tensor:
        """(R, 1 + len(words)) softmax over background and the words, per proposal."""
        img = self._image(state)
        vectors = self.models.embed_words(words).float().to(img["emb"].device)
        return torch.softmax(word_scores(img["emb"], vectors), dim=1)

    def presence(self, state, concept, caption=None) -> float:
        p = self._probabilities(state, [concept])
        return float(p[:, 1].max()) if len(p) else 0.0

    def predict(self, state, concept, negatives=(), caption=None) -> ConceptResult:
        t0 = time.perf_counter()
        H, W = state.size
        img = self._image(state)
        facts: dict = {"network": self.network, "threshold": self.threshold, "proposals": int(len(img["boxes"]))}
        in_caption = bool(caption) and _lemma(concept) in {n.lemma for n in object_nouns(caption)}
        with torch.no_grad():
            probs = self._probabilities(state, [concept, *negatives])
            p = probs[:, 1] if len(probs) else torch.zeros(0)
            wins = probs.argmax(dim=1) == 1 if len(probs) else torch.zeros(0, dtype=torch.bool)
            cand = torch.nonzero(wins & (p >= self.threshold)).flatten()
            if len(cand):
                keep = cand[nms(img["boxes"][cand], p[cand], NMS_IOU, MAX_INSTANCES)]
                facts["selected_by"] = "threshold"
            elif len(p) and (self.align == "always" or (self.align == "caption" and in_caption)):
                keep = p.argmax().reshape(1)  # eq. 2: the region most compatible with the word
                facts["selected_by"] = "caption alignment (eq. 2)" if in_caption else "best region"
            else:
                keep = torch.zeros(0, dtype=torch.long)
                facts["selected_by"] = "none above threshold"
            labels, prob_map, noise_map = self._instances(img, keep, p, concept, (H, W))
        mask = np.zeros((H, W), bool)
        for pl in labels:
            mask |= pl.mask
        score = float(p.max()) if len(p) else 0.0
        priors = [Prior(prob_map, self.name, concept, "probability", score)]
        if noise_map is not None:
            priors.append(Prior(noise_map, self.name, concept, "noise", score))
        facts.update(instances=len(labels), in_caption=in_caption, eta=self.eta)
        if labels and labels[0].reliability is not None:
            facts["reliability"] = [round(pl.reliability, 3) for pl in labels]
        return ConceptResult(concept=concept, method=self.name, mask=mask, score=min(1.0, max(0.0, score)),
                             present=score >= self.threshold, priors=priors, pseudo_labels=labels, details=facts,
                             ms=(time.perf_counter() - t0) * 1000.0)

    def _instances(self, img: dict, keep: torch.Tensor, p: torch.Tensor, concept: str, hw):
        """PseudoLabels of the kept proposals, the per-pixel maximum of their mask probabilities, and of their
        noise maps (None for a network without g_Noise)."""
        H, W = hw
        prob_map = np.zeros((H, W), np.float32)
        if len(keep) == 0:
            return [], prob_map, (np.zeros((H, W), np.float32) if self.net.noise is not None else None)
        logits, variance = self.net.mask_and_noise(img["pyr"], img["boxes"][keep])
        boxes = img["image_boxes"][keep]
        probs = paste_masks(torch.sigmoid(logits), boxes, (H, W)).cpu().numpy()
        noise = None
        if variance is not None:
            floor = math.exp(LOG_VAR_MIN)
            shown = ((variance - floor) / max(self.noise_scale - floor, 1e-12)).clamp(0, 1)
            noise = paste_masks(shown, boxes, (H, W)).clamp(0, 1).cpu().numpy()
            alpha = reliability(mean_noise(variance), self.eta).clamp(max=1.0).cpu().numpy()
        labels = []
        for k in range(len(keep)):
            m = probs[k] >= 0.5
            if not m.any():
                continue
            labels.append(PseudoLabel(m, concept, float(p[keep[k]]), self.name,
                                      noise_map=noise[k].astype(np.float32) if noise is not None else None,
                                      reliability=float(alpha[k]) if noise is not None else None))
        prob_map = probs.max(axis=0).astype(np.float32)
        noise_map = noise.max(axis=0).astype(np.float32) if noise is not None else None
        return labels, prob_map, noise_map


def _lemma(word: str) -> str:
    nouns = object_nouns(word)
    return nouns[0].lemma if nouns else word.strip().lower()

