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


class FrozenFeatures:
    """What a frozen model computes per image of a dataset, read through the on-disk `FeatureCache` (under
    `<cache>/features/<tag>/`, keyed by the model's weights, the caller's parts and the image's bytes) and a
    bounded memory layer, so a small dataset stays in memory and a large one streams. The models load lazily in
    each process (DataLoader workers included: the store pickles without them)."""

    def __init__(self, dataset, tag: str, feature_cache: bool = True, memory_cache_mb: int = 2048, models=None):
        from ovseg.core.cache import cache_dir

        self.dataset = dataset
        self.cache = FeatureCache(cache_dir() / "features" if feature_cache else None, tag)
        self._models = models
        self._memory = MemoryCache(memory_cache_mb)

    def __getstate__(self):
        return {**self.__dict__, "_models": None}

    @property
    def models(self):
        if self._models is None:
            from ovseg.core.models import Models

            self._models = Models("cpu")
        return self._models

    def remember(self, key, compute: Callable):
        """compute(), kept in the memory layer under `key`."""
        return self._memory.get(key, compute)

    def cached(self, image_id: int, name: str, parts: tuple, compute: Callable[[], dict[str, np.ndarray]]
               ) -> dict[str, np.ndarray]:
        """compute()'s arrays for an image through the disk cache, keyed by (name, the backbone's weights,
        *parts, the image file's sha1)."""
        fingerprint = hashlib.sha1(self.dataset.image_path(image_id).read_bytes()).hexdigest()
        return self.cache.get((name, module_fingerprint(self.models.backbone), *parts, fingerprint), compute)


def pyramid_features(models, rgb: np.ndarray, long_side: int, flip: bool, hw: tuple[int, int] | None = None) -> dict:
    """The frozen backbone's c3, c4, c5 (float16, (1, C, h, w)) of the image resized to `hw` (default:
    `long_side` on its long side, multiples of 32), mirrored if `flip`."""
    from ovseg.core.models.backbone import input_size, preprocess

    hw = hw or input_size(rgb.shape[0], rgb.shape[1], long_side)
    x = preprocess(rgb, hw, models.device)
    if flip:
        x = x.flip(-1)
    with torch.no_grad():
        f = models.backbone(x)
    return {"c3": f.c3.half(), "c4": f.c4.half(), "c5": f.c5.half()}


class PyramidStore(FrozenFeatures):
    """image id, flip -> the backbone's c3, c4, c5 ((1, C, h, w) float16 on the CPU) at `long_side` (the
    image's stored size scaled, `input_hw`), as XPM's and Cap2Seg's networks read them: one cache serves both."""

    def __init__(self, dataset, long_side: int, feature_cache: bool = True, memory_cache_mb: int = 2048,
                 models=None):
        super().__init__(dataset, f"pyramid-{long_side}", feature_cache, memory_cache_mb, models)
        self.long_side = long_side

    def input_hw(self, image_id: int) -> tuple[int, int]:
        """The network input size: the image's stored size (instances.json) scaled to `long_side`."""
        from ovseg.core.models.backbone import input_size

        return input_size(*self.dataset.image_size(image_id), self.long_side)

    def features(self, image_id: int, flip: bool = False) -> dict[str, torch.Tensor]:
        def compute():
            rgb = self.dataset.load_rgb(image_id)
            f = pyramid_features(self.models, rgb, self.long_side, flip, self.input_hw(image_id))
            return {k: v.cpu().numpy() for k, v in f.items()}

        def cached():
            arrays = self.cached(image_id, "pyramid", (self.long_side, bool(flip)), compute)
            return {k: torch.from_numpy(v) for k, v in arrays.items()}

        return self.remember(("features", image_id, bool(flip)), cached)
