"""Device choice in one place. The library defaults to the CPU; "auto" takes CUDA when there is one."""

from __future__ import annotations

import torch

from ovseg.core.errors import OvsegError


def resolve_device(device: str | torch.device | None = "cpu") -> torch.device:
    """'cpu', 'cuda', 'cuda:1', 'auto' or a torch.device -> torch.device, with a clear error if unusable."""
    if isinstance(device, torch.device):
        return device
    name = (device or "cpu").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OvsegError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use 'cpu' or 'auto'")
    try:
        return torch.device(name)
    except RuntimeError:
        raise OvsegError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'auto'") from None
