"""The evidence `fused` gathers for a word, from what the other methods compute on the cached image.

Per image (once, kept in `ImageState.cache`):
- XPM's class-agnostic proposals (the robust student's proposal network, plus the whole frame and its central
  three quarters), their objectness, their region embeddings, and their mask head's masks pasted onto a small
  working grid (long side `GRID`): the shapes that give the fused mask its object boundaries;
- Concept Mask's attention network maps on the backbone's 448 px head (no extra backbone pass).

Per word (cheap: a few matrix products on that grid):
- `cam`: the word's class activation map (the training-free reference; `ovseg.core.methods.cam`);
- `cam_regions`: each proposal mask weighted by the mean CAM inside it, maximum over proposals: the CAM's
  evidence snapped to class-agnostic object shapes;
- `objectness`: each proposal mask weighted by its objectness, maximum over proposals;
- `xpm`: each proposal mask weighted by XPM's probability that the region shows the word (eq. 1 softmax
  against the background), maximum over proposals: what the trained embedding head knows;
- `attention`: Concept Mask's refined attention of the word;
- `xpm_top`, `cam_top`: the mask of the one proposal XPM finds most likely to show the word (eq. 2's region),
  and of the proposal with the highest mean CAM;
`groups` and `group_top` (OVSegmentor: the word's group score, and the region of its nearest group),
and the word-level scores: CAM's presence mass, the classifier's probability of the word's likeliest ImageNet
class and that class's rank (log(1 + rank)), the best proposal's mean CAM, XPM's best probability, Concept
Mask's verification cosine, and how well the engine knows the word (its nearness to the trained base
vocabulary and to the ImageNet class names).

With captions (`word(state, word, captions)`), Cap2Seg's caption priors join (`ovseg.core.methods.cap2seg`):
- `caption_stripes`: the semi-global stripe prior V* = (Y_hat + V_hat) / 2 drawn over the grid (each row its
  stripe's share, the largest 1);
- `local`: the local branch's prior (sec. 3.4) on the grid, 0 where it has no known-class cell to read;
- the score `caption_occurrence`: the mean over the captions of the occurrence probability s_{x,c} (eq. 2);
- `caption_named`: the share of the captions that name the word or a kind of it (sec. 5.1's exact match:
  WordNet synonyms and plurals, widened to hyponyms: "man" names person), and `caption_pooling`, sec. 5.1's
  sentence pooling (the mean cosine of the captions' pooled word vectors with the word's). The entailment
  model does not replace them here: on the cat photo with "a cat on a blanket" it gives "dog" 0.78 and
  "person" 0.83 (it learnt which words are near, not which are named).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.core.checkpoints import in_use, packaged
from ovseg.core.methods.cap2seg.entailment import sentence_pooling_scores
from ovseg.core.methods.base import ImageState
from ovseg.core.methods.xpm.model import XPMNet, word_scores
from ovseg.core.models.caption_nouns import caption_names, class_of_noun
from ovseg.core.ops.boxes import paste_masks, rescale_boxes

GRID = 128  # long side of the working grid the evidence maps share
# Class-agnostic proposals kept per image (best objectness first, after NMS over the PRE_NMS best locations of
# each pyramid level). The mask head, the dear part, runs only on the regions a word needs (REGIONS_BY_CAM with
# the most CAM in their box, REGIONS_BY_WORD XPM finds likeliest, REGIONS_BY_OBJECTNESS, and the two frames),
# each once per image: that keeps `fused` near one CLIPSeg forward.
PROPOSALS = 60
PRE_NMS = 300
REGIONS_BY_CAM, REGIONS_BY_WORD, REGIONS_BY_OBJECTNESS = 8, 6, 4


def grid_size(hw: tuple[int, int], long_side: int = GRID) -> tuple[int, int]:
    h, w = hw
    s = long_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


@dataclass
class WordEvidence:
    """Evidence maps (name -> (gh, gw) float tensor in [0, 1]) and word-level scores of one word."""

    maps: dict[str, torch.Tensor]
    scores: dict[str, float]
    facts: dict


class Evidence:
    """Computes the evidence of words on images with shared models; holds XPM's student and Concept Mask's
    attention network (the checkpoints in use) and the `cam` method for its maps."""

    def __init__(self, models, base_vocabulary: list[str]):
        from ovseg.core.methods.cam.method import CAM
        from ovseg.core.methods.concept_mask.attention import ConceptAttentionModel

        self.models = models
        self.cam = CAM(models)
        self.xpm, _ = XPMNet.load(in_use("xpm") / "student.pt", models.device)
        self.attention = ConceptAttentionModel(packaged("concept_mask"), models.device, "attention")
        self.base_vocabulary = list(base_vocabulary)
        self._familiarity: dict[str, dict] = {}
        self._cap2seg = None
        self._ovsegmentor = None

    @property
    def ovsegmentor(self):
        """The `ovsegmentor` method of the checkpoint in use, loaded on first use; None without a checkpoint."""
        if self._ovsegmentor is None:
            from ovseg.core.methods.ovsegmentor.method import VARIANTS, OVSegmentor

            found = (in_use("ovsegmentor") / VARIANTS["full"]).is_file()
            self._ovsegmentor = OVSegmentor(self.models) if found else False
        return self._ovsegmentor or None

    def _group_maps(self, state: ImageState, word: str, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        """OVSegmentor's evidence on the grid: `groups`, the word's eq. 1 score mapped to [0, 1] (each patch its
        group's cosine to the word), and `group_top`, the region of the group nearest the word."""
        ovs = self.ovsegmentor
        if ovs is None:
            return {}
        s = ovs.word_scores(state, [word])[0]
        top = (s >= s.max() - 1e-6).float()
        up = lambda m: F.interpolate(m[None, None].float(), size=grid, mode="nearest")[0, 0]  # noqa: E731
        return {"groups": up((s + 1.0) / 2.0).clamp(0, 1), "group_top": up(top)}

    @property
    def cap2seg(self):
        """The `cap2seg` method of the checkpoint in use (its caption priors), loaded on first use."""
        if self._cap2seg is None:
            from ovseg.core.methods.cap2seg.method import Cap2Seg

            self._cap2seg = Cap2Seg(self.models)
        return self._cap2seg

    # ------------------------------------------------------------------------------------------- per image
    @torch.no_grad()
    def image(self, state: ImageState) -> dict:
        key = ("fused", "image")
        if key in state.cache:
            return state.cache[key]
        gh, gw = grid_size(state.size)
        input_hw = tuple(state.input.shape[-2:])
        pyr = self.xpm.pyramid(state.features)
        boxes, objectness = self.xpm.proposals(pyr, input_hw, pre_nms=PRE_NMS, post_nms=PROPOSALS)
        # The proposal network learnt COCO's object sizes: on a close-up it offers parts (an eye, a cheek).
        # The whole frame and its central part are proposals too, so the mask head can outline an object that
        # fills the picture; their objectness is the best proposal's.
        H, W = input_hw
        frames = torch.tensor([[0.0, 0.0, W, H], [0.125 * W, 0.125 * H, 0.875 * W, 0.875 * H]])
        best = objectness.max() if len(objectness) else torch.tensor(1.0)
        boxes = torch.cat([boxes, frames.to(boxes)])
        objectness = torch.cat([objectness, best.reshape(1).expand(2).to(objectness)])
        head = state.features.head.float()
        grid_boxes = rescale_boxes(boxes, input_hw, (gh, gw))
        out = {"grid": (gh, gw), "pyramid": pyr, "input_boxes": boxes, "grid_boxes": grid_boxes,
               "objectness": objectness, "embeddings": self.xpm.embed(pyr, boxes), "masks": {},
               "head": head, "attention_maps": self.attention.maps(head)}
        state.cache[key] = out
        return out

    @torch.no_grad()
    def region_masks(self, img: dict, regions: list[int]) -> torch.Tensor:
        """(len(regions), gh, gw) mask-head probabilities of proposals on the grid, each computed once."""
        todo = [r for r in regions if r not in img["masks"]]
        if todo:
            idx = torch.tensor(todo)
            logits, _ = self.xpm.mask_and_noise(img["pyramid"], img["input_boxes"][idx], with_noise=False)
            pasted = paste_masks(torch.sigmoid(logits), img["grid_boxes"][idx], img["grid"])
            img["masks"].update(zip(todo, pasted))
        return torch.stack([img["masks"][r] for r in regions])

    # -------------------------------------------------------------------------------------------- per word
    @staticmethod
    def _regions(img: dict, cam: torch.Tensor, p_word: torch.Tensor) -> list[int]:
        """The proposals a word's evidence reads: those with the most CAM per box area, those XPM finds likeliest
        to show the word, the most object-like, and the two frames (the last two proposals)."""
        gh, gw = img["grid"]
        b = img["grid_boxes"]
        x0, y0 = b[:, 0].floor().clamp(0, gw - 1).long(), b[:, 1].floor().clamp(0, gh - 1).long()
        x1 = torch.maximum(b[:, 2].ceil().clamp(1, gw).long(), x0 + 1)
        y1 = torch.maximum(b[:, 3].ceil().clamp(1, gh).long(), y0 + 1)
        integral = F.pad(cam.cumsum(0).cumsum(1), (1, 0, 1, 0))
        box_cam = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / ((y1 - y0) * (x1 - x0))
        n = len(b)
        picked = (torch.topk(box_cam[:-2], min(REGIONS_BY_CAM, n - 2)).indices.tolist()
                  + torch.topk(p_word[:-2], min(REGIONS_BY_WORD, n - 2)).indices.tolist()
                  + torch.topk(img["objectness"][:-2], min(REGIONS_BY_OBJECTNESS, n - 2)).indices.tolist()
                  + [n - 2, n - 1])
        return sorted(set(picked))

    def familiarity(self, word: str) -> dict:
        """How well the engine knows the word: the cosine of its text vector to the nearest trained base class
        and to the nearest ImageNet class name, and `known`: 1 for a trained base class or a kind of one in
        WordNet ("man" is a kind of person), else falling to 0 as the nearest base class gets farther in the
        text encoder's space ((cos - 0.75) / 0.2, clipped)."""
        if word not in self._familiarity:
            vec = self.models.embed_words([word])[0]
            base = self.models.embed_words(self.base_vocabulary) @ vec
            best = int(base.argmax())
            near_base = float(base[best])
            near_imagenet = float(self.models.class_similarity(word).max())
            kind_of = class_of_noun(word, tuple(self.base_vocabulary))
            if word in self.base_vocabulary or kind_of is not None:
                known = 1.0
            else:
                known = min(1.0, max(0.0, (near_base - 0.75) / 0.2))
            self._familiarity[word] = {"known": known, "nearest_base_class": kind_of or self.base_vocabulary[best],
                                       "kind_of_base_class": kind_of, "base_similarity": near_base,
                                       "imagenet_similarity": near_imagenet}
        return self._familiarity[word]

    @torch.no_grad()
    def word(self, state: ImageState, word: str, captions=()) -> WordEvidence:
        """The word's evidence; with captions (a sequence of strings), the caption priors too."""
        captions = tuple(captions)
        if not captions:
            return self._word(state, word)
        key = ("fused", "word", word, captions)
        if key in state.cache:
            return state.cache[key]
        from ovseg.core.methods.cap2seg.method import stripe_map

        ev = self._word(state, word)
        gh, gw = ev.maps["cam"].shape
        prior = self.cap2seg.caption_evidence(state, list(captions), word)
        local = torch.zeros(gh, gw)
        if prior["local"] is not None:
            local = F.interpolate(torch.from_numpy(prior["local"])[None, None].float(), size=(gh, gw),
                                  mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
        stripes = torch.from_numpy(stripe_map(prior["fused"], (gh, gw)))
        named = float(np.mean([caption_names(c, word) for c in captions]))
        pooling = float(sentence_pooling_scores(captions, [word], self.models.embed_words)[:, 0].mean())
        out = WordEvidence(maps={**ev.maps, "caption_stripes": stripes, "local": local},
                           scores={**ev.scores, "caption_occurrence": float(prior["occurrence"]),
                                   "caption_named": named, "caption_pooling": pooling},
                           facts={**ev.facts, "caption": {"occurrence": float(prior["occurrence"]),
                                                          "stripes": prior["fused"].tolist(),
                                                          "captions": len(captions)}})
        state.cache[key] = out
        return out

    @torch.no_grad()
    def _word(self, state: ImageState, word: str) -> WordEvidence:
        key = ("fused", "word", word)
        if key in state.cache:
            return state.cache[key]
        img = self.image(state)
        gh, gw = img["grid"]
        cam_low, cam_mass, cam_facts = self.cam._map(state, word)
        cam = F.interpolate(cam_low[None, None].float(), size=(gh, gw), mode="bilinear", align_corners=False)[0, 0]
        cam = cam / cam.max().clamp_min(1e-6)
        vectors = self.models.embed_words([word]).float().to(img["embeddings"].device)
        p_all = torch.softmax(word_scores(img["embeddings"], vectors), dim=1)[:, 1]
        regions = self._regions(img, cam, p_all)
        masks = self.region_masks(img, regions)
        p_word, objectness_r = p_all[regions], img["objectness"][regions]
        region_cam = (masks * cam).sum(dim=(1, 2)) / masks.sum(dim=(1, 2)).clamp_min(1e-6)
        cam_regions = (region_cam[:, None, None] * masks).amax(dim=0)
        objectness = (objectness_r[:, None, None] * masks).amax(dim=0)
        xpm = (p_word[:, None, None] * masks).amax(dim=0)
        xpm_top, cam_top = masks[int(p_word.argmax())], masks[int(region_cam.argmax())]
        region_best, xpm_best = float(region_cam.max()), float(p_all.max())
        w = self.attention.word(word, lambda t: self.models.embed_words([t])[0].cpu().numpy())
        att = self.attention.attention(img["attention_maps"], w)["attention"]
        verification = float(self.attention.net.verification(img["head"], att[None], w.vector)[0])
        attention = F.interpolate(att[None, None].float(), size=(gh, gw), mode="bilinear", align_corners=False)[0, 0]
        group_maps = self._group_maps(state, word, (gh, gw))
        fam = self.familiarity(word)
        probs = state.class_probs
        related_max = probs[self.cam.related_classes(word)["classes"]].max()
        related_rank = int((probs > related_max).sum())  # 0: the classifier's top class is one of the word's
        out = WordEvidence(
            maps={"cam": cam.clamp(0, 1), "cam_regions": cam_regions.clamp(0, 1), "objectness": objectness.clamp(0, 1),
                  "xpm": xpm.clamp(0, 1), "attention": attention.clamp(0, 1), "xpm_top": xpm_top.clamp(0, 1),
                  "cam_top": cam_top.clamp(0, 1), **group_maps},
            scores={"cam_mass": cam_mass, "cam_region_best": region_best, "xpm_best": xpm_best,
                    "verification": (1.0 + verification) / 2.0, "familiarity": fam["known"],
                    "imagenet_similarity": fam["imagenet_similarity"], "related_max": float(related_max),
                    "related_rank": math.log1p(related_rank)},
            facts={"cam_top_classes": cam_facts["top_classes"][:3], "familiarity": fam,
                   "region_cam": region_cam, "region_word": p_word})
        state.cache[key] = out
        return out
