"""The training loop every method shares for its class-agnostic segmenter (`ovseg.core.ops.segmenter`): Golub et
al.'s attention-channel segmenter (`ovseg train cls_saliency`) and Concept Mask's label-agnostic segmentation
network (`ovseg train concept_mask`). Only the prior channels differ, and the caller's `sample` makes them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.core.ops.segmenter import ClassAgnosticSegmenter, SegmenterConfig, segmentation_loss


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


def fit_segmenter(seg_cfg: SegmenterConfig, pairs: list, sample: Callable, *, epochs: int, batch_size: int,
                  lr: float, weight_decay: float, seed: int, rng: random.Random, progress: bool = True,
                  desc: str = "train segmenter", init: ClassAgnosticSegmenter | None = None
                  ) -> tuple[ClassAgnosticSegmenter, list[float], float]:
    """Train a fresh segmenter (packaged ImageNet backbone, new parts seeded by `seed`), or go on training
    `init` (a trained one, fine-tuned in place; its config, not `seg_cfg`, decides what trains).

    Each epoch shuffles `pairs` with `rng`; `sample(pair, flip)` returns (input, target) for one pair, flip
    drawn from `rng` (p = 0.5); a last batch of a single pair is skipped (BatchNorm needs two). AdamW on the trainable parameters, one-cycle learning rate (10% warm-up).

    Returns:
        (model in train mode, loss per step, seconds).
    """
    from tqdm import tqdm

    model = init if init is not None else ClassAgnosticSegmenter.from_package(
        seg_cfg, torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=weight_decay)
    # BatchNorm in the ASPP pooling branch needs two samples: a last batch of one is left out of the epoch.
    per_epoch = len(pairs) // batch_size + (1 if len(pairs) % batch_size >= 2 else 0)
    if per_epoch == 0:
        raise ValueError(f"a segmenter needs at least 2 training pairs, got {len(pairs)}")
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses, t0 = [], time.perf_counter()
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress)
    model.train()
    for epoch in range(epochs):
        order = list(pairs)
        rng.shuffle(order)
        for b in range(0, per_epoch * batch_size, batch_size):
            batch = [sample(pair, rng.random() < 0.5) for pair in order[b : b + batch_size]]
            x = torch.stack([s[0] for s in batch])
            y = torch.stack([s[1] for s in batch])
            loss = segmentation_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    return model, losses, time.perf_counter() - t0


def loss_summary(losses: list[float]) -> dict:
    """first/last 20 steps' mean, step count and the curve every 10 steps, for training.json."""
    return {"first_20": float(np.mean(losses[:20])), "last_20": float(np.mean(losses[-20:])),
            "steps": len(losses), "curve_every_10": [round(float(np.mean(losses[i:i + 10])), 4)
                                                     for i in range(0, len(losses), 10)]}
