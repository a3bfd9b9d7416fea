"""Cap2Seg's caption priors (seed 000, sec. 3.3.1-3.3.2): the contextual entailment model and its baselines.

Contextual entailment question (eq. 1): CEQ(x, c) = caption(x) [EOS] description(c). Here the question is fed to
the packaged all-MiniLM-L6-v2 (a 6-layer BERT, standing in for the paper's BERT-base) as the tokenizer's text
pair, `[CLS] caption [SEP] description [SEP]` ([SEP] plays [EOS]). phi(.) is the attention-masked mean of the
token states (MiniLM was trained with mean pooling, not with [CLS]); the multi-scale variant (sec. 5.1, after
[29]) averages that pooled feature over a low, a middle and the top layer instead of taking the top one only.
Two fully-connected heads read phi:

* H_o, occurrence (eq. 2): s_{x,c} = sigmoid(H_o(phi)), trained by binary cross-entropy over seen classes (eq. 3);
* H_s, spatial distribution (eq. 4-5): the softmax of H_s(phi) over K = 5 horizontal stripes, trained towards
  the share of the class's mask pixels in each stripe;

jointly, L = L_o + L_s (eq. 6). Departures, each forced by a CPU and a 464-image development set:

* only the top `trainable_layers` transformer layers (default 2) and the heads are fine-tuned, on a private copy
  of the encoder's transformer (the shared `Models.text_encoder` is never touched); the checkpoint keeps only
  those layers and the heads, in half precision;
* eq. 5 is printed as -sum_k q_hat log q (prediction times log ground truth); read literally it is infinite
  wherever a stripe holds none of the class (q = 0) and its minimum puts all predicted mass on one stripe, so the
  cross-entropy of the prediction against the ground truth, -sum_k q log q_hat, is used (the usual reading of
  "an informational entropy objective"); both losses are means over pairs rather than sums (eq. 3, 5 sum), so the
  learning rate does not depend on the batch size;
* description(c) is the class name (the paper's own example, sec. 3.3.1: "e.g., class names"); "gloss" appends
  WordNet's definition of the class's object sense ("couch: an upholstered seat for more than one person").

The sec. 5.1 baselines are here too: exact match (class name, WordNet synonyms and plurals against the caption's
words), sentence pooling (cosine between the mean of the caption's word embeddings and the class embedding) and
traditional ZSL (cosine between a caption embedding, mapped by a projection trained over seen classes, and the
class embedding).
"""

from __future__ import annotations

import copy
import io
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.core.errors import ModelError, OvsegError

K_STRIPES = 5
DESCRIPTIONS = ("name", "gloss")
WEIGHTS_FILE = "entailment.pt"


# --------------------------------------------------------------------------------------- eq. 4: ground truth
def stripe_distribution(mask: np.ndarray, k: int = K_STRIPES) -> np.ndarray:
    """Eq. 4: V_{x,c} = {g^(k) / sum_k g^(k)}, the share of the class's pixels in each of k horizontal stripes.

    Args:
        mask: HxW, the class's pixels (bool, or numbers where exactly the value 1 marks the class: a
            `training_mask` with 255 on crowd regions counts only its 1s). The image is cut into k stripes of
            uniform height, top first; with H not a multiple of k, stripe j holds rows
            floor(j*H/k) .. floor((j+1)*H/k) - 1.
        k: the number of stripes (the paper's K = 5).

    Returns:
        (k,) float64 summing to 1.

    Raises:
        OvsegError: not 2-D, fewer rows than stripes, k < 1, or no pixel of the class (the distribution is
            undefined; eq. 5 is summed over the classes present only).
    """
    mask = np.asarray(mask)
    if k < 1:
        raise OvsegError(f"the number of stripes must be at least 1, got {k}")
    if mask.ndim != 2:
        raise OvsegError(f"a stripe distribution needs an HxW mask, got shape {mask.shape}")
    if mask.shape[0] < k:
        raise OvsegError(f"a mask of {mask.shape[0]} rows cannot be cut into {k} stripes")
    on = mask if mask.dtype == bool else mask == 1
    rows = on.sum(axis=1, dtype=np.int64)
    edges = (np.arange(k + 1) * mask.shape[0]) // k
    g = np.add.reduceat(rows, edges[:-1]).astype(np.float64)
    total = g.sum()
    if total <= 0:
        raise OvsegError("the mask holds no pixel of the class: its stripe distribution is undefined")
    return g / total


def stripe_cosine(predicted, truth) -> float:
    """Sec. 4.2 / Table 3: cosine similarity between a predicted and a ground-truth stripe distribution."""
    p, t = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
    if p.shape != t.shape or p.ndim != 1:
        raise OvsegError(f"stripe distributions must be 1-D vectors of one length, got {p.shape} and {t.shape}")
    den = np.linalg.norm(p) * np.linalg.norm(t)
    return float(p @ t / den) if den > 0 else 0.0


# ----------------------------------------------------------------------------------------------- losses
def occurrence_loss(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Eq. 3, averaged over pairs: -[I log s + (1 - I) log(1 - s)] with s = sigmoid(H_o(phi)) (eq. 2).

    Args:
        logits: (N,) H_o outputs. present: (N,) 0/1, whether the class occurs in the image.
    """
    if logits.shape != present.shape:
        raise OvsegError(f"occurrence logits {tuple(logits.shape)} and labels {tuple(present.shape)} differ")
    return F.binary_cross_entropy_with_logits(logits, present.to(logits.dtype))


def stripe_loss(logits: torch.Tensor, truth: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Eq. 5 (as cross-entropy, module docstring), averaged over the pairs whose class is present:
    -sum_k q^(k) log q_hat^(k), q_hat = softmax(H_s(phi)) (the eq. after 4), q the eq. 4 ground truth.

    Args:
        logits: (N, K) H_s outputs. truth: (N, K) ground-truth distributions (any values on absent pairs).
        present: (N,) bool, the pairs that count (a class absent from the image has no distribution).

    Returns:
        A scalar; 0 (still attached to the graph) when no pair is present.
    """
    if logits.shape != truth.shape or logits.shape[:1] != present.shape:
        raise OvsegError(f"stripe logits {tuple(logits.shape)}, truth {tuple(truth.shape)} and mask "
                         f"{tuple(present.shape)} do not match")
    present = present.bool()
    if not present.any():
        return logits.sum() * 0.0
    logq = F.log_softmax(logits[present], dim=-1)
    return -(truth[present].to(logq.dtype) * logq).sum(-1).mean()


def joint_loss(occ_logits, stripe_logits, present, truth, counts=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 6: L = L_o + L_s. counts: (N,) bool, the pairs eq. 5 sums over (default: the present ones; a present
    class without a mask, such as a caption noun, has no stripe truth). Returns (L, L_o, L_s)."""
    lo = occurrence_loss(occ_logits, present.float())
    ls = stripe_loss(stripe_logits, truth, present.bool() if counts is None else counts.bool())
    return lo + ls, lo, ls


# ------------------------------------------------------------------------------------------ descriptions
@lru_cache(maxsize=None)
def class_sense(name: str) -> str | None:
    """The WordNet sense a class name stands for: its first object sense (`caption_nouns.object_sense`, e.g.
    tie -> necktie.n.01), else its first noun sense; None when WordNet has no noun of that name."""
    from ovseg.core.models.caption_nouns import object_sense
    from ovseg.core.models.lexicon import wordnet

    sense = object_sense(name)
    if sense is not None:
        return sense
    syns = wordnet().synsets(name.strip().lower().replace(" ", "_"), pos="n")
    return syns[0].name() if syns else None


def description(name: str, mode: str = "name") -> str:
    """description(c) of eq. 1: the class name ("name", the paper's example) or the name and WordNet's gloss of
    its sense ("gloss": "couch: an upholstered seat for more than one person")."""
    if mode not in DESCRIPTIONS:
        raise OvsegError(f"unknown description mode {mode!r}: use one of {DESCRIPTIONS}")
    name = name.strip().lower()
    if not name:
        raise OvsegError("a class description needs a non-empty class name")
    if mode == "name":
        return name
    from ovseg.core.models.lexicon import wordnet

    sense = class_sense(name)
    return f"{name}: {wordnet().synset(sense).definition()}" if sense else name


# ------------------------------------------------------------------------------------------- the model
@dataclass
class EntailmentConfig:
    """How the entailment model is built; saved with its checkpoint.

    trainable_layers: the top transformer layers fine-tuned (the rest stay as packaged).
    multiscale_layers: hidden-state indices (0 = embeddings, 6 = top of MiniLM) whose pooled features are
        averaged into phi (sec. 5.1 multi-scale); None: the top layer only.
    """

    trainable_layers: int = 2
    multiscale_layers: tuple[int, ...] | None = None
    description: str = "name"
    k: int = K_STRIPES
    max_length: int = 64
    dropout: float = 0.1
    text_encoder: str = "packaged all-MiniLM-L6-v2"

    def __post_init__(self):
        if self.multiscale_layers is not None:
            self.multiscale_layers = tuple(int(i) for i in self.multiscale_layers)
        if self.description not in DESCRIPTIONS:
            raise OvsegError(f"unknown description mode {self.description!r}: use one of {DESCRIPTIONS}")
        if self.k < 1 or self.trainable_layers < 0:
            raise OvsegError(f"need k >= 1 stripes and trainable_layers >= 0, got {self.k}, {self.trainable_layers}")


class ContextualEntailment(torch.nn.Module):
    """phi (a fine-tunable copy of the text encoder's transformer) with the heads H_o and H_s (eq. 2, 4-5).

    Args:
        encoder: a loaded `ovseg.core.models.text_encoder.TextEncoder` (its tokenizer is shared; its transformer
            is deep-copied, so the shared one stays frozen and unchanged).
        config: EntailmentConfig.
    """

    def __init__(self, encoder, config: EntailmentConfig | None = None):
        super().__init__()
        self.config = config or EntailmentConfig()
        self.tokenizer = encoder.tokenizer
        self.transformer = copy.deepcopy(encoder.model)
        layers = self._layers()
        n = len(layers)
        if self.config.trainable_layers > n:
            raise OvsegError(f"the text encoder has {n} layers: cannot fine-tune {self.config.trainable_layers}")
        for idx in self.config.multiscale_layers or ():
            if not 0 <= idx <= n:
                raise OvsegError(f"multi-scale layer {idx} is outside 0..{n} (0 = embeddings)")
        self.transformer.requires_grad_(False)
        self.first_trained = n - self.config.trainable_layers
        for layer in layers[self.first_trained:]:
            layer.requires_grad_(True)
        dim = int(encoder.dim)
        self.drop = torch.nn.Dropout(self.config.dropout)
        self.h_o = torch.nn.Linear(dim, 1)
        self.h_s = torch.nn.Linear(dim, self.config.k)
        self.to(encoder.device)

    def _layers(self):
        enc = getattr(self.transformer, "encoder", None)
        layers = getattr(enc, "layer", None) or getattr(enc, "layers", None)
        if layers is None:
            raise ModelError("the text encoder has no encoder.layer list: cap2seg needs a BERT-like transformer")
        return layers

    @property
    def device(self) -> torch.device:
        return self.h_o.weight.device

    def trained_parameters(self) -> tuple[list, list]:
        """(fine-tuned transformer parameters, head parameters)."""
        enc = [p for layer in self._layers()[self.first_trained:] for p in layer.parameters()]
        return enc, list(self.h_o.parameters()) + list(self.h_s.parameters())

    def token_lengths(self, captions: Sequence[str], descriptions: Sequence[str]) -> list[int]:
        """Each pair's token count as `features` encodes it (truncated to max_length)."""
        ids = self.tokenizer(list(captions), list(descriptions), truncation="only_first",
                             max_length=self.config.max_length)["input_ids"]
        return [len(i) for i in ids]

    def features(self, captions: Sequence[str], descriptions: Sequence[str], pad_to: int | None = None
                 ) -> torch.Tensor:
        """phi(CEQ(x, c)) for each (caption, description) pair: (N, D). pad_to: pad every pair to this many
        tokens (at least the longest pair's `token_lengths`; training pads every process's share to the global
        batch's longest) instead of the longest pair's."""
        if isinstance(captions, str) or isinstance(descriptions, str) or len(captions) != len(descriptions):
            raise OvsegError("captions and descriptions must be lists of equal length")
        if not captions:
            raise OvsegError("no (caption, description) pair to encode")
        batch = self.tokenizer(list(captions), list(descriptions), truncation="only_first",
                               padding="max_length" if pad_to else True,
                               max_length=min(pad_to, self.config.max_length) if pad_to else self.config.max_length,
                               return_tensors="pt").to(self.device)
        scales = self.config.multiscale_layers
        out = self.transformer(**batch, output_hidden_states=bool(scales))
        m = batch["attention_mask"].unsqueeze(-1).float()

        def pool(h):
            return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)

        if scales:
            return torch.stack([pool(out.hidden_states[i]) for i in scales]).mean(0)
        return pool(out.last_hidden_state)

    def forward(self, captions: Sequence[str], descriptions: Sequence[str], pad_to: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(occurrence logits (N,), stripe logits (N, K)): the inputs of eq. 2 and of the softmax after eq. 4."""
        phi = self.drop(self.features(captions, descriptions, pad_to))
        return self.h_o(phi).squeeze(-1), self.h_s(phi)

    @torch.no_grad()
    def predict(self, captions: Sequence[str], names: Sequence[str], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """For pairs (captions[i], class names[i]): s_{x,c} (N,) (eq. 2) and V_hat (N, K) (softmax of H_s)."""
        was = self.training
        self.eval()
        descs = [description(n, self.config.description) for n in names]
        occ, stripes = [], []
        try:
            for i in range(0, len(captions), batch_size):
                o, s = self(list(captions[i : i + batch_size]), descs[i : i + batch_size])
                occ.append(torch.sigmoid(o).float().cpu())
                stripes.append(torch.softmax(s, -1).float().cpu())
        finally:
            self.train(was)
        if not occ:
            return np.zeros(0, np.float32), np.zeros((0, self.config.k), np.float32)
        return torch.cat(occ).numpy(), torch.cat(stripes).numpy()

    # -------------------------------------------------------------------------------------- checkpoint
    def small_state(self) -> dict[str, torch.Tensor]:
        """The fine-tuned layers and the heads only, in half precision (the frozen layers are the packaged
        encoder's and are not saved)."""
        keep = {}
        prefixes = [f"transformer.encoder.layer.{i}." for i in range(self.first_trained, len(self._layers()))]
        for key, value in self.state_dict().items():
            if key.startswith(("h_o.", "h_s.")) or any(key.startswith(p) for p in prefixes):
                keep[key] = value.detach().to("cpu", torch.float16)
        return keep

    def save(self, folder: str | Path) -> Path:
        """Write `entailment.pt` (small_state and the config) into `folder` atomically; returns its path."""
        from ovseg.core.cache import atomic_write_bytes

        buf = io.BytesIO()
        torch.save({"config": asdict(self.config), "state": self.small_state()}, buf)
        return atomic_write_bytes(Path(folder) / WEIGHTS_FILE, buf.getvalue())

    @classmethod
    def load(cls, folder: str | Path, encoder) -> "ContextualEntailment":
        """The model saved by `save` in `folder`, on top of a copy of `encoder` (the packaged MiniLM it was
        trained from)."""
        path = Path(folder) / WEIGHTS_FILE
        if not path.is_file():
            raise ModelError(f"{path}: no cap2seg entailment checkpoint (run `ovseg train cap2seg`)")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            config = EntailmentConfig(**saved["config"])
        except Exception as exc:  # torch raises many types for a broken file
            raise ModelError(f"{path}: unreadable cap2seg checkpoint ({exc})") from None
        model = cls(encoder, config)
        own = model.state_dict()
        bad = [k for k, v in saved["state"].items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise ModelError(f"{path} does not fit this text encoder (e.g. {bad[0]}); retrain it")
        model.load_state_dict({k: v.float() for k, v in saved["state"].items()}, strict=False)
        return model.eval()


# ------------------------------------------------------------------------------- sec. 5.1: the baselines
@lru_cache(maxsize=None)
def class_variants(name: str) -> tuple[tuple[str, ...], ...]:
    """The word sequences exact match looks for: the class name and the lemma names of its WordNet sense
    (`class_sense`), lower case, each as a tuple of words ("couch" -> (couch,), (sofa,), (lounge,))."""
    from ovseg.core.models.caption_nouns import tokenize
    from ovseg.core.models.lexicon import wordnet

    forms = {tuple(tokenize(name))}
    sense = class_sense(name)
    if sense is not None:
        for lemma in wordnet().synset(sense).lemma_names():
            forms.add(tuple(tokenize(lemma.replace("_", " "))))
    return tuple(sorted(f for f in forms if f))


@lru_cache(maxsize=200_000)
def _base_form(token: str) -> str:
    from ovseg.core.models.caption_nouns import PLURAL_BASES
    from ovseg.core.models.lexicon import wordnet

    if token in PLURAL_BASES:
        return PLURAL_BASES[token]
    return wordnet().morphy(token, "n") or token


def exact_match(caption: str, name: str) -> float:
    """Sec. 5.1 "exact match": 1.0 when the caption contains the class name or one of its WordNet synonyms
    (`class_variants`), singular or plural, else 0.0. Plurals are reduced by WordNet's morphy ("knives" ->
    knife, "sofas" -> sofa); for a multi-word synonym the last word may be plural ("pairs of scissors" is not
    matched as "pair of scissors", but "scissors" is)."""
    from ovseg.core.models.caption_nouns import tokenize

    tokens = tokenize(caption)
    if not tokens:
        return 0.0
    bases = [_base_form(t) for t in tokens]
    for form in class_variants(name.strip().lower()):
        n = len(form)
        for i in range(len(tokens) - n + 1):
            head = tuple(tokens[i : i + n - 1])
            if head == form[:-1] and (tokens[i + n - 1] == form[-1] or bases[i + n - 1] == _base_form(form[-1])):
                return 1.0
    return 0.0


def sentence_pooling_scores(captions: Sequence[str], names: Sequence[str],
                            embed_words: Callable[[list[str]], torch.Tensor]) -> np.ndarray:
    """Sec. 5.1 "sentence pooling": cosine between the mean of the caption's word embeddings (every word,
    each embedded on its own by the text encoder: `Models.embed_words`) and the class embedding.

    Returns:
        (len(captions), len(names)) float32 cosines; a caption without words scores 0.
    """
    from ovseg.core.models.caption_nouns import tokenize

    classes = F.normalize(embed_words(list(names)).float(), dim=-1)
    pooled = []
    for caption in captions:
        words = tokenize(caption)
        pooled.append(embed_words(words).float().mean(0) if words else torch.zeros(classes.shape[1]))
    caps = F.normalize(torch.stack(pooled).to(classes.device), dim=-1)
    return (caps @ classes.T).cpu().numpy()


class TraditionalZSL(torch.nn.Module):
    """Sec. 5.1 "traditional ZSL" (after [37]): the caption's sentence embedding, mapped by a linear projection
    trained over seen classes, scored by cosine against the class-name embedding (both from the frozen text
    encoder). Training fits the projection with binary cross-entropy on tau * cos + b (tau, b learned); the
    occurrence score is the cosine itself (the same ranking as the probability)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim))
            self.proj.bias.zero_()
        self.tau = torch.nn.Parameter(torch.tensor(10.0))
        self.bias = torch.nn.Parameter(torch.tensor(-5.0))

    def cosine(self, caption_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """(N, C) cosine between projected captions (N, D) and classes (C, D)."""
        return F.normalize(self.proj(caption_emb), dim=-1) @ F.normalize(class_emb, dim=-1).T

    def fit(self, caption_emb: torch.Tensor, class_emb: torch.Tensor, present: torch.Tensor, steps: int = 300,
            lr: float = 1e-3, validation: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Full-batch Adam on the seen classes: caption_emb (N, D), class_emb (C, D), present (N, C) 0/1.

        validation: (caption_emb, present) of other images over the same seen classes; when given, the
        parameters of the step with the lowest validation loss are kept (early stopping: the projection has
        D x D parameters and overfits a few hundred captions).

        Returns {"train": loss per step, "validation": loss per step or [], "best_step": the step kept}.
        """
        for emb, lab in [(caption_emb, present)] + ([validation] if validation is not None else []):
            if lab.shape != (emb.shape[0], class_emb.shape[0]):
                raise OvsegError(f"labels {tuple(lab.shape)} do not match {emb.shape[0]} captions x "
                                 f"{class_emb.shape[0]} classes")
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        record = {"train": [], "validation": [], "best_step": steps}
        best = (float("inf"), None)
        for step in range(steps):
            logits = self.tau * self.cosine(caption_emb, class_emb) + self.bias
            loss = F.binary_cross_entropy_with_logits(logits, present.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            record["train"].append(loss.item())
            if validation is not None:
                with torch.no_grad():
                    v_logits = self.tau * self.cosine(validation[0], class_emb) + self.bias
                    v = F.binary_cross_entropy_with_logits(v_logits, validation[1].float()).item()
                record["validation"].append(v)
                if v < best[0]:
                    best = (v, copy.deepcopy(self.state_dict()))
                    record["best_step"] = step + 1
        if best[1] is not None:
            self.load_state_dict(best[1])
        return record

    @torch.no_grad()
    def scores(self, caption_emb: torch.Tensor, class_emb: torch.Tensor) -> np.ndarray:
        return self.cosine(caption_emb, class_emb).cpu().numpy()
