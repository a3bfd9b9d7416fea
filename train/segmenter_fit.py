"""The training loop every method shares for its class-agnostic segmenter (`ovseg.core.ops.segmenter`): Golub et
al.'s attention-channel segmenter (`ovseg train cls_saliency`) and Concept Mask's label-agnostic segmentation
network (`ovseg train concept_mask`). Only the prior channels differ, and the caller's `sample` makes them. It runs on
the scalable loop (`ovseg.train.scale`): one CPU, a GPU, or N processes under torchrun, resumable.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.core.ops.segmenter import IGNORE_INDEX, ClassAgnosticSegmenter, SegmenterConfig, segmentation_loss
from ovseg.train.scale import dist
from ovseg.train.scale.dist import Context, all_reduce_sum
from ovseg.train.scale.loop import LoopConfig, fit


def training_sample(rgb_input: torch.Tensor, priors: Sequence[torch.Tensor], target: torch.Tensor, size: int,
                    flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One segmenter training example at size x size.

    Args:
        rgb_input: (3, H, W) the image as the classifier expects it.
        priors: (h, w) maps in [0, 1], each resized (bilinear) with the image; h, w need not be H, W.
        target: (size, size) long, already resized (0/1, 255 = ignore).
        flip: mirror input and target left-right.

    Returns:
        (3 + len(priors), size, size) float input and the (size, size) long target.
    """
    out = (size, size)
    channels = [F.interpolate(rgb_input[None].float(), size=out, mode="bilinear", align_corners=False)[0]]
    for p in priors:
        channels.append(F.interpolate(p[None, None].float(), size=out, mode="bilinear", align_corners=False)[0])
    x = torch.cat(channels)
    if flip:
        x, target = x.flip(-1), target.flip(-1)
    return x, target


def resized_target(mask: np.ndarray, size: int) -> torch.Tensor:
    """An (H, W) uint8 training mask (0/1, 255 = ignore) -> (size, size) uint8 by nearest neighbour."""
    t = torch.from_numpy(mask)[None, None].float()
    return F.interpolate(t, size=(size, size), mode="nearest")[0, 0].to(torch.uint8)


def segmenter_plan(n: int, epochs: int, batch_size: int, rng: random.Random) -> list[list[list[tuple[int, bool]]]]:
    """Every epoch's global batches of (pair index, flip), drawn from `rng` in the order the segmenter has
    always drawn them: per epoch a shuffle of the pairs, then one flip draw (p = 0.5) per pair as its batch
    comes. A last batch of one pair is left out (BatchNorm needs two); a last smaller batch of two or more is
    kept. Every process draws the same plan from the same seed."""
    per_epoch = n // batch_size + (1 if n % batch_size >= 2 else 0)
    if per_epoch == 0:
        raise ValueError(f"a segmenter needs at least 2 training pairs, got {n}")
    plan = []
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        plan.append([[(i, rng.random() < 0.5) for i in order[b : b + batch_size]]
                     for b in range(0, per_epoch * batch_size, batch_size)])
    return plan


class _PairSource:
    """The training pairs as the scalable loop reads them: item((index, flip), epoch) -> (input, target)."""

    def __init__(self, pairs: list, sample: Callable):
        self.pairs, self.sample = pairs, sample

    def __len__(self) -> int:
        return len(self.pairs)

    def item(self, key: tuple[int, bool], epoch: int):
        index, flip = key
        return self.sample(self.pairs[index], flip)


def _collate(items: list):
    """(x (B, C, S, S), y (B, S, S)), or None for a process's empty share of a small last batch."""
    if not items:
        return None
    return torch.stack([s[0] for s in items]), torch.stack([s[1] for s in items])


def _segmenter_step(ctx: Context, shape: tuple[int, int, int]):
    """The loss of a process's share: its mean cross-entropy over its non-ignored pixels, weighted by its share
    of the global batch's non-ignored pixels, so that the summed gradients are those of the global batch's
    mean (one process: exactly `segmentation_loss`)."""

    def step(model, batch, epoch):
        dev = ctx.device
        if batch is None:  # no rows here: the model still runs, for the batch norms' collectives
            x, y = torch.zeros((0,) + shape, device=dev), torch.zeros((0,) + shape[1:], dtype=torch.long, device=dev)
        else:
            x, y = batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)
        loss = segmentation_loss(model(x), y)
        if not ctx.distributed:
            return loss, {"total": float(loss.detach())}
        valid = (y != IGNORE_INDEX).sum().float().reshape(1)
        everywhere = all_reduce_sum(valid.clone())
        loss = loss * (valid / everywhere.clamp(min=1.0))[0]
        return loss, {"total": float(all_reduce_sum(loss.detach().reshape(1).clone()))}

    return step


def fit_segmenter(seg_cfg: SegmenterConfig, pairs: list, sample: Callable, *, epochs: int, batch_size: int,
                  lr: float, weight_decay: float, seed: int, rng: random.Random, progress: bool = True,
                  desc: str = "train segmenter", init: ClassAgnosticSegmenter | None = None,
                  ctx: Context | None = None, workers: int = 0, amp: str = "auto", checkpoint: str | None = None,
                  checkpoint_every: int = 20, resume: bool = False
                  ) -> tuple[ClassAgnosticSegmenter, list[float], float]:
    """Train a fresh segmenter (packaged ImageNet backbone, new parts seeded by `seed`), or go on training
    `init` (a trained one, fine-tuned in place; its config, not `seg_cfg`, decides what trains).

    The batches and flips come from `segmenter_plan(len(pairs), epochs, batch_size, rng)`; `sample(pair, flip)`
    returns (input, target) for one pair. AdamW on the trainable parameters, one-cycle learning rate (10%
    warm-up). It runs on `ovseg.train.scale.loop`: on `ctx`'s device (default: one CPU process), under torchrun
    each process takes every world-th pair of each batch (batch norms see the global batch, see
    `ovseg.train.scale.dist.DistBatchNorm2d`), `workers` DataLoader processes make the samples, `amp` as in
    LoopConfig, and with `checkpoint` the training state is written every `checkpoint_every` steps and
    `resume` goes on from it. torch's global RNG (new layers' initial weights, dropout) is seeded with `seed` first.

    Returns:
        (model in eval mode, the global batch loss per step, training seconds).
    """
    ctx = ctx or Context()
    # The new layers' initial weights and the model's draws (dropout) come from `seed`, whatever the caller
    # drew before (saliency maps computed or read from the cache, say): a run is reproducible from its seed.
    torch.manual_seed(seed)
    model = init if init is not None else ClassAgnosticSegmenter.from_package(
        seg_cfg, torch.Generator().manual_seed(seed))
    model.to(ctx.device)
    if ctx.distributed:
        dist.sync_batchnorm(model)
    plan = segmenter_plan(len(pairs), epochs, batch_size, rng)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(plan[0]), pct_start=0.1)
    # An empty share of a small batch still runs the model (for the collectives): it needs the input's shape.
    shape = tuple(sample(pairs[0], False)[0].shape) if ctx.distributed else None
    loop = LoopConfig(epochs=epochs, batch_size=batch_size, seed=seed, workers=workers, amp=amp,
                      checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume, desc=desc,
                      progress=progress and ctx.main)
    record = fit(model, opt, sched, _PairSource(pairs, sample), _segmenter_step(ctx, shape), loop, ctx,
                 collate=_collate, plan=lambda epoch: plan[epoch])
    return model, record["step_totals"], record["seconds"]


def loss_summary(losses: list[float]) -> dict:
    """first/last 20 steps' mean, step count and the curve every 10 steps, for training.json."""
    return {"first_20": float(np.mean(losses[:20])), "last_20": float(np.mean(losses[-20:])),
            "steps": len(losses), "curve_every_10": [round(float(np.mean(losses[i:i + 10])), 4)
                                                     for i in range(0, len(losses), 10)]}
