"""`fused`'s learned combiner: logistic regressions over the evidence, two experts mixed by how well the engine
knows the word.

- Expert A ("any word") reads only evidence whose quality does not depend on having trained on the word: the
  CAM map, the CAM snapped to XPM's class-agnostic proposal masks, and their objectness.
- Expert B ("known word") reads all the evidence, XPM's embedding-head probabilities and Concept Mask's
  attention included: the trained heads are good on the words they learned (the base classes) and poor on
  others, so B is only trusted for words near the trained vocabulary.
A word's pixel probability is k * B + (1 - k) * A and its mask threshold k * t_B + (1 - k) * t_A, with k its
familiarity (`Evidence.familiarity`); presence is mixed the same way from two presence experts. Both experts
are fitted on base classes only (`ovseg train fused`), on images no trained head has seen, with cross-fitting:
each fold's model is fitted on the other folds' images and used on its own, so no image is scored by a model
that learned from it.

With captions, two more presence experts ("any_word+caption", "known_word+caption") read Cap2Seg's caption
priors beside the same evidence (`Evidence.word(..., captions)`): the caption's occurrence probability of the
word, the share of captions naming it, and the sentence-pooling cosine. They are fitted on the captioned images
only, and used for a word on an image that has captions; without captions (or with `fused[captions=off]`) the
caption-free pair decides, unchanged. Pixel experts of the same names, on the stripe prior V* and the local
prior, exist only in a combiner trained with `--caption-pixels` (measured no better); otherwise the caption-free
pixel experts draw every mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Pixel experts: feature names, "a*b" a product of two evidence maps.
# Chosen by cross-fitted strict IoU on held-out base pairs (README, "fused"): relative maps ("rel:") beat
# absolute ones, and a threshold relative to the word's peak beats an absolute one.
# OVSegmentor's groups join both pixel experts (learnt from captions only, not from any word's masks): the
# word's group score relative to its best group, that group's region, and the region where the CAM agrees.
GROUP_FEATURES = ("rel:groups", "group_top", "rel:cam*group_top")
_ANY = ("rel:cam", "rel:cam_regions", "objectness", "rel:cam*objectness", "rel:cam_regions*objectness",
        "cam_top") + GROUP_FEATURES
_KNOWN = _ANY + ("rel:xpm", "xpm_top", "rel:attention", "rel:xpm*objectness", "xpm", "rel:attention*rel:cam")
# Caption evidence (pixels): the stripe prior alone and gating the CAM and its object shapes. The local prior
# joins the "known word" expert only: the local branch learnt its words' layouts from base classes (on them it
# got a large weight, on target classes its cell AP is near the base rate: Table 3).
_CAPTION = ("caption_stripes", "rel:cam*caption_stripes", "rel:cam_regions*caption_stripes")
CAPTION = "+caption"  # the suffix of the experts that read captions
PIXEL_EXPERTS = {
    "any_word": _ANY,
    "known_word": _KNOWN,
    "any_word" + CAPTION: _ANY + _CAPTION,
    "known_word" + CAPTION: _KNOWN + _CAPTION + ("local",),
}
# Presence experts: word-level features ("log_cam_mass" is log of the CAM mass).
# Presence experts: monotone evidence only (a linear CAM mass beside its log, or the best region's mean CAM,
# fitted the rare high-mass absences and ranked a dog above the cat on the cat photo). Concept Mask's
# verification joins the "any word" expert: its tag vocabulary holds every caption noun (target classes too:
# captions are fair), and it lifts the cross-fitted presence AP on held-out base classes from 0.44 to 0.53.
# With captions: the logit of the caption's occurrence probability (eq. 2), the share of captions that name the
# word or a kind of it, and the sentence-pooling cosine join both (`Evidence.word`).
_CAPTION_SCORES = ("caption_logit", "caption_named", "caption_pooling")
PRESENCE_EXPERTS = {
    "any_word": ("log_cam_mass", "verification"),
    "known_word": ("log_cam_mass", "related_rank", "xpm_best", "verification"),
    "any_word" + CAPTION: ("log_cam_mass", "verification") + _CAPTION_SCORES,
    "known_word" + CAPTION: ("log_cam_mass", "related_rank", "xpm_best", "verification") + _CAPTION_SCORES,
}


def needs_captions(expert: str) -> bool:
    return expert.endswith(CAPTION)


def _map(maps: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """An evidence map by name; "rel:x" is map x divided by its maximum on this image (how the word's best
    region compares with the rest, whatever the absolute level)."""
    if name.startswith("rel:"):
        m = maps[name[4:]]
        return m / m.max().clamp_min(1e-6)
    return maps[name]


def pixel_features(maps: dict[str, torch.Tensor], names) -> torch.Tensor:
    """(N, len(names)) from evidence maps (each flattened); "a*b" is the product of two maps."""
    cols = []
    for n in names:
        if "*" in n:
            a, b = n.split("*")
            cols.append((_map(maps, a) * _map(maps, b)).reshape(-1))
        else:
            cols.append(_map(maps, n).reshape(-1))
    return torch.stack(cols, dim=1).float()


def _score(scores: dict[str, float], name: str) -> float:
    if name == "log_cam_mass":  # the mass spans decades
        return float(np.log(max(scores["cam_mass"], 1e-6)))
    if name == "caption_logit":  # the entailment model is confident: its probabilities pile up at 0 and 1
        p = min(max(scores["caption_occurrence"], 1e-4), 1 - 1e-4)
        return float(np.log(p / (1 - p)))
    return float(scores[name])


def word_features(scores: dict[str, float], names) -> torch.Tensor:
    """(len(names),) word-level features; "a*b" is a product."""
    out = []
    for n in names:
        if "*" in n:
            a, b = n.split("*")
            out.append(_score(scores, a) * _score(scores, b))
        else:
            out.append(_score(scores, n))
    return torch.tensor(out, dtype=torch.float32)


@dataclass
class Logistic:
    """p = sigmoid(w . (x - mean) / std + b)."""

    names: tuple[str, ...]
    weights: np.ndarray
    bias: float
    mean: np.ndarray
    std: np.ndarray

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - torch.from_numpy(self.mean).float()) / torch.from_numpy(self.std).float()
        return z @ torch.from_numpy(self.weights).float() + self.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    def to_dict(self) -> dict:
        return {"names": list(self.names), "weights": self.weights.tolist(), "bias": self.bias,
                "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Logistic":
        return cls(tuple(d["names"]), np.array(d["weights"], np.float64), float(d["bias"]),
                   np.array(d["mean"], np.float64), np.array(d["std"], np.float64))

    @classmethod
    def fit(cls, names, x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, sample_weight=None) -> "Logistic":
        """Maximum likelihood with an L2 penalty, by L-BFGS on standardised features."""
        x, y = x.double(), y.double()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - mean) / std
        w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        sw = torch.ones_like(y) if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float64)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, weight=sw, reduction="sum")
                    / sw.sum() + l2 * (w ** 2).sum())
            loss.backward()
            return loss

        opt.step(closure)
        return cls(tuple(names), w.detach().numpy(), float(b.detach()), mean.numpy(), std.numpy())


@dataclass
class Combiner:
    """One fitted combiner: pixel and presence experts, each pixel expert's mask threshold, and the presence
    thresholds. The presence probability is calibrated on held-out base classes (every base class on every
    image, about 5% present: COCO scenes are cluttered and the ImageNet classifier is often unsure); "present"
    is that probability at or above the threshold with the best F1 there (Concept Mask's rule), per expert and
    mixed like the probabilities."""

    pixel: dict[str, Logistic]
    presence: dict[str, Logistic]
    thresholds: dict[str, float]
    present_at: dict[str, float]

    @property
    def reads_captions(self) -> bool:
        """Whether this combiner has caption experts for presence (a combiner trained before them, or with
        `--no-captions`, has not)."""
        return all(k + CAPTION in self.presence for k in ("any_word", "known_word"))

    def experts(self, captioned: bool, kind: str = "presence") -> tuple[str, str]:
        """(the "known word" expert, the "any word" expert) of `kind` ("pixel" or "presence") for evidence with
        or without caption priors; the caption-free pair where this combiner has no caption experts of that
        kind (pixel caption experts are trained only with `--caption-pixels`)."""
        experts = self.pixel if kind == "pixel" else self.presence
        has = all(k + CAPTION in experts for k in ("any_word", "known_word"))
        suffix = CAPTION if captioned and has else ""
        return "known_word" + suffix, "any_word" + suffix

    def pixel_probability(self, maps: dict[str, torch.Tensor], known: float) -> tuple[torch.Tensor, float, dict]:
        """(grid probability, mask threshold, {expert: its probability map}) of one word; the caption experts
        decide when the evidence has caption priors. The mask is `probability >= threshold * its maximum`
        (`relative_mask`)."""
        shape = next(iter(maps.values())).shape
        k_expert, a_expert = self.experts("caption_stripes" in maps, "pixel")
        each = {k: self.pixel[k](pixel_features(maps, self.pixel[k].names)).reshape(shape)
                for k in (k_expert, a_expert)}
        p = known * each[k_expert] + (1.0 - known) * each[a_expert]
        t = known * self.thresholds[k_expert] + (1.0 - known) * self.thresholds[a_expert]
        return p, t, each

    def presence_probability(self, scores: dict[str, float], known: float) -> tuple[float, dict]:
        """(presence probability, {expert: its probability}); the caption experts decide when the scores
        have the caption's occurrence."""
        k_expert, a_expert = self.experts("caption_occurrence" in scores)
        each = {k: float(self.presence[k](word_features(scores, self.presence[k].names)[None])[0])
                for k in (k_expert, a_expert)}
        return known * each[k_expert] + (1.0 - known) * each[a_expert], each

    def presence_threshold(self, known: float, captioned: bool = False) -> float:
        k_expert, a_expert = self.experts(captioned)
        return known * self.present_at[k_expert] + (1.0 - known) * self.present_at[a_expert]

    def to_dict(self) -> dict:
        return {"pixel": {k: v.to_dict() for k, v in self.pixel.items()},
                "presence": {k: v.to_dict() for k, v in self.presence.items()}, "thresholds": self.thresholds,
                "present_at": self.present_at}

    @classmethod
    def from_dict(cls, d: dict) -> "Combiner":
        return cls({k: Logistic.from_dict(v) for k, v in d["pixel"].items()},
                   {k: Logistic.from_dict(v) for k, v in d["presence"].items()}, dict(d["thresholds"]),
                   dict(d["present_at"]))


def relative_mask(p: torch.Tensor, threshold: float) -> torch.Tensor:
    """The mask of a probability map at a threshold relative to its peak."""
    return p >= threshold * p.max().clamp_min(1e-6)


class CrossFitted:
    """The shipped combiners: one per fold (fitted without that fold's images) and one fitted on all images.
    An image the combiner was fitted on gets its fold's model; any other image the one fitted on all."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        blob = json.loads((folder / "combiner.json").read_text())
        self.folder = folder
        self.all = Combiner.from_dict(blob["all"])
        self.folds = [(set(f["images"]), Combiner.from_dict(f["combiner"])) for f in blob["folds"]]
        self.base_vocabulary: list[str] = list(blob["base_vocabulary"])
        self.config = blob.get("config", {})

    def for_image(self, key: str) -> tuple[Combiner, str]:
        for k, (images, combiner) in enumerate(self.folds):
            if key in images:
                return combiner, f"fold {k} (cross-fitted: this image was in the combiner's training data)"
        return self.all, "all"


def save(folder: Path, all_model: Combiner, folds: list[tuple[list[str], Combiner]], base_vocabulary, config: dict):
    from ovseg.core.cache import atomic_write_json

    atomic_write_json(folder / "combiner.json", {
        "all": all_model.to_dict(), "base_vocabulary": list(base_vocabulary), "config": config,
        "folds": [{"images": sorted(images), "combiner": c.to_dict()} for images, c in folds]})
