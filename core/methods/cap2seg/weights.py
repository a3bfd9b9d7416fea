"""One file format for Cap2Seg's small networks: half-precision weights, their config and extra facts,
written atomically; read back with a clear error for a missing or broken file."""

from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path

import torch

from ovseg.core.errors import ModelError


def save_half(module: torch.nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """module.state_dict() in float16 with asdict(module.config) and `extra`, into `path` atomically."""
    from ovseg.core.cache import atomic_write_bytes

    buf = io.BytesIO()
    state = {k: v.detach().to("cpu", torch.float16) for k, v in module.state_dict().items()}
    torch.save({"config": asdict(module.config), "state": state, "extra": extra or {}}, buf)
    return atomic_write_bytes(Path(path), buf.getvalue())


def load_half(cls, config_cls, path: str | Path, what: str, device="cpu"):
    """cls(config_cls(**config)) with the saved weights, on `device`, in eval mode -> (module, extra).
    `what` names the network in errors ("cap2seg local branch")."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no {what} (run `ovseg train cap2seg`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        module = cls(config_cls(**blob["config"]))
        module.load_state_dict({k: v.float() for k, v in blob["state"].items()})
    except Exception as exc:  # torch raises many types for a broken file
        raise ModelError(f"{path}: unreadable {what} ({exc})") from None
    return module.to(device).eval(), blob.get("extra", {})
