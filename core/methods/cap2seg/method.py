"""`cap2seg`: Cap2Seg (Xu et al., ACM MM 2020, seed 000): captions -> contextual entailment (where a caption says
a thing is: occurrence and horizontal stripes) -> a word-space segmentation model trained with the
caption-driven ranking loss on unseen classes (sec. 3.6).

For a word on an image: each pixel goes to the arg max over the candidate classes of f(i, j)^T w_c (eq. 14); the
word's mask is where it wins. `setting=zsl` (the default) competes with background only, `setting=gzsl` also
with the 48 seen classes (the paper's generalised setting; here the seen classes win most unseen pixels:
held-out strict target mIoU 0.025 against 0.105 for zsl, and base 0.145 against 0.191, README). With a caption (or several, one per line), the presence score is the
caption's occurrence probability s_{x,c} (eq. 2; the mean over the captions) and the stripe distribution
is drawn as a caption prior; without one, presence is the word's largest pixel probability and the result says
that it had no caption. `lambda_rs=0` loads the network trained without L_RS (the ablation).
Trained by `ovseg train cap2seg`; ships in assets/checkpoints/cap2seg/.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.core.checkpoints import in_use
from ovseg.core.errors import OvsegError
from ovseg.core.methods.base import ImageState, Method, upsample_map
from ovseg.core.methods.cap2seg.entailment import K_STRIPES
from ovseg.core.methods.cap2seg.segmentation import BACKGROUND, Cap2SegNet, backbone_dict, class_scores
from ovseg.core.registry import register_method
from ovseg.core.types import ConceptResult, Prior

SETTINGS = ("gzsl", "zsl")
NETWORKS = {0.01: "segmentation.pt", 0.0: "segmentation_lrs0.pt"}


def split_captions(caption: str | None) -> list[str]:
    """One caption per non-empty line."""
    return [c.strip() for c in (caption or "").splitlines() if c.strip()]


def stripe_map(stripes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A stripe distribution (K,) drawn over an HxW image: each row carries its stripe's share, the largest
    scaled to 1."""
    rows = np.repeat(stripes, np.diff(np.linspace(0, size[0], len(stripes) + 1).round().astype(int)))
    out = np.repeat((rows / max(float(rows.max()), 1e-6))[:, None], size[1], axis=1).astype(np.float32)
    return np.clip(out, 0, 1)


@register_method("cap2seg")
class Cap2Seg(Method):
    summary = "Cap2Seg: caption entailment (occurrence, stripes) -> word-space segmentation trained with L_RS"
    trained = True

    def __init__(self, models, checkpoint: str | Path | None = None, setting: str = "zsl",
                 lambda_rs: float = 0.01):
        """setting: "zsl" (the word, any negatives and background compete) or "gzsl" (the seen classes too).
        lambda_rs: 0.01 (the method) or 0 (the network trained without the ranking loss)."""
        super().__init__(models, checkpoint=checkpoint, setting=setting, lambda_rs=lambda_rs)
        if setting not in SETTINGS:
            raise OvsegError(f"cap2seg setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
        lambda_rs = float(lambda_rs)
        if lambda_rs not in NETWORKS:
            raise OvsegError(f"cap2seg lambda_rs must be 0.01 (the method) or 0 (the ablation), got {lambda_rs}")
        self.folder = Path(checkpoint) if checkpoint is not None else in_use("cap2seg")
        self.net, extra = Cap2SegNet.load(self.folder / NETWORKS[lambda_rs], models.device)
        self.seen: list[str] = list(extra.get("seen_classes", []))
        if BACKGROUND not in self.seen:
            raise OvsegError(f"{self.folder / NETWORKS[lambda_rs]} names no background class: retrain it")
        self.setting, self.lambda_rs = setting, lambda_rs
        self._entailment = None
        self._local = None

    @property
    def entailment(self):
        """The contextual entailment model, loaded on first use (only captions need it)."""
        if self._entailment is None:
            from ovseg.core.methods.cap2seg.entailment import ContextualEntailment

            self._entailment = ContextualEntailment.load(self.folder, self.models.text_encoder)
        return self._entailment

    def _features(self, state: ImageState) -> torch.Tensor:
        key = ("cap2seg", str(self.folder), self.lambda_rs)
        if key not in state.cache:
            with torch.no_grad():
                state.cache[key] = self.net(backbone_dict(state.features))
        return state.cache[key]

    def _candidates(self, words: list[str]) -> list[str]:
        others = self.seen if self.setting == "gzsl" else [BACKGROUND]
        return list(dict.fromkeys([*words, *others]))

    def _probabilities(self, state: ImageState, word: str, negatives=()) -> tuple[torch.Tensor, torch.Tensor]:
        """(the word's softmax probability over the candidates (h, w), its margin over the best other
        candidate (h, w)) at the feature map's resolution."""
        candidates = self._candidates([word, *negatives])
        vectors = self.models.embed_words(candidates).float().to(self.models.device)
        with torch.no_grad():
            scores = class_scores(self._features(state), vectors)  # (C, h, w)
            prob = torch.softmax(scores, dim=0)[0]
            margin = scores[0] - scores[1:].max(dim=0).values
        return prob, margin

    def _caption_key(self, captions: list[str], word: str) -> tuple:
        return ("cap2seg-captions", str(self.folder), tuple(captions), word)

    def caption_priors(self, state: ImageState, captions: list[str], word: str) -> tuple[float, np.ndarray]:
        """(occurrence s_{x,c}, the stripe distribution V_hat (K,)): each the mean over the captions (as the
        trainer's Table 1 scores an image). Kept in the image's cache: presence and predict ask for the same
        word, and both networks (lambda_rs) share the one entailment model of the folder."""
        key = self._caption_key(captions, word)
        if key not in state.cache:
            self.caption_priors_many(state, captions, [word])
        return state.cache[key]

    def caption_priors_many(self, state: ImageState, captions: list[str], words) -> None:
        """`caption_priors` of several words in one pass of the entailment model (every caption with every
        word not yet in the image's cache)."""
        todo = [w for w in dict.fromkeys(words) if self._caption_key(captions, w) not in state.cache]
        if not captions or not todo:
            return
        occ, stripes = self.entailment.predict([c for _ in todo for c in captions],
                                               [w for w in todo for _ in captions])
        n = len(captions)
        for i, w in enumerate(todo):
            state.cache[self._caption_key(captions, w)] = (float(occ[i * n:(i + 1) * n].mean()),
                                                           stripes[i * n:(i + 1) * n].mean(axis=0))

    def prepare(self, state: ImageState, concepts, caption=None) -> None:
        self.caption_priors_many(state, split_captions(caption), [c for c in concepts if c != BACKGROUND])

    @property
    def local(self):
        """The local branch (sec. 3.4), loaded on first use; None for a checkpoint trained without it."""
        if self._local is None:
            from ovseg.core.methods.cap2seg.local import WEIGHTS_FILE, LocalInference

            found = (self.folder / WEIGHTS_FILE).is_file()
            self._local = LocalInference.load(self.folder, self.models.device) if found else False
        return self._local or None

    def local_prior(self, state: ImageState, word: str) -> np.ndarray | None:
        """Sec. 3.4's P(c_t = word | x) on the local lattice, from the known-class cells the engine itself
        predicts (no ground truth here): each feature cell where a seen class other than background wins the
        GZSL arg max (eq. 14) is that class; None without a local branch or any such cell."""
        local = self.local
        if local is None:
            return None
        from ovseg.core.methods.cap2seg.local import grid_labels

        key = ("cap2seg-known", str(self.folder), self.lambda_rs)
        if key not in state.cache:
            known = [c for c in self.seen if c != BACKGROUND]
            vectors = self.models.embed_words(self.seen).float().to(self.models.device)
            with torch.no_grad():
                winner = class_scores(self._features(state), vectors).argmax(0).cpu().numpy()
            masks = {known.index(c): winner == i for i, c in enumerate(self.seen)
                     if c != BACKGROUND and (winner == i).any()}
            state.cache[key] = (grid_labels(masks, local.config.grid),
                                self.models.embed_words(known).float().cpu())
        cells, known_vectors = state.cache[key]
        return local.predict(cells, known_vectors, self.models.embed_words([word]).float().cpu()[0])

    def caption_evidence(self, state: ImageState, captions: list[str], word: str) -> dict:
        """Everything the captions and the local branch say about a word on the image: "occurrence" (s_{x,c}),
        "stripes" (V_hat), "local" (the local prior on the lattice, or None), "local_stripes" (its stripe
        shares Y_hat, or None) and "fused" (V*, or V_hat without a local prior). Without captions, only the
        local entries."""
        from ovseg.core.methods.cap2seg.local import fuse, stripe_shares

        local_map = self.local_prior(state, word)
        y_hat = None
        if local_map is not None:
            y_hat = stripe_shares(torch.from_numpy(local_map.reshape(-1)), K_STRIPES).numpy()
        out = {"local": local_map, "local_stripes": y_hat}
        if captions:
            occurrence, stripes = self.caption_priors(state, captions, word)
            out.update(occurrence=occurrence, stripes=stripes, fused=fuse(y_hat, stripes))
        return out

    def presence(self, state: ImageState, concept, caption=None) -> float:
        captions = split_captions(caption)
        if captions:
            return self.caption_priors(state, captions, concept)[0]
        return float(self._probabilities(state, concept)[0].max())

    def predict(self, state: ImageState, concept, negatives=(), caption=None) -> ConceptResult:
        t0 = time.perf_counter()
        if concept == BACKGROUND:
            raise OvsegError("'background' is cap2seg's own class for what no word names: type an object word")
        prob, margin = self._probabilities(state, concept, tuple(negatives))
        size = state.size
        up = F.interpolate(margin[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        mask = (up > 0).cpu().numpy()
        prob_map = upsample_map(prob, size)
        captions = split_captions(caption)
        details = {"setting": self.setting, "lambda_rs": self.lambda_rs,
                   "competing_classes": len(self._candidates([concept, *negatives])) - 1}
        priors = [Prior(prob_map, self.name, concept, "probability", float(prob.max()),
                        label="class probability (eq. 12)")]
        evidence = self.caption_evidence(state, captions, concept)
        local_map = evidence["local"]
        if local_map is not None:
            priors.append(Prior(upsample_map(torch.from_numpy(local_map), size), self.name, concept, "local",
                                float(local_map.max()), label="local prior (sec. 3.4, from predicted seen classes)"))
            details["local_sources"] = "the engine's own seen-class predictions (GZSL arg max)"
        if captions:
            occurrence, stripes, fused = evidence["occurrence"], evidence["stripes"], evidence["fused"]
            score = occurrence
            priors.insert(0, Prior(stripe_map(stripes, size), self.name, concept, "caption", occurrence,
                                   label="caption prior: stripes V_hat"))
            priors.insert(1, Prior(stripe_map(fused, size), self.name, concept, "caption", occurrence,
                                   label="fused prior V* = (Y_hat + V_hat)/2"))
            details.update(caption_occurrence=round(occurrence, 4), captions=len(captions),
                           stripes=[round(float(v), 3) for v in stripes],
                           fused_stripes=[round(float(v), 3) for v in fused])
        else:
            score = float(prob.max())
            details["note"] = "no caption: presence from the pixels, no caption prior"
        return ConceptResult(concept, self.name, mask, min(1.0, max(0.0, score)), score >= 0.5, priors,
                             details=details, ms=(time.perf_counter() - t0) * 1000.0)
