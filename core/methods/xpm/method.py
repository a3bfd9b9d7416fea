"""`xpm`: XPM (Huynh et al., CVPR 2022, seed 003): instance pseudo-masks for words, with per-pixel noise maps
and a reliability score per mask, from the robust student trained by `ovseg train xpm`.

For a word w (and negatives), every class-agnostic proposal r gets the softmax over (background = the zero
vector, w, the negatives) of the scores v^T g_Emb(f_r) (eq. 1). The instances of w are the proposals where w
wins with probability >= threshold, after NMS. When no proposal reaches the threshold, the best-scoring
proposal is taken, as cross-modal pseudo-labelling does (eq. 2): by default for any word (`align=always`,
the better setting measured on coco_dev: a word typed is a word the user expects to see), with
`align=caption` only for the object nouns of the given caption (the paper's pseudo-labelling), with
`align=off` never. The presence score (the best proposal's probability) still tells an absent word.
Each instance's mask is the mask head's (logit >= 0).

Noise maps and reliability (`reliability=`):
* "agreement" (the default): the pseudo-mask is made again by three other views of the same image, each
  aligning the word on its own (the same rule as above): the teacher, and the student and the teacher on the
  horizontally flipped image (maps flipped back). The noise map is the spread of the four views' mask
  probabilities at each pixel (their standard deviation, x2 so that it spans [0, 1]); an instance's
  reliability is the mean soft IoU of its mask with each other view's map inside the instance's box (enlarged
  by a quarter). A view that aligned the word to another object, or cut it differently, lowers both. This
  is the disagreement the paper's reliability stands for (sec. 3.2.4: masks the student cannot reproduce are
  noisy), measured where g_Noise cannot see it: g_Noise, trained on the pseudo-masks of the teacher it starts
  from, fits them exactly and predicts its floor everywhere (README, issue 17's note).
* "g_noise" (the paper's eq. 6-7): g_Noise's variance above its floor (1e-4), scaled so that the training
  set's 99th percentile pixel variance shows as 1, and reliability eta / mean noise (clipped to 1).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ovseg.core.ops.boxes import box_region, nms, paste_masks, rescale_boxes
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
RELIABILITY = ("agreement", "g_noise")
BOX_CONTEXT = 0.25  # an instance's agreement is measured in its box enlarged by this fraction of its sides
MAX_INSTANCES = 20
NMS_IOU = 0.5


@register_method("xpm")
class XPM(Method):
    summary = "XPM: caption nouns -> teacher-aligned pseudo-masks -> robust student with noise maps and reliability"
    trained = True

    def __init__(self, models, checkpoint: str | Path | None = None, network: str = "student",
                 threshold: float = 0.5, align: str = "always", reliability: str = "agreement"):
        """network: "student" (the robust student, the method), "student_plain" (no noise estimation) or
        "teacher" (the paper's Table 3 rows). threshold: the least probability of an instance.
        align: when to fall back on the best region (eq. 2): always, for caption nouns, or never ("off").
        reliability: "agreement" (noise and reliability from the disagreement of four views) or "g_noise"
        (the paper's g_Noise and eq. 7; only the robust student has it)."""
        super().__init__(models, checkpoint=checkpoint, network=network, align=align, reliability=reliability)
        if network not in NETWORKS:
            raise OvsegError(f"xpm network must be one of {', '.join(NETWORKS)}, got {network!r}")
        if align not in ALIGN:
            raise OvsegError(f"xpm align must be one of {', '.join(ALIGN)}, got {align!r}")
        if reliability not in RELIABILITY:
            raise OvsegError(f"xpm reliability must be one of {', '.join(RELIABILITY)}, got {reliability!r}")
        folder = Path(checkpoint) if checkpoint is not None else in_use("xpm")
        path = folder / f"{network}.pt"
        if not path.is_file():
            raise OvsegError(f"no XPM {network} network at {path}: run `ovseg train xpm --out {folder}`")
        self.net, extra = XPMNet.load(path, models.device)
        self.folder, self.network, self.align, self.reliability = folder, network, align, reliability
        if reliability == "g_noise" and self.net.noise is None:
            raise OvsegError(f"the XPM {network} network has no g_Noise: reliability=g_noise needs network=student")
        self.views: dict[str, XPMNet] = {network: self.net}
        if reliability == "agreement":
            other = "teacher" if network != "teacher" else "student"
            other_path = folder / f"{other}.pt"
            if not other_path.is_file():
                raise OvsegError(f"no XPM {other} network at {other_path}: reliability=agreement needs both "
                                 f"the student and the teacher")
            self.views[other] = models.shared(("xpm.net", str(other_path)),
                                              lambda: XPMNet.load(other_path, models.device)[0])
        self.eta = float(extra.get("eta", float("nan")))
        self.noise_scale = float(extra.get("noise_scale", 1.0))
        self.threshold = threshold

    def _image(self, state: ImageState, network: str | None = None, flipped: bool = False) -> dict:
        """One view's proposals, their boxes (input and image pixels, in the view's own frame) and embeddings."""
        network = network or self.network
        net = self.views[network]
        key = ("xpm", str(self.folder), network, flipped)
        if key not in state.cache:
            with torch.no_grad():
                pyr = net.pyramid(_flipped_features(self.models, state) if flipped else state.features)
                input_hw = tuple(state.input.shape[-2:])
                boxes, _ = net.proposals(pyr, input_hw)
                emb = net.embed(pyr, boxes)
            state.cache[key] = {"net": net, "pyr": pyr, "boxes": boxes, "emb": emb, "flipped": flipped,
                                "image_boxes": rescale_boxes(boxes, input_hw, state.size)}
        return state.cache[key]

    def _probabilities(self, state: ImageState, words: list[str], img: dict | None = None) -> torch.Tensor:
        """(R, 1 + len(words)) softmax over background and the words, per proposal (of `img`, a view)."""
        img = img or self._image(state)
        vectors = self.models.embed_words(words).float().to(img["emb"].device)
        return torch.softmax(word_scores(img["emb"], vectors), dim=1)

    def _select(self, img: dict, probs: torch.Tensor, in_caption: bool) -> tuple[torch.Tensor, str]:
        """The proposals kept for the word (column 1 of probs) and how they were chosen."""
        if len(probs) == 0:
            return torch.zeros(0, dtype=torch.long), "none above threshold"
        p = probs[:, 1]
        cand = torch.nonzero((probs.argmax(dim=1) == 1) & (p >= self.threshold)).flatten()
        if len(cand):
            return cand[nms(img["boxes"][cand], p[cand], NMS_IOU, MAX_INSTANCES)], "threshold"
        if self.align == "always" or (self.align == "caption" and in_caption):
            # eq. 2: the region most compatible with the word
            return p.argmax().reshape(1), "caption alignment (eq. 2)" if in_caption else "best region"
        return torch.zeros(0, dtype=torch.long), "none above threshold"

    def _view_map(self, state: ImageState, network: str, flipped: bool, words: list[str], in_caption: bool):
        """(H, W) the word's instance-probability map as one view sees it (its own alignment and masks),
        in the image's frame."""
        img = self._image(state, network, flipped)
        H, W = state.size
        keep, _ = self._select(img, self._probabilities(state, words, img), in_caption)
        if len(keep) == 0:
            return np.zeros((H, W), np.float32)
        logits, _ = img["net"].mask_and_noise(img["pyr"], img["boxes"][keep], with_noise=False)
        probs = paste_masks(torch.sigmoid(logits), img["image_boxes"][keep], (H, W)).amax(dim=0).cpu().numpy()
        return (probs[:, ::-1] if flipped else probs).astype(np.float32)

    def presence(self, state, concept, caption=None) -> float:
        p = self._probabilities(state, [concept])
        return float(p[:, 1].max()) if len(p) else 0.0

    def predict(self, state, concept, negatives=(), caption=None) -> ConceptResult:
        t0 = time.perf_counter()
        H, W = state.size
        img = self._image(state)
        facts: dict = {"network": self.network, "threshold": self.threshold, "proposals": int(len(img["boxes"]))}
        in_caption = bool(caption) and _lemma(concept) in {n.lemma for n in object_nouns(caption)}
        words = [concept, *negatives]
        with torch.no_grad():
            probs = self._probabilities(state, words)
            p = probs[:, 1] if len(probs) else torch.zeros(0)
            keep, facts["selected_by"] = self._select(img, probs, in_caption)
            if self.reliability == "agreement":
                labels, prob_map, noise_map = self._agreement_instances(state, img, keep, p, words, in_caption)
                facts["reliability_from"] = "agreement of student and teacher, image and mirror image"
            else:
                labels, prob_map, noise_map = self._instances(img, keep, p, concept, (H, W))
                facts["reliability_from"] = "g_Noise (eq. 7)" if noise_map is not None else "none"
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

    def _agreement_instances(self, state: ImageState, img: dict, keep: torch.Tensor, p: torch.Tensor,
                             words: list[str], in_caption: bool):
        """PseudoLabels with noise maps and reliability from the disagreement of four views (module doc)."""
        H, W = state.size
        concept = words[0]
        prob_map = np.zeros((H, W), np.float32)
        if len(keep) == 0:
            return [], prob_map, np.zeros((H, W), np.float32)
        logits, _ = self.net.mask_and_noise(img["pyr"], img["boxes"][keep], with_noise=False)
        probs = paste_masks(torch.sigmoid(logits), img["image_boxes"][keep], (H, W)).cpu().numpy()
        prob_map = probs.max(axis=0).astype(np.float32)
        others = [name for name in self.views if name != self.network]
        views = [self._view_map(state, name, flipped, words, in_caption)
                 for name, flipped in [(self.network, True)] + [(o, f) for o in others for f in (False, True)]]
        noise_map = view_noise([prob_map, *views])
        labels = []
        for k in range(len(keep)):
            m = probs[k] >= 0.5
            if not m.any():
                continue
            region = box_region(img["image_boxes"][keep[k]].tolist(), (H, W), BOX_CONTEXT)
            alpha = view_agreement(probs[k][region], [v[region] for v in views])
            own = np.zeros((H, W), np.float32)  # the instance's noise map: the spread in its (enlarged) box
            own[region] = noise_map[region]
            labels.append(PseudoLabel(m, concept, float(p[keep[k]]), self.name, noise_map=own, reliability=alpha))
        return labels, prob_map, noise_map

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


def view_noise(maps: list[np.ndarray]) -> np.ndarray:
    """Per-pixel disagreement of several views' probability maps in [0, 1]: their standard deviation x 2 (the
    largest a spread of values in [0, 1] can have is 0.5)."""
    return np.clip(2.0 * np.stack(maps).std(axis=0), 0.0, 1.0).astype(np.float32)


def view_agreement(prob: np.ndarray, views: list[np.ndarray]) -> float:
    """The mean soft IoU (sum of minima / sum of maxima) of a mask probability map with each view's map over
    the same pixels; 1 when every view agrees, 0 when none sees anything there."""
    scores = []
    for v in views:
        union = float(np.maximum(prob, v).sum())
        scores.append(float(np.minimum(prob, v).sum()) / union if union > 0 else 1.0)
    return float(np.clip(np.mean(scores), 0.0, 1.0)) if scores else 1.0


def _flipped_features(models, state: ImageState):
    """The backbone's features of the mirrored network input, computed once per image."""
    if "backbone_flipped" not in state.cache:
        with torch.no_grad():
            state.cache["backbone_flipped"] = models.backbone(state.input.flip(-1))
    return state.cache["backbone_flipped"]


def _lemma(word: str) -> str:
    nouns = object_nouns(word)
    return nouns[0].lemma if nouns else word.strip().lower()

