"""The resumable training loop: epochs over a map-style source, shuffled by a DistributedSampler, decoded in
DataLoader workers, with mixed precision on GPUs and a checkpoint of everything a run needs to go on.

Identical results whatever the process count or interruption:
- The sampler's permutation depends only on (seed, epoch), so the global batch k of an epoch is the same set
  of items for 1 process with batch B and for N processes with batch B / N each (rank r takes every N-th item).
  A last incomplete global batch is dropped.
- Every random choice a sample makes (flip, caption, partner, noise) comes from `item_seed(seed, epoch,
  index)`, not from a process's RNG stream, so it does not depend on which process or worker draws it.
- The step function returns a loss normalised by the global batch and gradients are summed over processes
  (`ovseg.train.scale.dist`).
- The training state (model, optimiser, scheduler, GradScaler, extra modules such as an EMA model, the epoch
  and step within it, the running loss sums, the RNG states) is written atomically every `checkpoint_every`
  steps by rank 0; `resume` starts from it at the next step of the same sampler order.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ovseg.core.cache import atomic_write_bytes
from ovseg.train.scale import dist
from ovseg.train.scale.dist import Context

log = logging.getLogger(__name__)

AMP_CHOICES = ("auto", "on", "off")


@dataclass
class LoopConfig:
    epochs: int
    batch_size: int  # global: the processes share it (batch_size / world each)
    seed: int = 0
    workers: int = 0  # DataLoader worker processes per training process
    amp: str = "auto"  # "auto": float16 autocast + GradScaler on CUDA, off on CPU; "on" on CPU: bfloat16
    checkpoint: str | None = None  # the training-state file (None: no checkpoints)
    checkpoint_every: int = 20  # steps
    resume: bool = False
    clip_grad: float | None = None
    desc: str = "train"
    progress: bool = True

    def __post_init__(self):
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch size and epochs must be >= 1, got {self.batch_size} and {self.epochs}")


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of every random choice item `index` makes in `epoch`: the same in any process or worker."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest(), "little")


def item_rng(seed: int, epoch: int, index: int) -> tuple[random.Random, torch.Generator]:
    s = item_seed(seed, epoch, index)
    return random.Random(s), torch.Generator().manual_seed(s & (2**63 - 1))


class _EpochView(Dataset):
    """source.item(key, epoch) as a map-style dataset of one epoch (key: an index, or whatever a plan's
    batches hold)."""

    def __init__(self, source, epoch: int):
        self.source, self.epoch = source, epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        return self.source.item(key, self.epoch)


def global_batches(n: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """The global batches of an epoch: DistributedSampler's (seed, epoch) permutation of range(n) cut into
    batches of `batch_size`, an incomplete last batch dropped."""
    sampler = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[b : b + batch_size] for b in range(0, (n // batch_size) * batch_size, batch_size)]


def shuffled_batches(n: int, epochs: int, batch_size: int, seed: int) -> list[list[list[int]]]:
    """Every epoch's batches of item indices, as the small trainers have always drawn them: a shuffle per epoch
    from random.Random(seed), batches of `batch_size`, the last one smaller (kept). Every process draws the same
    plan from the same seed."""
    rng = random.Random(seed)
    plan = []
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        plan.append([order[b : b + batch_size] for b in range(0, n, batch_size)])
    return plan


def local_share(batch: list, ctx: Context) -> list:
    """This process's items of a global batch: every world-th one from its rank on. That is what a
    DistributedSampler gives rank r, so the default plan is the sampler's order split the usual way."""
    return list(batch[ctx.rank :: ctx.world])


def epoch_indices(n: int, batch_size: int, epoch: int, ctx: Context, seed: int) -> list[int]:
    """This process's items of an epoch, in order: its share of each global batch, incomplete batch dropped."""
    return [i for batch in global_batches(n, batch_size, epoch, seed) for i in local_share(batch, ctx)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    if n < batch_size:
        raise ValueError(f"the training set has {n} items, fewer than one batch of {batch_size}: lower the "
                         "batch size or add data")
    return n // batch_size


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: str | Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | Path, device: torch.device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # an unreadable file is a user-facing error, not a traceback deep in torch
        raise ValueError(f"cannot resume from {path}: the training state is unreadable ({exc})") from None


def fit(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, source, step: Callable, cfg: LoopConfig,
        ctx: Context, *, collate: Callable, after_step: Callable | None = None,
        extra: dict[str, torch.nn.Module] | None = None,
        plan: Callable[[int], list[list]] | None = None) -> dict:
    """Train `model` for cfg.epochs over `source` (len(source) items; `source.item(index, epoch)` decodes one).

    `plan(epoch)`: the epoch's global batches, each a list of keys for `source.item` (the same list in every
    process; epochs may differ in their number of batches); batches may differ in size, and a process may get
    an empty share of a small one (its `collate` then sees an empty list, and its `step` must still run the
    model, for the collectives). Default: `global_batches` (the sampler's order, cfg.batch_size items each).

    `step(model, batch, epoch)` -> (loss, logs): the loss to back-propagate, normalised by the global batch, and
    a dict of float values to record (the same on every process: global, not local, figures).
    `after_step()` runs after each optimiser step (an EMA update). `extra`: modules saved and restored with the
    model (an EMA model).

    Returns {"epochs": [per epoch: the mean of each logged value], "steps", "seconds" (training, over every
    run that led here), "items_per_s" (items over those seconds, all processes together),
    "items_per_s_this_run" (this run's items over its wall time, checkpoints included), "resumed_from_step",
    "processes", "device", "amp", "step_totals" (each step's logged "total", or its loss)}.
    """
    from tqdm import tqdm

    if plan is None and cfg.batch_size % ctx.world:
        raise ValueError(f"the global batch size {cfg.batch_size} does not divide among {ctx.world} processes")
    if plan is None:
        counts = [steps_per_epoch(len(source), cfg.batch_size)] * cfg.epochs
        plan = lambda epoch: global_batches(len(source), cfg.batch_size, epoch, cfg.seed)  # noqa: E731
    else:
        counts = [len(plan(epoch)) for epoch in range(cfg.epochs)]
        if min(counts) == 0:
            raise ValueError(f"the training plan has no batch in epoch {counts.index(0) + 1}")
    total = sum(counts)
    # what a resumed run must match: the batches per epoch (one number when every epoch has as many)
    per_epoch = counts[0] if len(set(counts)) == 1 else tuple(counts)
    cuda = ctx.device.type == "cuda"
    amp = cfg.amp == "on" or (cfg.amp == "auto" and cuda)
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and cuda)
    extra = extra or {}
    params = [p for p in model.parameters() if p.requires_grad]
    dist.broadcast_state(model)
    dist.broadcast_rng()
    for module in extra.values():
        dist.broadcast_state(module)

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "records": [], "sums": {}, "seconds": 0.0,
             "step_totals": [], "items": 0}
    resumed_from = None
    if cfg.resume and cfg.checkpoint and Path(cfg.checkpoint).is_file():
        saved = load_state(cfg.checkpoint, ctx.device)
        if saved.get("world_batch") != (cfg.batch_size, per_epoch):
            raise ValueError(f"cannot resume from {cfg.checkpoint}: it was written with batch size / steps per epoch "
                             f"{saved.get('world_batch')}, this run has {(cfg.batch_size, per_epoch)}")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if sched is not None:
            sched.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        for name, module in extra.items():
            module.load_state_dict(saved["extra"][name])
        _set_rng_state(saved["rng"])
        state = saved["loop"]
        state.setdefault("step_totals", [])  # a state written before these were recorded
        state.setdefault("items", state["global_step"] * cfg.batch_size)
        resumed_from = state["global_step"]
        if ctx.main:
            log.info("resuming %s at step %d of %d", cfg.desc, resumed_from, total)

    def checkpoint():
        if cfg.checkpoint and ctx.main:
            save_state(cfg.checkpoint, {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None, "scaler": scaler.state_dict(),
                "extra": {n: m.state_dict() for n, m in extra.items()}, "rng": _rng_state(), "loop": state,
                "world_batch": (cfg.batch_size, per_epoch)})
        dist.barrier()

    bar = tqdm(total=total, initial=state["global_step"], desc=cfg.desc, unit="step",
               disable=not (cfg.progress and ctx.main), dynamic_ncols=True)
    t0 = run_t0 = time.perf_counter()
    images = 0
    model.train()
    for epoch in range(state["epoch"], cfg.epochs):
        batches = plan(epoch)
        if len(batches) != counts[epoch]:
            raise ValueError(f"the training plan has {len(batches)} batches in epoch {epoch + 1}, it had "
                             f"{counts[epoch]} when the run started")
        todo = batches[state["step_in_epoch"]:]
        # Its own generator: a DataLoader otherwise draws its workers' base seed from torch's global RNG,
        # which would shift the model's own draws (dropout) and differ between a run and its resumption.
        loader = DataLoader(_EpochView(source, epoch), batch_sampler=[local_share(b, ctx) for b in todo],
                            num_workers=cfg.workers, collate_fn=collate, pin_memory=cuda,
                            generator=torch.Generator().manual_seed(item_seed(cfg.seed, epoch, -1) & (2**63 - 1)))
        for batch, global_batch in zip(loader, todo):
            with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp):
                loss, logs = step(model, batch, epoch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            dist.sum_gradients(params)
            scaler.unscale_(opt)
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
            if sched is not None:
                sched.step()
            if after_step is not None:
                after_step()
            for k, v in logs.items():
                state["sums"][k] = state["sums"].get(k, 0.0) + float(v)
            state["step_totals"].append(float(logs.get("total", loss.detach())))
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            state["items"] += len(global_batch)
            images += len(global_batch)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{state['step_totals'][-1]:.3f}")
            if state["step_in_epoch"] < counts[epoch] and cfg.checkpoint_every and \
                    state["global_step"] % cfg.checkpoint_every == 0:
                state["seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                checkpoint()
        state["records"].append({"epoch": epoch + 1, **{k: round(v / counts[epoch], 4) for k, v in state["sums"].items()}})
        state.update(epoch=epoch + 1, step_in_epoch=0, sums={})
        state["seconds"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        checkpoint()
    bar.close()
    model.eval()
    run_s = time.perf_counter() - run_t0
    seconds = state["seconds"]
    items = state["items"]
    return {"epochs": state["records"], "steps": state["global_step"], "seconds": round(state["seconds"], 1),
            "items_per_s": round(items / seconds, 2) if seconds else None,
            "items_per_s_this_run": round(images / run_s, 2) if images else None,
            "resumed_from_step": resumed_from, "processes": ctx.world, "device": str(ctx.device), "amp": amp,
            "step_totals": state["step_totals"]}
