"""`ovseg train cap2seg`: Cap2Seg's contextual entailment model (seed 000, sec. 3.3.1-3.3.2, 4.2, 5.1).

1. Data (the default split's training images): every (caption, seen class) pair is a question CEQ(x, c)
   (eq. 1). Its occurrence label is whether the base class is annotated in the image (eq. 3); for a present
   class, its stripe distribution (eq. 4) comes from the class's mask, decoded by `training_mask` after
   `assert_no_target_annotations`. No mask or box of a target class is read in training; captions that name
   target classes are kept (that is the point of the paper).
2. Fitting (eq. 6, L = L_o + L_s): each epoch takes every caption with all its present base classes and
   `negatives` absent base classes drawn at random (all 48 negatives per caption would cost 48 x 1015 pairs an
   epoch on a CPU; the paper uses every pair). Adam as sec. 4.2, but lr 1e-4 on the top transformer layers (the
   paper: 3e-5 on all of BERT, for many more steps) and 1e-3 on the new heads.
   Curriculum (sec. 5.1, Fig. 3): the seen classes are ranked by how often the captions of an image holding them
   name them (exact match); the easiest third is active in the first third of the epochs, the easy and medium
   two thirds in the second, all classes after that.
3. Table 1 on the held-out images only (never trained on): per target class, AP over held-out images of the
   image's score, the mean over its captions of each method's per-caption score; mAP over the hard, medium and
   easy thirds of the 17 target classes. Split rule (the paper's Fig. 3 quantity): a target class's mention rate
   is the share of the captions of training images containing it that name it (exact match); the 17 classes
   sorted by it are cut 6 hard (lowest), 5 medium, 6 easy. That reads which target classes the training images
   contain (category labels, never a mask or box) and only to group the evaluation. The stripe cosine (Table 3,
   "global" branch) compares H_s, averaged over the image's captions, with eq. 4 of the target mask, decoded
   here at evaluation only, on held-out images only.
4. The checkpoint (`--out`): the fine-tuned top layers and the heads in half precision (`entailment.pt`),
   `config.json` and `training.json` (data, losses, seconds, Table 1, stripe cosines).

Rows CE and CE + multi-scale are ablations trained only for Table 1 (`--no-ablation` skips them); the checkpoint
is the configuration the flags ask for (default: multi-scale and curriculum, the paper's full model).

Scale (`ovseg.train.scale`): every network trains on the scalable loop (one CPU, a GPU, or N processes under
torchrun; `--resume` from `<out>.resume/<network>.pt`). An epoch's questions (`EpochPairs`) come from the seed
and the epoch alone and are cut into global batches of `batch_size` (an incomplete last one dropped); each
process takes every N-th question of a batch, each known-class question's local-branch sources come from its
own generator, the four loss terms are normalised by their global counts, and dropout (the transformer's, its
attention's and the heads') draws its masks for the global batch, every process padding its questions to the
batch's longest: N processes train what one does. The training images' masks are decoded in shards; rank 0
evaluates and writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ovseg.core.cache import atomic_write_json, replaced_folder
from ovseg.core.errors import OvsegError
from ovseg.core.methods.cap2seg.entailment import (ContextualEntailment, EntailmentConfig, TraditionalZSL,
                                                   description, exact_match, joint_loss, sentence_pooling_scores,
                                                   stripe_cosine, stripe_distribution)
from ovseg.core.methods.cap2seg.local import WEIGHTS_FILE as LOCAL_FILE
from ovseg.core.methods.cap2seg.local import (GRID, LocalConfig, LocalInference, consistency_loss, fuse,
                                              grid_labels, local_loss, sample_sources, stripe_shares)
from ovseg.core.models import Models
from ovseg.core.ops.metrics import average_precision
from ovseg.train.coco import (BASE_CLASSES, HOLDOUT_FRACTION, SPLIT_SEED, TARGET_CLASSES, CocoConceptDataset,
                              assert_no_target_annotations, fraction_of, split_image_ids, training_mask)
from ovseg.train.registry import register_trainer
from ovseg.train.scale import dist
from ovseg.train.scale.cli import add_scale_arguments
from ovseg.train.scale.dist import Context
from ovseg.train.scale.loop import LoopConfig, fit, item_seed

log = logging.getLogger(__name__)

LEVELS = ("hard", "medium", "easy")
ALL_CLASSES = tuple(BASE_CLASSES) + tuple(TARGET_CLASSES)
ROWS = ("exact_match", "sentence_pooling", "traditional_zsl", "ce", "ce_multiscale", "ce_multiscale_curriculum")


@dataclass
class TrainConfig:
    coco_dir: str
    out: str
    epochs: int = 3
    batch_size: int = 32
    negatives: int = 6  # absent base classes drawn per caption and epoch
    lr_encoder: float = 1e-4
    lr_heads: float = 1e-3
    trainable_layers: int = 2
    multiscale: bool = True
    multiscale_layers: tuple[int, ...] = (2, 4, 6)
    curriculum: bool = True
    description: str = "name"
    k: int = 5
    ablation: bool = True  # also train the CE and CE + multi-scale rows of Table 1
    evaluate: bool = True
    zsl_steps: int = 300
    holdout_fraction: float = HOLDOUT_FRACTION
    seed: int = SPLIT_SEED
    max_images: int | None = None  # only the first N training images (quick runs)
    fraction: float = 1.0  # the data-scaling study: this share of the training images (nested shares)
    max_eval_images: int | None = None  # only the first N held-out images
    segmentation: bool = True  # also train sec. 3.6's segmentation model (two networks: lambda 0.01 and 0)
    seg_epochs: int = 6
    entailment_from: str | None = None  # reuse the entailment model of this cap2seg folder (no refit, no Table 1)
    noun_pairs: int = 1  # extra-vocabulary caption nouns per caption and epoch, present and absent each (0: none)
    min_noun_images: int = 3  # an extra noun must be named on this many training images
    local_branch: bool = True  # sec. 3.4-3.5: the local branch and the consistency loss (with a run without it)
    # scale (`ovseg.train.scale`): device, mixed precision, DataLoader workers, feature caches, checkpoints
    device: str = "auto"
    amp: str = "auto"
    workers: int = 0
    feature_cache: bool = True
    memory_cache_mb: int = 2048
    checkpoint_every: int = 50
    resume: bool = False

    def entailment_config(self, multiscale: bool) -> EntailmentConfig:
        return EntailmentConfig(trainable_layers=self.trainable_layers,
                                multiscale_layers=tuple(self.multiscale_layers) if multiscale else None,
                                description=self.description, k=self.k)


# ------------------------------------------------------------------------------------------------- data
@dataclass
class CaptionedImage:
    """One training image: its captions, its present base classes and their eq. 4 stripe distributions, its
    known-class cells for the local branch (sec. 3.4) and the extra-vocabulary nouns its captions name."""

    image_id: int
    captions: list[str]
    present: list[str]
    stripes: dict[str, np.ndarray]
    grid: np.ndarray = field(default_factory=lambda: np.full((GRID, GRID), -1, np.int16))
    nouns: frozenset = frozenset()


class Pair(NamedTuple):
    """One contextual entailment question with its labels."""

    caption: str
    name: str
    present: float  # eq. 3's I: the class occurs in the image
    truth: np.ndarray  # eq. 4 (zeros where there is none)
    has_stripes: bool  # a present base class: eq. 5 counts it
    image: int  # index into the training images
    known: int  # index into BASE_CLASSES, -1 for an extra-vocabulary noun (no pixels: no local branch)


@lru_cache(maxsize=100_000)
def extra_noun(lemma: str) -> bool:
    """Whether a caption noun may serve as an extra known class: it names no base class (those have masks)
    and no target class, its synonyms or kinds (`class_of_noun`, `exact_match`): target names stay unseen."""
    from ovseg.core.models.caption_nouns import class_of_noun

    if class_of_noun(lemma, ALL_CLASSES) is not None:
        return False
    return not any(exact_match(lemma, t) for t in TARGET_CLASSES)


def caption_nouns(captions: list[str]) -> frozenset:
    """The extra-vocabulary object nouns (lemmas) any of an image's captions names."""
    from ovseg.core.models.caption_nouns import object_nouns

    return frozenset(n.lemma for c in captions for n in object_nouns(c) if extra_noun(n.lemma))


def noun_vocabulary(images: list[CaptionedImage], min_images: int = 3) -> list[str]:
    """The extra nouns named on at least `min_images` training images, sorted."""
    counts: dict[str, int] = {}
    for img in images:
        for n in img.nouns:
            counts[n] = counts.get(n, 0) + 1
    return sorted(n for n, c in counts.items() if c >= min_images)


def training_images(dataset: CocoConceptDataset, ids: list[int], k: int, progress: bool,
                    ctx: Context | None = None) -> list[CaptionedImage]:
    """The captioned training images with their base-class labels and stripe distributions, in `ids` order
    (under torchrun each process decodes every N-th image's masks; the results are gathered). `dataset` must
    score BASE_CLASSES only; each present class's mask comes from `training_mask` (which refuses a target class)."""
    from tqdm import tqdm

    ctx = ctx or Context()
    assert_no_target_annotations(dataset.classes)
    mine = {}
    for image_id in tqdm(ids[ctx.rank :: ctx.world], desc="cap2seg: base masks", unit="img", disable=not progress):
        captions = dataset.captions(image_id)
        if not captions:
            continue
        present = [n for n in dataset.classes_present(image_id) if n in BASE_CLASSES]
        assert_no_target_annotations(present)
        masks = {n: training_mask(dataset, image_id, n) for n in present}
        stripes = {n: stripe_distribution(m, k) for n, m in masks.items()}
        grid = grid_labels({BASE_CLASSES.index(n): m == 1 for n, m in masks.items()})
        mine[int(image_id)] = CaptionedImage(int(image_id), captions, present, stripes, grid, caption_nouns(captions))
    made = {k: v for part in dist.gather_objects(mine) for k, v in part.items()}
    out = [made[int(i)] for i in ids if int(i) in made]
    if not out:
        raise OvsegError(f"no captioned training image in {dataset.root}: cap2seg needs captions.json")
    return out


def mention_rates(images: list[tuple[list[str], set[str]]], classes) -> dict[str, dict]:
    """Per class: the images containing it, their captions, and the share of those captions that name it
    (`exact_match`): the paper's "probability of being directly mentioned by captions" (Fig. 3).

    Args:
        images: (captions, the classes the image contains) per image.
    """
    out = {}
    for name in classes:
        caps = [c for captions, present in images if name in present for c in captions]
        hits = sum(exact_match(c, name) for c in caps)
        out[name] = {"images": sum(name in present for _, present in images), "captions": len(caps),
                     "mention_rate": round(hits / len(caps), 4) if caps else 0.0}
    return out


def difficulty_split(rates: dict[str, dict]) -> dict[str, list[str]]:
    """Classes sorted by mention rate (ties by name) cut into thirds: hard (least named), medium, easy; with
    17 classes 6 / 5 / 6 (the middle third takes the remainder's shortfall)."""
    order = sorted(rates, key=lambda n: (rates[n]["mention_rate"], n))
    n = len(order)
    a, b = round(n / 3), n - round(n / 3)
    return {"hard": order[:a], "medium": order[a:b], "easy": order[b:]}


def epoch_pairs(images: list[CaptionedImage], active: list[str], negatives: int, rng: np.random.Generator,
                k: int, vocabulary: list[str] = (), noun_pairs: int = 0) -> list[Pair]:
    """The questions of one epoch: for every caption, its image's present active classes and `negatives` absent
    active ones drawn at random (an absent pair's stripe truth is zeros: L_s skips it); with a vocabulary,
    also `noun_pairs` nouns its image's captions name (present) and as many vocabulary nouns they do not
    (absent), occurrence only."""
    pairs = []
    zeros = np.zeros(k)
    active_set = set(active)
    index = {n: i for i, n in enumerate(BASE_CLASSES)}
    vocab_set = frozenset(vocabulary)
    for j, img in enumerate(images):
        pos = [n for n in img.present if n in active_set]
        absent = [n for n in active if n not in img.stripes]
        named = sorted(img.nouns & vocab_set) if noun_pairs else []
        for caption in img.captions:
            neg = list(rng.choice(absent, size=min(negatives, len(absent)), replace=False)) if absent else []
            pairs += [Pair(caption, n, 1.0, img.stripes[n], True, j, index[n]) for n in pos]
            pairs += [Pair(caption, str(n), 0.0, zeros, False, j, index[str(n)]) for n in neg]
            if noun_pairs and vocabulary:
                for n in (rng.choice(named, size=min(noun_pairs, len(named)), replace=False) if named else []):
                    pairs.append(Pair(caption, str(n), 1.0, zeros, False, j, -1))
                for _ in range(noun_pairs):
                    n = str(vocabulary[int(rng.integers(len(vocabulary)))])
                    if n not in img.nouns:
                        pairs.append(Pair(caption, n, 0.0, zeros, False, j, -1))
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


def pair_loss(model: ContextualEntailment, pairs: list[tuple], batch_size: int = 64) -> dict:
    """Mean L, L_o, L_s (eq. 6, 3, 5) over fixed pairs, without dropout or gradients."""
    was = model.training
    model.eval()
    tot = {"loss": 0.0, "occurrence": 0.0, "stripe": 0.0}
    n_all, n_pos = 0, 0
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            batch = pairs[i : i + batch_size]
            occ, st, present, truth, counts = _forward(model, batch)
            _, lo, ls = joint_loss(occ, st, present, truth, counts)
            tot["occurrence"] += float(lo) * len(batch)
            tot["stripe"] += float(ls) * float(counts.sum())
            n_all += len(batch)
            n_pos += int(counts.sum())
    model.train(was)
    out = {"occurrence": tot["occurrence"] / max(n_all, 1), "stripe": tot["stripe"] / max(n_pos, 1)}
    out["loss"] = out["occurrence"] + out["stripe"]
    return {k: round(v, 4) for k, v in out.items()}


def _forward(model: ContextualEntailment, batch: list[Pair]):
    """(occurrence logits, stripe logits, occurrence labels, stripe truth, whether eq. 5 counts the pair)."""
    occ, st = model([p.caption for p in batch], [description(p.name, model.config.description) for p in batch])
    present = torch.tensor([p.present for p in batch], device=model.device)
    truth = torch.tensor(np.stack([p.truth for p in batch]), dtype=torch.float32, device=model.device)
    counts = torch.tensor([p.has_stripes for p in batch], device=model.device)
    return occ, st, present, truth, counts


class LocalDraw(NamedTuple):
    """A known-class pair's local-branch inputs (eq. 9): n_sub source cells of the other known classes, their
    classes, and the pair's class on every lattice cell (labels) where a known class is (weight)."""

    cells: np.ndarray
    classes: np.ndarray
    labels: np.ndarray
    weight: np.ndarray


class EpochPairs:
    """The questions of every epoch (`epoch_pairs`: curriculum, negatives and extra nouns drawn from the seed
    and the epoch alone, so any process, and a resumed run, makes the same) as the scalable loop reads them:
    item(index, epoch) -> (pair, its local-branch draw or None). Each draw comes from the pair's own generator
    (`item_seed(seed, epoch, index)`), whatever process or DataLoader worker makes it."""

    def __init__(self, images: list[CaptionedImage], cfg: TrainConfig, curriculum: dict[str, list[str]] | None,
                 vocabulary: list[str], n_sub: int | None):
        self.images, self.cfg, self.curriculum, self.vocabulary, self.n_sub = images, cfg, curriculum, vocabulary, n_sub
        self._epochs: dict[int, list[Pair]] = {}
        self._sizes: dict[int, int] = {}  # questions per epoch: a plan needs only these

    def active(self, epoch: int) -> list[str]:
        """The seen classes asked about in an epoch: with a curriculum the easiest third in the first third of
        the epochs, then the easy and medium two thirds, then all."""
        if not self.curriculum:
            return list(BASE_CLASSES)
        stage = min(2, epoch * 3 // max(self.cfg.epochs, 1))
        active = {n for level in ("easy", "medium", "hard")[: stage + 1] for n in self.curriculum[level]}
        return [n for n in BASE_CLASSES if n in active]

    def pairs(self, epoch: int) -> list[Pair]:
        if epoch not in self._epochs:
            rng = np.random.default_rng(item_seed(self.cfg.seed, epoch, -1))
            noun_pairs = self.cfg.noun_pairs if self.vocabulary else 0
            self._epochs = {epoch: epoch_pairs(self.images, self.active(epoch), self.cfg.negatives, rng, self.cfg.k,
                                               self.vocabulary, noun_pairs)}  # one epoch held at a time
            self._sizes[epoch] = len(self._epochs[epoch])
        return self._epochs[epoch]

    def size(self, epoch: int) -> int:
        """The epoch's number of questions (made once, then remembered)."""
        return self._sizes[epoch] if epoch in self._sizes else len(self.pairs(epoch))

    def plan(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches: its (already shuffled) pairs in runs of batch_size, an incomplete last
        batch dropped (as a DistributedSampler drops it)."""
        n, b = self.size(epoch), self.cfg.batch_size
        return [list(range(i, i + b)) for i in range(0, (n // b) * b, b)]

    def __len__(self) -> int:
        return self.size(0)

    def item(self, index: int, epoch: int) -> tuple[Pair, LocalDraw | None]:
        p = self.pairs(epoch)[index]
        if self.n_sub is None or p.known < 0:
            return p, None
        grid = self.images[p.image].grid
        cells, classes = sample_sources(grid, p.known, self.n_sub,
                                        np.random.default_rng(item_seed(self.cfg.seed, epoch, index)))
        if len(cells) == 0:
            return p, None
        flat = grid.reshape(-1)
        return p, LocalDraw(cells, classes, (flat == p.known).astype(np.float32), (flat >= 0).astype(np.float32))


class _EntailmentAndLocal(torch.nn.Module):
    """The networks one entailment fit trains together: the entailment model and, optionally, the local branch."""

    def __init__(self, entailment: ContextualEntailment, local: LocalInference | None):
        super().__init__()
        self.entailment, self.local = entailment, local


def _entailment_step(ctx: Context, known_vectors: torch.Tensor | None, consistency: bool):
    """L = L_o + L_s [+ L_p + L_consist] of a process's share of a global batch, each term a sum over the share
    divided by its global count (pairs, pairs with a stripe truth, counted local cells, local pairs), so the
    gradients summed over processes are those of the global batch's means. Every process pads its questions to
    the global batch's longest, so the dropout masks drawn for the global batch fit (`dist.sync_transformer`)."""

    def step(model, batch, epoch):
        ent, local, dev = model.entailment, model.local, ctx.device
        pairs = [p for p, _ in batch]
        caps = [p.caption for p in pairs]
        descs = [description(p.name, ent.config.description) for p in pairs]
        longest = dist.all_reduce_max(torch.tensor([max(ent.token_lengths(caps, descs))]))
        occ, st = ent(caps, descs, pad_to=int(longest[0]))
        present = torch.tensor([p.present for p in pairs], device=dev)
        truth = torch.tensor(np.stack([p.truth for p in pairs]), dtype=torch.float32, device=dev)
        counts = torch.tensor([p.has_stripes for p in pairs], device=dev)
        # each term as a sum over this share: the core losses are means over their own counts
        _, lo, ls = joint_loss(occ, st, present, truth, counts)
        lo, ls = lo * len(pairs), ls * float(counts.sum())
        lp = lc = st.sum() * 0.0
        rows = [r for r, (_, d) in enumerate(batch) if d is not None]
        weight_sum = 0.0
        if local is not None and rows:
            draws = [batch[r][1] for r in rows]
            pos = local.positions[torch.from_numpy(np.stack([d.cells for d in draws])).to(dev)]
            src = known_vectors[torch.from_numpy(np.stack([d.classes for d in draws])).to(dev)]
            word = known_vectors[torch.tensor([pairs[r].known for r in rows], device=dev)]
            prob = local(pos, src, torch.ones(src.shape[:2], dtype=torch.bool, device=dev), word)
            weight = torch.from_numpy(np.stack([d.weight for d in draws])).to(dev)
            weight_sum = float(weight.sum())
            labels = torch.from_numpy(np.stack([d.labels for d in draws])).to(dev)
            lp = local_loss(prob, labels, weight) * max(weight_sum, 1.0)
            v_hat = torch.softmax(st[torch.tensor(rows, device=dev)].float(), dim=-1)
            lc = consistency_loss(stripe_shares(prob, st.shape[1]), v_hat) * len(rows)
        elif local is not None:  # no local pair here: a zero that still reaches the branch (gradients are summed)
            lp = lp + sum(q.sum() for q in local.parameters()) * 0.0
        n = dist.all_reduce_sum(torch.tensor([len(pairs), float(counts.sum()), weight_sum, len(rows)],
                                             dtype=torch.float64))
        n_pairs, n_stripes, n_cells, n_local = (max(float(v), 1.0) for v in n)
        lo, ls, lp, lc = lo / n_pairs, ls / n_stripes, lp / n_cells, lc / n_local
        loss = lo + ls + (lp + (lc if consistency else 0.0) if local is not None else 0.0)
        logged = dist.all_reduce_sum(torch.stack([loss, lo, ls, lp, lc]).detach().double().clone())
        logs = dict(zip(("total", "occurrence", "stripe", "local", "consistency"), map(float, logged)))
        logs["local_pairs"] = float(n[3])
        return loss, logs

    return step


def fit_entailment(encoder, images: list[CaptionedImage], cfg: TrainConfig, multiscale: bool,
                   curriculum: dict[str, list[str]] | None, label: str, progress: bool,
                   known_vectors: torch.Tensor | None = None, vocabulary: list[str] = (),
                   consistency: bool = True, ctx: Context | None = None, checkpoint: str | None = None
                   ) -> tuple[ContextualEntailment, LocalInference | None, dict]:
    """Fine-tune one entailment model on the training images (eq. 6); with `known_vectors` (the base classes'
    word vectors) the local branch is trained with it (eq. 9) and, with `consistency`, the two are tied by
    eq. 11: L = L_o + L_s + L_p + L_consist. Adam; the batches of `EpochPairs.plan`, on the scalable loop
    (`ovseg.train.scale.loop`): each process its share of every global batch, dropout masks drawn for the global
    batch, `checkpoint` written every cfg.checkpoint_every steps, cfg.resume goes on from it.
    -> (entailment model, local branch or None, loss record)."""
    ctx = ctx or Context()
    if cfg.batch_size % ctx.world:
        raise OvsegError(f"the batch size {cfg.batch_size} does not divide among {ctx.world} processes")
    torch.manual_seed(cfg.seed)
    model = ContextualEntailment(encoder, cfg.entailment_config(multiscale))
    local = LocalInference(LocalConfig(word_dim=known_vectors.shape[1])) if known_vectors is not None else None
    net = _EntailmentAndLocal(model, local).to(ctx.device)
    attention = dist.sync_transformer(model.transformer)
    dist.sync_batchnorm(net)  # the heads' dropout too
    enc_params, head_params = model.trained_parameters()
    groups = [{"params": head_params, "lr": cfg.lr_heads}]
    if enc_params:
        groups.append({"params": enc_params, "lr": cfg.lr_encoder})
    if local is not None:
        groups.append({"params": list(local.parameters()), "lr": cfg.lr_heads})
    opt = torch.optim.Adam(groups)
    source = EpochPairs(images, cfg, curriculum, list(vocabulary), local.config.n_sub if local is not None else None)
    probe = epoch_pairs(images, list(BASE_CLASSES), cfg.negatives, np.random.default_rng(cfg.seed + 1), cfg.k)[:512]
    record = {"probe_pairs": len(probe), "probe_before": pair_loss(model, probe) if ctx.main else None,
              "epochs": [], "local_branch": local is not None, "consistency": bool(local is not None and consistency),
              "extra_nouns": len(vocabulary) if (cfg.noun_pairs and vocabulary) else 0}
    loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, workers=cfg.workers, amp=cfg.amp,
                      checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every, resume=cfg.resume,
                      desc=f"cap2seg: {label}", progress=progress and ctx.main)
    vectors = known_vectors.to(ctx.device) if known_vectors is not None else None
    out = fit(net, opt, None, source, _entailment_step(ctx, vectors, consistency), loop, ctx, collate=list,
              plan=source.plan)
    model.transformer.config._attn_implementation = attention
    start = 0
    for epoch, logged in enumerate(out["epochs"]):
        steps = len(source.plan(epoch))
        entry = {"active_classes": len(source.active(epoch)), "pairs": steps * cfg.batch_size,
                 "first_batch_loss": round(out["step_totals"][start], 4) if start < len(out["step_totals"]) else None,
                 "mean_loss": logged["total"], "mean_occurrence": logged["occurrence"],
                 "mean_stripe": logged["stripe"]}
        if local is not None:
            entry.update(local_pairs=int(round(logged["local_pairs"] * steps)), mean_local=logged["local"],
                         mean_consistency=logged["consistency"])
        record["epochs"].append(entry)
        start += steps
    record["probe_after"] = pair_loss(model, probe) if ctx.main else None
    record["seconds"] = out["seconds"]
    record["pairs_per_s"] = out["items_per_s"]
    return model.eval(), (local.eval() if local is not None else None), record


# ------------------------------------------------------------------------------------------- evaluation
def target_mask(dataset: CocoConceptDataset, image_id: int, name: str, held_out: set[int]) -> np.ndarray:
    """A class's non-crowd mask on a held-out image: evaluation only (refuses a training image)."""
    if int(image_id) not in held_out:
        raise RuntimeError(f"image {image_id} is a training image: target masks are read on held-out images only")
    h, w = dataset.image_size(image_id)
    mask = np.zeros((h, w), dtype=bool)
    for ann in dataset.annotations(image_id):
        if dataset.coco.cats[ann["category_id"]]["name"] == name and not ann.get("iscrowd", 0):
            mask |= dataset.coco.annToMask(ann).astype(bool)
    return mask


def target_stripe_truth(dataset: CocoConceptDataset, image_id: int, name: str, held_out: set[int], k: int) -> np.ndarray:
    """Eq. 4 of a class's non-crowd mask on a held-out image: evaluation only (refuses a training image)."""
    return stripe_distribution(target_mask(dataset, image_id, name, held_out), k)


def table_row(scores: dict[str, np.ndarray], labels: dict[str, np.ndarray], split: dict[str, list[str]]) -> dict:
    """AP per target class (over held-out images) and mAP per difficulty level; "average" is the mean of the
    three levels (as the paper's Table 1), "all" the mean over every class with a positive image."""
    ap = {n: average_precision(scores[n], labels[n]) for n in scores}
    row = {}
    for level in LEVELS:
        vals = [ap[n] for n in split[level] if not np.isnan(ap[n])]
        row[level] = round(100 * float(np.mean(vals)), 1) if vals else None
    levels = [row[lv] for lv in LEVELS if row[lv] is not None]
    row["average"] = round(float(np.mean(levels)), 1) if levels else None
    valid = [v for v in ap.values() if not np.isnan(v)]
    row["all"] = round(100 * float(np.mean(valid)), 1) if valid else None
    row["ap"] = {n: (None if np.isnan(v) else round(100 * v, 1)) for n, v in ap.items()}
    return row


def image_scores(per_caption: np.ndarray, owners: np.ndarray, n_images: int) -> np.ndarray:
    """(captions, C) per-caption scores -> (images, C): the mean over each image's captions."""
    out = np.zeros((n_images, per_caption.shape[1]), np.float64)
    np.add.at(out, owners, per_caption)
    return out / np.bincount(owners, minlength=n_images)[:, None]


def table3(targets: CocoConceptDataset, ids: list[int], names: list[str], labels: dict[str, np.ndarray],
           global_stripes: dict[str, np.ndarray], branches: dict[str, LocalInference], known_vectors: torch.Tensor,
           word: torch.Tensor, held: set[int], k: int) -> dict:
    """Table 3 on the held-out images: per run (with / without the consistency loss) the mean stripe cosine of
    the global (V_hat), local (Y_hat) and fused (V*) distributions against eq. 4 of the target mask, and the
    local branch's cell-level AP (per target class over every held-out cell, then the mean). The local branch
    starts from the held-out images' ground-truth base-class cells (the paper's setting).

    global_stripes: run -> (images, classes, K) V_hat averaged over each image's captions; known_vectors: the base
    classes' word vectors; word: (classes, D) the target classes'."""
    from ovseg.core.methods.cap2seg.local import GRID as G

    base = CocoConceptDataset(targets.root, classes=BASE_CLASSES, image_ids=ids)  # the sources: base classes
    base_grid = {}
    for i in ids:
        masks = {BASE_CLASSES.index(n): training_mask(base, i, n) == 1
                 for n in base.classes_present(i) if n in BASE_CLASSES}
        base_grid[i] = grid_labels(masks, G)
    out = {}
    cell_truth = {}
    for run, local in branches.items():
        cos = {"global": [], "local": [], "fused": []}
        cells = {n: ([], []) for n in names}
        for j, i in enumerate(ids):
            for c, n in enumerate(names):
                prob = local.predict(base_grid[i], known_vectors, word[c])
                present = bool(labels[n][j])
                if present and (i, n) not in cell_truth:
                    mask = target_mask(targets, i, n, held)
                    cell_truth[(i, n)] = (mask, grid_labels({0: mask}, G) == 0)
                if prob is not None:
                    truth_cells = cell_truth[(i, n)][1] if present else np.zeros((G, G), bool)
                    cells[n][0].append(prob.reshape(-1))
                    cells[n][1].append(truth_cells.reshape(-1))
                if not present:
                    continue
                truth = stripe_distribution(cell_truth[(i, n)][0], k)
                v_hat = global_stripes[run][j, c]
                y_hat = None if prob is None else stripe_shares(torch.from_numpy(prob.reshape(-1)), k).numpy()
                cos["global"].append(stripe_cosine(v_hat, truth))
                cos["fused"].append(stripe_cosine(fuse(y_hat, v_hat), truth))
                if y_hat is not None:
                    cos["local"].append(stripe_cosine(y_hat, truth))
        aps = [average_precision(np.concatenate(sc), np.concatenate(lb)) for sc, lb in cells.values()
               if sc and np.concatenate(lb).any()]
        out[run] = {**{key: round(float(np.mean(v)), 4) if v else None for key, v in cos.items()},
                    "pairs": len(cos["global"]), "local_ap": round(100 * float(np.mean(aps)), 1) if aps else None,
                    "local_ap_classes": len(aps)}
    return out


def evaluate(cfg: TrainConfig, models: Models, zsl: TraditionalZSL, entailment: dict[str, ContextualEntailment],
             split: dict[str, list[str]], held_ids: list[int],
             branches: dict[str, tuple[ContextualEntailment, LocalInference]] | None = None) -> dict:
    """Table 1, the global stripe cosines and (with `branches`: run -> (entailment, local branch)) Table 3 on the
    held-out images (module docstring, step 3)."""
    targets = CocoConceptDataset(cfg.coco_dir, classes=TARGET_CLASSES, image_ids=held_ids)
    held = set(held_ids)
    ids = [i for i in held_ids if targets.captions(i)]
    captions, owners = [], []
    for j, image_id in enumerate(ids):
        for c in targets.captions(image_id):
            captions.append(c)
            owners.append(j)
    owners = np.array(owners)
    names = list(TARGET_CLASSES)
    labels = {n: np.array([n in targets.classes_present(i) for i in ids]) for n in names}
    per_caption = {
        "exact_match": np.array([[exact_match(c, n) for n in names] for c in captions]),
        "sentence_pooling": sentence_pooling_scores(captions, names, models.embed_words),
        "traditional_zsl": zsl.scores(models.text_encoder.embed(captions), models.embed_words(names)),
    }

    def caption_priors(model):
        flat_caps = [c for c in captions for _ in names]
        flat_names = [n for _ in captions for n in names]
        occ, st = model.predict(flat_caps, flat_names)
        st = st.reshape(len(captions), len(names), -1)
        img = np.zeros((len(ids), len(names), st.shape[-1]))
        np.add.at(img, owners, st)
        return occ.reshape(len(captions), len(names)), img / np.bincount(owners, minlength=len(ids))[:, None, None]

    stripes = {}
    for row, model in entailment.items():
        per_caption[row], stripes[row] = caption_priors(model)
    table = {}
    for row, pc in per_caption.items():
        s = image_scores(pc, owners, len(ids))
        table[row] = table_row({n: s[:, j] for j, n in enumerate(names)}, labels, split)
    # stripe cosine on held-out (image, target class) pairs; ground truth decoded here only
    pairs = [(j, i, n) for j, i in enumerate(ids) for n in names if labels[n][j]]
    truth = [target_stripe_truth(targets, i, n, held, cfg.k) for _, i, n in pairs]
    uniform = np.full(cfg.k, 1.0 / cfg.k)
    cos = {"pairs": len(pairs), "uniform": round(float(np.mean([stripe_cosine(uniform, t) for t in truth])), 4)
           if truth else None}
    for row, img in stripes.items():
        vals = [stripe_cosine(img[j, names.index(n)], t) for (j, _, n), t in zip(pairs, truth)]
        cos[row] = round(float(np.mean(vals)), 4) if vals else None
    out = {"images": len(ids), "captions": len(captions),
           "positives": {n: int(labels[n].sum()) for n in names}, "table1": table, "stripe_cosine": cos}
    if branches:
        known = models.embed_words(list(BASE_CLASSES)).float().cpu()
        done = {id(model): row for row, model in entailment.items()}  # Table 1's run already scored these
        global_stripes = {run: stripes[done[id(ent)]] if id(ent) in done else caption_priors(ent)[1]
                          for run, (ent, _) in branches.items()}
        out["table3"] = table3(targets, ids, names, labels, global_stripes,
                               {run: loc for run, (_, loc) in branches.items()}, known,
                               models.embed_words(names).float().cpu(), held, cfg.k)
    return out


# ------------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, progress: bool = True) -> Path | None:
    """Everything the module docstring lists, into cfg.out. Under torchrun every process trains its share;
    rank 0 alone evaluates and writes (the others return None)."""
    ctx = dist.setup(cfg.device)
    try:
        return _train(cfg, ctx, progress and ctx.main)
    finally:
        dist.teardown()


def _stage_checkpoint(cfg: TrainConfig, stage: str) -> str:
    return str(Path(f"{cfg.out}.resume") / f"{stage.replace(' ', '_').replace('.', '')}.pt")


def _train(cfg: TrainConfig, ctx: Context, progress: bool) -> Path | None:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.negatives < 0:
        raise OvsegError(f"need epochs >= 1, batch_size >= 1 and negatives >= 0, got {cfg.epochs}, "
                         f"{cfg.batch_size}, {cfg.negatives}")
    resume_dir = Path(f"{cfg.out}.resume")
    if not cfg.resume and ctx.main and resume_dir.exists():
        shutil.rmtree(resume_dir)  # a fresh run: an older interrupted run's states are not this run's
    dist.barrier()
    dataset = CocoConceptDataset(cfg.coco_dir, classes=BASE_CLASSES)
    train_ids, held_ids = split_image_ids(dataset.image_ids, cfg.holdout_fraction, cfg.seed)
    train_ids = fraction_of(train_ids, cfg.fraction, cfg.seed)
    all_train_ids = train_ids
    train_ids = [i for i in train_ids if dataset.captions(i)]  # only captioned images make questions
    held_ids = [i for i in held_ids if dataset.captions(i)]
    train_ids = train_ids[: cfg.max_images] if cfg.max_images else train_ids
    held_ids = held_ids[: cfg.max_eval_images] if cfg.max_eval_images else held_ids
    images = training_images(dataset, train_ids, cfg.k, progress, ctx)
    t_data = time.perf_counter() - t_start

    # curriculum over the seen classes: their mention rates on the training captions
    base_rates = mention_rates([(img.captions, set(img.present)) for img in images], BASE_CLASSES)
    curriculum = difficulty_split({n: r for n, r in base_rates.items() if r["images"]})
    unseen_in_data = [n for n, r in base_rates.items() if not r["images"]]
    curriculum["easy"] = curriculum["easy"] + unseen_in_data  # only negatives: active from the start

    models = Models(ctx.device)
    if cfg.entailment_from:  # only the segmentation model is trained: no baseline or entailment fit
        return _with_entailment_from(cfg, models, all_train_ids, progress, t_start, ctx)
    encoder = models.text_encoder
    caps = [c for img in images for c in img.captions]
    variants = {"ce_multiscale_curriculum": (True, True)} if (cfg.multiscale and cfg.curriculum) else {}
    if not variants:
        key = "ce_multiscale" if cfg.multiscale else ("ce_curriculum" if cfg.curriculum else "ce")
        variants[key] = (cfg.multiscale, cfg.curriculum)
    final_row = next(iter(variants))
    if cfg.ablation:
        variants = {"ce": (False, False), "ce_multiscale": (True, False), **variants}
    vocabulary = noun_vocabulary(images, cfg.min_noun_images) if cfg.noun_pairs else []
    known_vectors = models.embed_words(list(BASE_CLASSES)).float().cpu() if cfg.local_branch else None
    fitted, records, branches = {}, {}, {}
    for row, (ms, cl) in variants.items():
        final_here = row == final_row
        fitted[row], local, records[row] = fit_entailment(
            encoder, images, cfg, ms, curriculum if cl else None, row, progress,
            known_vectors=known_vectors if final_here else None, vocabulary=vocabulary, ctx=ctx,
            checkpoint=_stage_checkpoint(cfg, row))
        if local is not None:
            branches["with_consistency"] = (fitted[row], local)
    if cfg.local_branch and cfg.evaluate and cfg.ablation:  # Table 3's other run: the same model without eq. 11
        ms, cl = variants[final_row]
        ent, local, records["without_consistency"] = fit_entailment(
            encoder, images, cfg, ms, curriculum if cl else None, "without eq. 11", progress,
            known_vectors=known_vectors, vocabulary=vocabulary, consistency=False, ctx=ctx,
            checkpoint=_stage_checkpoint(cfg, "without_consistency"))
        branches["without_consistency"] = (ent, local)
    t_fit = time.perf_counter() - t_start - t_data

    final = fitted[final_row]
    final_local = branches.get("with_consistency", (None, None))[1]
    seg = _segmentation(cfg, models, final, final_local, all_train_ids, progress, ctx)
    if not ctx.main:
        return None

    # traditional ZSL (a baseline of Table 1): a projection of the frozen caption embedding, fitted over the seen
    # classes on 80% of the training images and early-stopped on the other 20% (no held-out image is used)
    names = list(BASE_CLASSES)
    zsl_val = set(np.random.default_rng(cfg.seed).permutation(len(images))[: max(1, len(images) // 5)].tolist())
    cap_emb = encoder.embed(caps)
    present = torch.tensor([[float(n in img.stripes) for n in names] for img in images for _ in img.captions])
    in_val = torch.tensor([j in zsl_val for j, img in enumerate(images) for _ in img.captions])
    if len(images) < 2:
        in_val[:] = False
    torch.manual_seed(cfg.seed)
    zsl = TraditionalZSL(encoder.dim)
    zsl_record = zsl.fit(cap_emb[~in_val], models.embed_words(names), present[~in_val], steps=cfg.zsl_steps,
                         validation=(cap_emb[in_val], present[in_val]) if in_val.any() else None)

    results = None
    if cfg.evaluate:
        t0 = time.perf_counter()
        targets_all = CocoConceptDataset(cfg.coco_dir, classes=TARGET_CLASSES)
        train_set = set(all_train_ids)
        target_rates = mention_rates(
            [(targets_all.captions(i), set(targets_all.classes_present(i))) for i in targets_all.image_ids
             if i in train_set], TARGET_CLASSES)
        split = difficulty_split(target_rates)
        results = evaluate(cfg, models, zsl, fitted, split, held_ids, branches)
        results.update(split=split, split_rule=(
            "target classes sorted by mention rate (share of the captions of training images containing the "
            "class that name it, exact match); lowest 6 hard, middle 5 medium, top 6 easy"),
            target_mention_rates=target_rates, seconds=round(time.perf_counter() - t0, 1))

    summary = {
        "data": {"coco_dir": str(Path(cfg.coco_dir).resolve()), "training_images": len(images),
                 "training_captions": len(caps), "present_base_pairs": sum(len(i.present) for i in images),
                 "held_out_images": len(held_ids),
                 "held_out_ids_sha1": hashlib.sha1(json.dumps(sorted(held_ids)).encode()).hexdigest(),
                 "classes": "base classes only: their labels and masks; no target mask or box is read in training"},
        "checkpoint_row": final_row,
        "curriculum": curriculum, "base_mention_rates": base_rates,
        "extra_vocabulary": {"nouns": len(vocabulary), "noun_pairs_per_caption": cfg.noun_pairs if vocabulary else 0,
                             "rule": "object nouns of the training captions named on at least "
                                     f"{cfg.min_noun_images} training images that name no base or target class "
                                     "(nor a synonym or kind of one); occurrence only",
                             "examples": vocabulary[:40]},
        "losses": records, "traditional_zsl_loss": {
            "first": round(zsl_record["train"][0], 4), "last": round(zsl_record["train"][-1], 4),
            "best_step": zsl_record["best_step"],
            "validation_best": round(min(zsl_record["validation"]), 4) if zsl_record["validation"] else None},
        "evaluation": results,
        "seconds": {"data": round(t_data, 1), "fit": round(t_fit, 1)},
        "throughput": {"processes": ctx.world, "device": str(ctx.device),
                       "pairs_per_s": {row: r.get("pairs_per_s") for row, r in records.items()}},
        "torch": torch.__version__,
    }
    return _save(cfg, final, final_local, final_row, summary, seg, t_start)


def _segmentation(cfg: TrainConfig, models: Models, final: ContextualEntailment, final_local: LocalInference | None,
                  all_train_ids: list[int], progress: bool, ctx: Context) -> tuple[dict, dict, float] | None:
    """Sec. 3.6's two networks on their fused priors (every process its share) -> (networks, summary, seconds),
    or None without `cfg.segmentation`."""
    from ovseg.train.methods.cap2seg_segmentation import SegTrainConfig, train_segmentation

    if not cfg.segmentation:
        return None
    t0 = time.perf_counter()
    dataset = CocoConceptDataset(cfg.coco_dir)
    # a quick run (--max-images) takes the captioned images the entailment model saw, so that L_RS runs
    seg_ids = ([i for i in all_train_ids if dataset.captions(i)][: cfg.max_images] if cfg.max_images
               else all_train_ids)
    seg_cfg = SegTrainConfig(epochs=cfg.seg_epochs, seed=cfg.seed, workers=cfg.workers, amp=cfg.amp,
                             feature_cache=cfg.feature_cache, memory_cache_mb=cfg.memory_cache_mb,
                             checkpoint_every=cfg.checkpoint_every, resume=cfg.resume)
    nets, summary = train_segmentation(dataset, seg_ids, models, final, final_local, seg_cfg,
                                       progress, ctx, resume_dir=f"{cfg.out}.resume")
    return nets, summary, round(time.perf_counter() - t0, 1)


def _save(cfg: TrainConfig, final: ContextualEntailment, final_local: LocalInference | None, final_row: str,
          summary: dict, seg: tuple[dict, dict, float] | None, t_start: float) -> Path:
    """The entailment model and local branch, sec. 3.6's segmentation networks and the config and summary, into
    a fresh folder swapped in for cfg.out when everything is written; the resume states go."""
    from ovseg.train.methods.cap2seg_segmentation import save_networks

    out = Path(cfg.out)
    with replaced_folder(out) as tmp:
        final.save(tmp)
        if final_local is not None:
            final_local.save(tmp, {"known_classes": list(BASE_CLASSES)})
        if seg is not None:
            nets, summary["segmentation"], summary["seconds"]["segmentation"] = seg
            save_networks(nets, tmp)
        summary["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
        atomic_write_json(tmp / "config.json", {"train": asdict(cfg), "entailment": asdict(final.config),
                                                "row": final_row, "classes_seen": list(BASE_CLASSES),
                                                "description_example": description("couch", final.config.description)})
        atomic_write_json(tmp / "training.json", summary)
    shutil.rmtree(f"{cfg.out}.resume", ignore_errors=True)
    log.info("saved %s", out)
    return out


def _with_entailment_from(cfg: TrainConfig, models: Models, all_train_ids: list[int], progress: bool,
                          t_start: float, ctx: Context) -> Path | None:
    """Reuse a trained entailment model (`--entailment-from FOLDER`, a cap2seg folder this trainer wrote):
    its Table 1 and losses are carried over from its training.json; only the segmentation model is trained."""
    source = Path(cfg.entailment_from)
    final = ContextualEntailment.load(source, models.text_encoder)
    final_local = LocalInference.load(source, models.device) if (source / LOCAL_FILE).is_file() else None
    seg = _segmentation(cfg, models, final, final_local, all_train_ids, progress, ctx)
    if not ctx.main:
        return None
    previous = json.loads((source / "training.json").read_text()) if (source / "training.json").is_file() else {}
    previous_config = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {}
    summary = {**{k: v for k, v in previous.items() if k not in ("seconds", "segmentation")},
               "entailment_from": str(source), "entailment_seconds": previous.get("seconds", {}),
               "seconds": {}}
    return _save(cfg, final, final_local, previous_config.get("row", "reused"), summary, seg, t_start)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig("", "")
    p.add_argument("--coco", default="../shared/data/coco_dev", help="COCO folder (images/, instances.json, captions.json)")
    p.add_argument("--out", default="assets/checkpoints/cap2seg", help="model folder (replaced when done)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"pairs per step (default {d.batch_size})")
    p.add_argument("--negatives", type=int, default=d.negatives,
                   help=f"absent base classes drawn per caption and epoch (default {d.negatives})")
    p.add_argument("--trainable-layers", type=int, default=d.trainable_layers,
                   help=f"top transformer layers fine-tuned (default {d.trainable_layers})")
    p.add_argument("--no-multiscale", action="store_true", help="phi from the top layer only")
    p.add_argument("--no-curriculum", action="store_true", help="every seen class active from the first epoch")
    p.add_argument("--description", choices=("name", "gloss"), default=d.description,
                   help="description(c): the class name (default) or the name with its WordNet gloss")
    p.add_argument("--no-ablation", action="store_true",
                   help="skip the CE and CE + multi-scale rows of Table 1 (about a third of the time each)")
    p.add_argument("--no-eval", action="store_true", help="skip Table 1 and the stripe cosines")
    p.add_argument("--max-images", type=int, default=None, help="only the first N training images (quick runs)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="train on this share of the training images (the data-scaling study: 0.25, 0.5, 1)")
    p.add_argument("--max-eval-images", type=int, default=None, help="only the first N held-out images")
    p.add_argument("--no-segmentation", action="store_true", help="skip sec. 3.6's segmentation model")
    p.add_argument("--noun-pairs", type=int, default=d.noun_pairs,
                   help=f"extra caption nouns asked per caption and epoch, present and absent each (default "
                        f"{d.noun_pairs}; 0: the seen classes only)")
    p.add_argument("--no-local-branch", action="store_true",
                   help="skip sec. 3.4-3.5 (the local branch, the consistency loss and Table 3)")
    p.add_argument("--seg-epochs", type=int, default=d.seg_epochs,
                   help=f"epochs of the segmentation model (default {d.seg_epochs})")
    p.add_argument("--entailment-from", default=None,
                   help="reuse the entailment model of this cap2seg folder and train only the segmentation model")
    add_scale_arguments(p, d, features=True)


def run(args) -> Path:
    return train(TrainConfig(coco_dir=args.coco, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
                             negatives=args.negatives, trainable_layers=args.trainable_layers,
                             multiscale=not args.no_multiscale, curriculum=not args.no_curriculum,
                             description=args.description, ablation=not args.no_ablation,
                             evaluate=not args.no_eval, max_images=args.max_images, fraction=args.fraction,
                             max_eval_images=args.max_eval_images, segmentation=not args.no_segmentation,
                             seg_epochs=args.seg_epochs, entailment_from=args.entailment_from,
                             noun_pairs=args.noun_pairs, local_branch=not args.no_local_branch, device=args.device,
                             amp=args.amp, workers=args.workers, feature_cache=not args.no_feature_cache,
                             memory_cache_mb=args.memory_cache_mb, checkpoint_every=args.checkpoint_every,
                             resume=args.resume))


register_trainer("cap2seg", "Cap2Seg's contextual entailment (caption occurrence and stripe priors; base classes)",
                 add_arguments, run, distributed=True)
