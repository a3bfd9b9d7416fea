"""The command-line flags every scalable trainer shares (`ovseg train NAME --device ... --resume`)."""

from __future__ import annotations

import argparse

from ovseg.train.scale import dist


def add_scale_arguments(p: argparse.ArgumentParser, d, features: bool = False) -> None:
    """Device, mixed precision, DataLoader workers, checkpoints and resuming; `features`: also the frozen-feature
    caches (`--no-feature-cache`, `--memory-cache-mb`). `d`: the trainer's config defaults."""
    p.add_argument("--device", default=d.device, choices=dist.DEVICE_CHOICES,
                   help="auto: CUDA when visible, else CPU; under torchrun each process takes its local rank's GPU")
    p.add_argument("--amp", default=d.amp, choices=("auto", "on", "off"),
                   help="mixed precision: auto = float16 + GradScaler on CUDA, off on CPU")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes per training process")
    if features:
        p.add_argument("--no-feature-cache", action="store_true",
                       help="recompute frozen-model features every epoch instead of caching them on disk")
        p.add_argument("--memory-cache-mb", type=int, default=d.memory_cache_mb,
                       help=f"features each process keeps in memory over the disk cache (default {d.memory_cache_mb})")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"write the training state every N steps (default {d.checkpoint_every}) to <out>.resume/")
    p.add_argument("--resume", action="store_true", help="go on from <out>.resume/ after an interrupted run")
