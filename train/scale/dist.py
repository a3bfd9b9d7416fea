"""One process, one GPU, or N processes under `torchrun --nproc_per_node=N`: the same training code runs in
each. `setup` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the process group, NCCL
on GPUs and gloo on CPU; without it the run is a single process and every collective below is a no-op.

Gradients are summed across processes (`sum_gradients`), not averaged: each process's loss is already
normalised by the *global* batch (see `ovseg.train.scale.loop`), so the summed gradient is the gradient of a
single process's loss on the whole batch, and N processes with global batch B train the same weights as one
process with batch B (up to float rounding).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among `world` processes and the device it trains on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, draws progress bars and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" (CUDA when visible, else CPU), "cpu" or "cuda", as `ovseg.core.device.resolve_device` resolves
    them (with its error for a CUDA that is not there); a torchrun process takes the GPU of its local rank."""
    from ovseg.core.device import resolve_device as resolve

    if name not in DEVICE_CHOICES:
        raise ValueError(f"--device must be one of {DEVICE_CHOICES}, got {name!r}")
    dev = resolve(name)
    return torch.device("cuda", local_rank % torch.cuda.device_count()) if dev.type == "cuda" else dev


def setup(device: str = "auto") -> Context:
    """The process's Context; under torchrun (WORLD_SIZE > 1) it joins the default process group first."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Context(rank, world, local_rank, dev)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over every process, in place (no gradient); t itself with one process."""
    if _active():
        dist.all_reduce(t)
    return t


def sum_gradients(parameters) -> None:
    """Sum every parameter's gradient over the processes (flattened into one buffer per dtype)."""
    if not _active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        offset = 0
        for g in group:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_state(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers to every process (the same start, whatever each seeded)."""
    if not _active():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def barrier() -> None:
    if _active():
        dist.barrier()


def gather_objects(obj) -> list:
    """Every process's picklable `obj`, in rank order ([obj] with one process). CPU tensors only inside."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _GatherRows(torch.autograd.Function):
    """all_gather forward; backward: each process's rows get the sum over processes of their gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), len(t)
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's rows of t (n_r, ...) stacked in rank order, with the gradient flowing back to each
    process's own rows (the backward pass sums what every process computed on them). Processes may hold
    different row counts: rows are padded to the largest and the returned bool mask (sum n_r,) marks the real
    ones. One process: (t, all True)."""
    if not _active():
        return t, torch.ones(len(t), dtype=torch.bool, device=t.device)
    n = torch.tensor([len(t)], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.cat([t, t.new_zeros((most - len(t),) + tuple(t.shape[1:]))]) if len(t) < most else t
    rows = _GatherRows.apply(padded)
    valid = torch.cat([torch.arange(most, device=t.device) < s for s in sizes])
    return rows, valid


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(sum) forward; backward: the gradient of a sum over processes with respect to this process's
    term is the sum of every process's upstream gradient."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous().clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def differentiable_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over the processes, with the gradient flowing back to every process's term; t with one."""
    return _AllReduceSum.apply(t) if _active() else t


class DistBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch: every process's sums are
    all-reduced (with gradients), so N processes normalise exactly as one process holding the whole batch
    would. torch's SyncBatchNorm needs CUDA tensors; this runs on gloo (CPU) and NCCL alike. A process may
    hold no rows of a small batch. Outside training, or with one process, it is plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _active()):
            return super().forward(x)
        dims, dtype = (0, 2, 3), x.dtype
        x = x.float()  # statistics in float32, also under autocast
        count = all_reduce_sum(x.new_tensor([x.numel() / x.shape[1]]))
        if float(count) < 2:
            raise ValueError(f"batch norm needs at least 2 values per channel over all processes, got {int(count)}")
        mean = differentiable_sum(x.sum(dims)) / count
        centred = x - mean[None, :, None, None]
        var = differentiable_sum((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                n = float(count)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / (n - 1)), alpha=factor)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(dtype)


class DistDropout(torch.nn.Dropout):
    """Dropout whose mask is drawn for the global batch, as one process holding it would draw it, and cut to
    this process's rows (every world-th row from its rank on, `ovseg.train.scale.loop.local_share`). Every
    process must hold the same RNG state (`broadcast_rng`); each then draws the same global mask. Outside
    training, or with one process, it is plain Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _active()) or self.p == 0:
            return super().forward(x)
        if self.inplace:
            raise ValueError("DistDropout does not run in place")
        return global_dropout(x, self.p)


def global_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of this process's rows with the mask one process holding the global batch would
    draw (see DistDropout; the rows' other dimensions must agree over the processes); plain dropout with one
    process."""
    if not _active() or p == 0:
        return torch.nn.functional.dropout(x, p, training=True)
    rows = int(all_reduce_sum(torch.tensor([len(x)], device=x.device)).item())
    keep = torch.empty((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    mask = keep[dist.get_rank() :: dist.get_world_size()][: len(x)]
    return x * mask / (1 - p)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """t's element-wise maximum over every process, in place (no gradient); t itself with one process."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


GLOBAL_DROPOUT_ATTENTION = "ovseg_global_dropout"


def _global_dropout_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager scaled dot-product attention (transformers' BERT eager path) whose attention dropout is
    `global_dropout`: N processes draw the masks one process would on the global batch. Rows must be padded
    to the same length in every process."""
    weights = torch.matmul(query, key.transpose(2, 3)) * (query.size(-1) ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    if module.training and dropout > 0:
        weights = global_dropout(weights, dropout)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def sync_transformer(model: torch.nn.Module) -> str:
    """Make a transformers model's dropout draw global-batch masks (its Dropout modules as `sync_batchnorm`
    does, and its attention dropout through `_global_dropout_attention`). Returns the attention implementation
    it had, to restore after training (`model.config._attn_implementation = ...`)."""
    from transformers import AttentionInterface

    AttentionInterface.register(GLOBAL_DROPOUT_ATTENTION, _global_dropout_attention)  # idempotent
    before = model.config._attn_implementation
    model.config._attn_implementation = GLOBAL_DROPOUT_ATTENTION
    sync_batchnorm(model)
    return before


def sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Make every BatchNorm2d in `module` a DistBatchNorm2d and every Dropout a DistDropout, in place (same
    parameters, buffers and state dict; only training-mode statistics and masks change, and only with several
    processes), so that N processes train what one process would. Returns `module`."""
    for m in module.modules():
        if type(m) is torch.nn.BatchNorm2d:
            m.__class__ = DistBatchNorm2d
        elif type(m) is torch.nn.Dropout:
            m.__class__ = DistDropout
    return module


def broadcast_rng() -> None:
    """Rank 0's torch RNG states (CPU, and the current GPU's under NCCL) to every process, so that draws for
    the global batch agree."""
    if not _active():
        return
    nccl = dist.get_backend() == "nccl"
    states = [(torch.get_rng_state, torch.set_rng_state)]
    if nccl:
        states.append((torch.cuda.get_rng_state, torch.cuda.set_rng_state))
    for get, put in states:
        state = get()
        if nccl:  # NCCL carries GPU tensors only
            state = state.cuda()
        dist.broadcast(state, 0)
        put(state.cpu())
