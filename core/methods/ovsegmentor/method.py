"""`ovsegmentor`: OVSegmentor (Xu et al., CVPR 2023, seed 004): image patches bound into K learnable groups,
groups aligned to words, trained from image-caption pairs only (`ovseg train ovsegmentor`).

For a word: each patch's score is sum_k A_jk cos(g_k, t_word) (eq. 1, A the binding module's soft assignment,
t the word's prompt "a photo of a {word}." through MiniLM and the learned text projection); the word's mask is
where it wins the arg max over the typed words (and any negatives) and its score clears the background
threshold (chosen on base classes of the training images, `training.json`). Presence is the word's best
group similarity. The result carries the group assignment map (each patch's group) and, per group, the words
of the entity set it matches best, for the app's groups view.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.core.checkpoints import in_use
from ovseg.core.errors import OvsegError
from ovseg.core.methods.base import ImageState, Method, upsample_map
from ovseg.core.methods.ovsegmentor.model import OVSegNet, patch_input
from ovseg.core.methods.ovsegmentor.text import class_prompt
from ovseg.core.registry import register_method
from ovseg.core.types import ConceptResult, Prior

def word_mask(scores: torch.Tensor, threshold: float, mode: str, size: tuple[int, int]) -> np.ndarray:
    """The mask of the first word at image size from eq. 1 scores (C, h, w) in [-1, 1] (a mix of cosines):
    where it wins the arg max over the words and clears the background threshold, either on the score mapped
    to [0, 1] ("absolute", the paper's form) or relative to the word's peak on the image ("relative")."""
    up = F.interpolate(scores[None].float(), size=size, mode="nearest")[0]  # nearest: the same as after the test
    return threshold_mask(up, threshold, mode).cpu().numpy()


def threshold_mask(scores: torch.Tensor, threshold: float, mode: str) -> torch.Tensor:
    """`word_mask` on scores already at the mask's size (C, H, W): bool (H, W)."""
    mine = (scores[0] + 1.0) / 2.0
    keep = mine >= (threshold * mine.max() if mode == "relative" else threshold)
    return (scores[0] >= scores.max(0).values) & keep


VOCABULARIES = ("negatives", "typed", "entities")


@lru_cache(maxsize=65536)
def related(a: str, b: str) -> bool:
    """Whether a and b name the same thing or one is a kind of the other (WordNet: "puppy" and dog, "man" and
    person): such words never compete for a patch."""
    from ovseg.core.models.caption_nouns import class_of_noun

    a, b = a.strip().lower(), b.strip().lower()
    return a == b or class_of_noun(a, (b,)) == b or class_of_noun(b, (a,)) == a


def competitors(concept: str, negatives, typed, entities, vocabulary: str) -> list[str]:
    """The words that compete with `concept` in eq. 1's arg max, a patch going to the concept only where it is
    nearer the concept than to all of them:
    - "negatives": the negative words only (regions to exclude);
    - "typed": also every other word of the request, eq. 1 as the paper states it (the arg max over the
      classes asked for);
    - "entities": also the entity set Ω (the words the groups were trained against), but for the concept and
      the words that are a kind of it or it a kind of them, as in the paper a group goes to the nearest of all
      of a dataset's classes.
    Measured on coco_dev's held-out images (README), the words compete worse than they help: the groups find
    objects (oracle-group mIoU) more often than they are nearest the right word, so "negatives" is the
    default."""
    if vocabulary not in VOCABULARIES:
        raise OvsegError(f"ovsegmentor vocabulary must be one of {', '.join(VOCABULARIES)}, got {vocabulary!r}")
    out = [w for w in dict.fromkeys(negatives) if w != concept]
    if vocabulary in ("typed", "entities"):
        out += [w for w in dict.fromkeys(typed) if w != concept and w not in out]
    if vocabulary == "entities":
        out += [e for e in entities if e not in out and not related(e, concept)]
    return out


def competition_scores(scores: torch.Tensor) -> torch.Tensor:
    """(C, h, w) scores of the concept then its competitors -> (2, h, w): the concept's and the best
    competitor's (a fixed floor of -1 without any), so that only two maps need upsampling."""
    best = scores[1:].max(0).values if len(scores) > 1 else torch.full_like(scores[0], -1.0)
    return torch.stack([scores[0], best])


# the ablation rows of the paper's Table 3 and the group count of Table 5, each a network in the checkpoint
VARIANTS = {"full": "model.pt", "contrast": "contrast.pt", "entity": "contrast_entity.pt",
            "mask": "contrast_mask.pt", "k16": "groups16.pt"}


@register_method("ovsegmentor")
class OVSegmentor(Method):
    summary = "OVSegmentor: slot-attention groups on the frozen backbone, aligned to captions (contrast, entity, mask)"
    trained = True

    def __init__(self, models, checkpoint: str | Path | None = None, variant: str = "full",
                 vocabulary: str | None = None, threshold: float | None = None):
        """variant: "full" (all three losses), or an ablation: "contrast", "entity" (contrast + entity
        completion), "mask" (contrast + mask consistency), "k16" (16 groups). vocabulary: the words that compete
        with a typed word in eq. 1 (`competitors`): "negatives", "typed" or "entities"; default: the one the
        threshold was chosen with. threshold: the background
        threshold in [0, 1] (default: the one chosen on base classes for this network, absolute on the eq. 1
        score mapped to [0, 1] or relative to the word's peak, as chosen: `word_mask`)."""
        super().__init__(models, checkpoint=checkpoint, variant=variant, vocabulary=vocabulary, threshold=threshold)
        if variant not in VARIANTS:
            raise OvsegError(f"ovsegmentor variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.folder = Path(checkpoint) if checkpoint is not None else in_use("ovsegmentor")
        if variant != "full" and not (self.folder / VARIANTS[variant]).is_file():
            raise OvsegError(f"{self.folder} holds no {variant!r} ablation network (the shipped checkpoint has the "
                             "full model only): run `ovseg train ovsegmentor --out DIR` and use "
                             f"ovsegmentor[checkpoint=DIR,variant={variant}]")
        self.net, extra = OVSegNet.load(self.folder / VARIANTS[variant], models.device)
        self.variant = variant
        self.entities: list[str] = list(extra.get("entities", []))
        self.background = float(extra.get("background_threshold", 0.5))
        self.mode = str(extra.get("threshold_mode", "absolute"))
        self.threshold = self.background if threshold is None else threshold
        # the vocabulary the threshold was chosen with (checkpoints from before the option: the negatives)
        self.vocabulary = vocabulary or str(extra.get("vocabulary", "negatives"))
        competitors("", (), (), (), self.vocabulary)  # a clear error for an unknown one
        self._entity_emb = None

    def _class_embeddings(self, words: list[str]) -> torch.Tensor:
        # the prompts' MiniLM embeddings are memoised by Models.embed_words (presence and masks ask again)
        sentences = self.models.embed_words([class_prompt(w) for w in words]).float().to(self.models.device)
        with torch.no_grad():
            return self.net.text_embedding(sentences)

    def _out(self, state: ImageState) -> dict:
        key = ("ovsegmentor", str(self.folder), self.variant)
        if key not in state.cache:
            with torch.no_grad():
                state.cache[key] = self.net(patch_input(state.features))
        return state.cache[key]

    def word_scores(self, state: ImageState, words: list[str]) -> torch.Tensor:
        """(len(words), h, w) eq. 1 scores in [-1, 1] (each patch its group's cosine to the word's prompt),
        memoised per word on the image."""
        key = ("ovsegmentor-scores", str(self.folder), self.variant)
        memo = state.cache.setdefault(key, {})
        todo = [w for w in dict.fromkeys(words) if w not in memo]
        if todo:
            with torch.no_grad():
                s = self.net.patch_scores(self._out(state), self._class_embeddings(todo))[0]
            memo.update(zip(todo, s))
        return torch.stack([memo[w] for w in words])

    def groups(self, state: ImageState, top: int = 2) -> dict:
        """The group view: "assignment" (h, w) each patch's group (arg max of A), "legend" [(group, share of
        the image, [its best entity words])] for the groups that hold any patch; computed once per image."""
        key = ("ovsegmentor-groups", str(self.folder), self.variant, top)
        if key not in state.cache:
            state.cache[key] = self._groups(state, top)
        return state.cache[key]

    def _groups(self, state: ImageState, top: int) -> dict:
        out = self._out(state)
        h, w = out["hw"]
        assign = out["assignment"][0].argmax(-1).reshape(h, w)
        legend = []
        if self.entities and self._entity_emb is None:
            self._entity_emb = self._class_embeddings(self.entities)
        with torch.no_grad():
            g = self.net.group_embeddings(out["groups"])[0]
        for k in range(g.shape[0]):
            share = float((assign == k).float().mean())
            if share == 0:
                continue
            words = []
            if self._entity_emb is not None:
                sims = g[k] @ self._entity_emb.T
                words = [self.entities[i] for i in torch.topk(sims, min(top, len(self.entities))).indices.tolist()]
            legend.append((k, round(share, 3), words))
        return {"assignment": assign.cpu().numpy().astype(np.int16), "legend": legend}

    def presence(self, state: ImageState, concept, caption=None) -> float:
        with torch.no_grad():
            g = self.net.group_embeddings(self._out(state)["groups"])[0]
            best = float((g @ self._class_embeddings([concept])[0]).max())
        return min(1.0, max(0.0, (best + 1.0) / 2.0))

    def prepare(self, state: ImageState, concepts: list[str], caption: str | None = None) -> None:
        """Keeps the request's words: with the "typed" and "entities" vocabularies each competes with the others."""
        state.cache[("ovsegmentor-typed", str(self.folder))] = list(concepts)

    def predict(self, state: ImageState, concept, negatives=(), caption=None) -> ConceptResult:
        t0 = time.perf_counter()
        typed = state.cache.get(("ovsegmentor-typed", str(self.folder)), ())
        rivals = competitors(concept, negatives, typed, self.entities, self.vocabulary)
        scores = self.word_scores(state, [concept, *rivals])  # (C, h, w)
        mine = scores[0]
        size = state.size
        mask = word_mask(competition_scores(scores), self.threshold, self.mode, size)
        low, high = float(mine.min()), float(mine.max())
        rel = (mine - low) / max(high - low, 1e-6)
        score = self.presence(state, concept)
        view = self.groups(state)
        details = {"variant": self.variant, "background_threshold": f"{self.threshold:.3f} ({self.mode})",
                   "vocabulary": f"{self.vocabulary} ({len(rivals)} competing words)",
                   "best_score": round(high, 3), "groups": self.net.config.groups,
                   "group_legend": view["legend"], "group_assignment": view["assignment"].tolist()}
        priors = [Prior(upsample_map(rel, size), self.name, concept, "group", score,
                        label="group-word score (eq. 1), relative to its range")]
        present = bool(mask.any()) and score > 0.5  # some group is nearer the word than orthogonal
        return ConceptResult(concept, self.name, mask, score, present, priors, details=details,
                             ms=(time.perf_counter() - t0) * 1000.0)

