"""An optional on-disk cache of what frozen models compute per sample (backbone patch features, text states),
so that epochs after the first read instead of recompute, and nothing is held in memory. An entry's key
includes the fingerprint of the model that computed it (`module_fingerprint`) and of its input (the image's
bytes, the text), so a changed backbone, text encoder or image never reads a stale entry."""

from __future__ import annotations

import hashlib
import io
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ovseg.core.cache import atomic_write_bytes

log = logging.getLogger(__name__)

_FINGERPRINTS: dict[int, str] = {}


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha1 of a module's parameter and buffer values (memoised per module object)."""
    if id(module) not in _FINGERPRINTS:
        h = hashlib.sha1()
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            if t.numel():
                h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        _FINGERPRINTS[id(module)] = h.hexdigest()[:16]
    return _FINGERPRINTS[id(module)]


class FeatureCache:
    """Arrays under `root/<tag>/`, one .npz per key (written atomically); root None: nothing cached."""

    def __init__(self, root: str | Path | None, tag: str):
        self.root = Path(root) / tag if root is not None else None

    def get(self, parts: tuple, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if self.root is None:
            return compute()
        key = hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()
        path = self.root / key[:2] / f"{key}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    return {k: z[k] for k in z.files}
            except (OSError, ValueError, EOFError):
                log.warning("recomputing an unreadable cache entry %s", path)
        arrays = compute()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
        return arrays


def nbytes(value) -> int:
    """The bytes of a tensor or array, or of those inside nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


class MemoryCache:
    """A bounded in-memory layer (least recently used out first) over what a store reads per sample: a small
    dataset stays in memory, a large one streams. Pickled empty (a DataLoader worker starts with its own)."""

    def __init__(self, budget_mb: int):
        self.budget = budget_mb * 2**20
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0

    def __getstate__(self):
        return {"budget": self.budget, "_items": OrderedDict(), "_bytes": 0}

    def get(self, key, compute: Callable):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = compute()
        size = nbytes(value)
        if size <= self.budget:
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.budget:
                _, old = self._items.popitem(last=False)
                self._bytes -= nbytes(old)
        return value
