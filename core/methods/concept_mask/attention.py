"""Concept Mask's attention network at run time (ECCV 2018, sec. 4.1-4.4, supplementary 5): the tag vectors,
the embedding network in its fully convolutional form, the refinement network, and how a word becomes an
attention map on an image's features. Training (`ovseg train concept_mask`) and the `concept_mask` method
share this one implementation.

Files of a trained model (a folder, e.g. assets/checkpoints/concept_mask/):
- tags.npz: `TagEmbedding` (vocabulary, PMI vectors, idf, text-encoder -> PMI map);
- attention.pt: the embedding network (1x1 convolutions) and the refinement network;
- attention_original.pt (optional): the stage-1 embedding network before refinement fine-tuning (Table 1's
  "Original" column);
- attention_nosd.pt (optional): embedding + refinement trained without the spatial discrimination loss
  ("Refined-noNeg");
- segmenter/ (weights.pt, config.json): the label-agnostic segmentation network (two attention channels);
  segmenter_single/ (optional): the same with one attention channel (the single-scale ablation);
- config.json: the training config, the refined (box-supervised) concepts, theta and the presence threshold.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ovseg.core.cache import atomic_write_bytes
from ovseg.core.methods.concept_mask.embedding_net import (ConvEmbeddingNet, RefinementNet, attention_maps,
                                                           normalise_maps, verification_score)
from ovseg.core.errors import ModelError
from ovseg.core.methods.concept_mask.pmi import TagEmbedding

FEATURE_DIM = 1280  # EfficientNet-Lite0's head features (stride 32)


class AttentionNet(nn.Module):
    """Embedding network (1x1 conv form) + refinement network over the V tag concepts.

    dense(head) -> (B, D, h, w) visual embeddings; coarse(dense) -> (B, V, h, w) eq. 1 maps of the vocabulary;
    refined_logits(coarse) -> (B, V, h, w) pre-sigmoid refined maps."""

    def __init__(self, vocab_vectors: torch.Tensor, hidden: int, bottleneck: int, in_dim: int = FEATURE_DIM):
        super().__init__()
        v, d = vocab_vectors.shape
        self.dims = {"in_dim": in_dim, "hidden": hidden, "out_dim": d, "vocab": v, "bottleneck": bottleneck}
        self.embed = ConvEmbeddingNet(in_dim, hidden, d)
        self.refine = RefinementNet(v, bottleneck)
        self.register_buffer("vocab_vectors", vocab_vectors.float().clone())

    def dense(self, head: torch.Tensor) -> torch.Tensor:
        return self.embed(head)

    def coarse(self, dense: torch.Tensor) -> torch.Tensor:
        return attention_maps(dense, self.vocab_vectors)

    def refined_logits(self, coarse: torch.Tensor) -> torch.Tensor:
        return self.refine.logits(coarse)

    def maps(self, head: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"dense": (B, D, h, w), "coarse": (B, V, h, w), "refined": (B, V, h, w) in (0, 1)} of head features
        (B, C, h, w)."""
        dense = self.dense(head.float())
        coarse = self.coarse(dense)
        return {"dense": dense, "coarse": coarse, "refined": torch.sigmoid(self.refined_logits(coarse))}

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) pooled features -> (B, D) embeddings (the fc network, as 1x1 convolutions on a 1x1 map)."""
        return self.embed(pooled[:, :, None, None])[:, :, 0, 0]

    def verification(self, head: torch.Tensor, attention: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
        """Supplementary 5 (`verification_score`) through this network's embedding: head (B, C, h, w),
        attention (B, h, w), word (D,) -> (B,) cosine similarities."""
        return verification_score(head, attention, self.embed_pooled, word)

    def save(self, path: str | Path) -> Path:
        buf = io.BytesIO()  # float16 on disk (half the size; float32 again at load)
        state = {k: v.half() if v.is_floating_point() else v for k, v in self.state_dict().items()}
        torch.save({"dims": self.dims, "state": state}, buf)
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> AttentionNet:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        d = blob["dims"]
        net = cls(torch.zeros(d["vocab"], d["out_dim"]), d["hidden"], d["bottleneck"], d["in_dim"])
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state"].items()})
        return net.eval().to(device)


@dataclass
class WordAttention:
    """How one word gets its attention map: `index` its vocabulary row (None outside the vocabulary),
    `vector` its (D,) word vector, `refined` whether it is a box-supervised concept (its refined map is used
    as is), `neighbour` the nearest refined concept (sec. 4.4; None for a refined concept), `source`
    "tags" or "text encoder" (the word was mapped into the PMI space)."""

    word: str
    vector: torch.Tensor
    index: int | None
    refined: bool
    neighbour: str | None
    neighbour_similarity: float | None
    source: str


class ConceptAttentionModel:
    """A trained attention network with its vocabulary, refined concepts, theta and presence threshold.

    `text_vector(word) -> (dt,) numpy` gives a text-encoder vector for words outside the tag vocabulary."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu", variant: str = "attention"):
        folder = Path(folder)
        path = folder / f"{variant}.pt"
        for needed in (folder / "tags.npz", folder / "config.json", path):
            if not needed.is_file():
                raise ModelError(f"{folder}: no trained Concept Mask attention network ({needed.name} is missing); "
                                 "run `ovseg train concept_mask` to make one")
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())
        self.tags = TagEmbedding.load(folder / "tags.npz")
        self.net = AttentionNet.load(path, device)
        self.device = torch.device(device)
        self.refined_names: list[str] = list(self.config["refined_concepts"])
        self.refined_index = [self.tags.index[n] for n in self.refined_names]
        self.theta = float(self.config["theta"])
        self.presence_threshold = float(self.config["presence_threshold"])
        vecs = torch.from_numpy(self.tags.vectors[self.refined_index]).float()
        self._refined_unit = F.normalize(vecs, dim=1)
        self._words: dict[str, WordAttention] = {}

    def word(self, word: str, text_vector=None) -> WordAttention:
        """The word's vector, vocabulary row and nearest refined concept. `text_vector`: a callable giving
        the text encoder's vector of the word, used only for words outside the tag vocabulary."""
        if word in self._words:
            return self._words[word]
        index = self.tags.index.get(word)
        if index is not None:
            vec, source = self.tags.vectors[index], "tags"
        else:
            if text_vector is None:
                raise KeyError(f"{word!r} is not in the tag vocabulary and no text encoder was given")
            vec, source = self.tags.vector(word, np.asarray(text_vector(word))), "text encoder"
        vector = torch.from_numpy(np.asarray(vec, dtype=np.float32))
        refined = word in self.refined_names
        neighbour = sim = None
        if not refined:
            sims = self._refined_unit @ F.normalize(vector, dim=0)
            best = int(sims.argmax())
            neighbour, sim = self.refined_names[best], float(sims[best])
        out = WordAttention(word, vector.to(self.device), index, refined, neighbour, sim, source)
        self._words[word] = out
        return out

    @torch.no_grad()
    def maps(self, head: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"dense": (D, h, w), "coarse": (V, h, w), "refined": (V, h, w) in (0, 1)} for one image's head
        features (1, C, h, w)."""
        return {k: v[0] for k, v in self.net.maps(head).items()}

    @torch.no_grad()
    def attention(self, maps: dict[str, torch.Tensor], w: WordAttention) -> dict[str, torch.Tensor]:
        """{"coarse": eq. 1 map of the word, "attention": the map the segmenter gets}, both (h, w) in [0, 1].

        A refined concept's attention is its refined map; any other word's is theta * its coarse map +
        (1 - theta) * the refined map of its nearest refined concept (sec. 4.4), each normalised to [0, 1]."""
        coarse = normalise_maps(torch.einsum("dhw,d->hw", maps["dense"], w.vector))
        if w.refined:
            att = normalise_maps(maps["refined"][w.index])
        else:
            p = self.refined_index[self.refined_names.index(w.neighbour)]
            att = normalise_maps(self.theta * coarse + (1.0 - self.theta) * normalise_maps(maps["refined"][p]))
        return {"coarse": coarse, "attention": att}
