"""The shared models of the engine, loaded lazily once and reused by every method."""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ovseg.core.cache import atomic_write_bytes, cache_dir
from ovseg.core.device import resolve_device
from ovseg.core.models.imagenet import imagenet_classes

log = logging.getLogger(__name__)


class Models:
    """Backbone, text encoder, lexicon and derived tables on one device.

    Args:
        device: "cpu" (default), "cuda" or "auto".
        text_encoder_path: a local Hugging Face folder to use instead of the packaged MiniLM.
    """

    def __init__(self, device: str | torch.device = "cpu", text_encoder_path: str | Path | None = None):
        self.device = resolve_device(device)
        self.text_encoder_path = text_encoder_path
        self._lock = threading.RLock()
        self._word_cache: dict[str, torch.Tensor] = {}
        self._derived: dict[str, object] = {}

    @cached_property
    def backbone(self):
        from ovseg.core.models.backbone import Backbone

        with self._lock:
            return Backbone().to(self.device)

    def shared(self, key: str, build):
        """A model a method derives from the shared ones (e.g. cls_saliency's guided-backprop copy of the
        classifier), built once by `build()` and kept with them, so every instance of the method shares it."""
        with self._lock:
            if key not in self._derived:
                self._derived[key] = build()
            return self._derived[key]

    @cached_property
    def text_encoder(self):
        from ovseg.core.models.text_encoder import TextEncoder

        with self._lock:
            return TextEncoder(self.text_encoder_path, device=self.device)

    @cached_property
    def lexicon(self):
        from ovseg.core.models.lexicon import Lexicon

        return Lexicon()

    def load(self) -> float:
        """Load every shared model now (otherwise the first word pays for it); returns the seconds taken."""
        t0 = time.perf_counter()
        self.lexicon.load()
        self.backbone, self.class_name_embeddings  # noqa: B018 (cached on first access)
        return time.perf_counter() - t0

    def embed_words(self, words: list[str]) -> torch.Tensor:
        """(N, D) unit-norm text embeddings of words, memoised per word."""
        missing = [w for w in dict.fromkeys(words) if w not in self._word_cache]
        if missing:
            for w, e in zip(missing, self.text_encoder.embed(missing)):
                self._word_cache[w] = e
        return torch.stack([self._word_cache[w] for w in words])

    def class_similarity(self, word: str) -> torch.Tensor:
        """(1000,) cosine similarity of a word to each ImageNet class name in the text encoder's space."""
        return self.class_name_embeddings @ self.embed_words([word])[0]

    @cached_property
    def class_name_embeddings(self) -> torch.Tensor:
        """(1000, D) unit-norm embeddings of the ImageNet class names, cached on disk per text encoder."""
        texts = [", ".join(c.names) for c in imagenet_classes()]
        enc = self.text_encoder
        key = hashlib.sha1(("\n".join(texts) + str(enc.path.resolve()) + str(enc.dim)).encode()).hexdigest()[:16]
        path = cache_dir() / "text" / f"imagenet_names_{key}.npy"
        if path.is_file():
            try:
                arr = np.load(path)
                if arr.shape == (1000, enc.dim):
                    return torch.from_numpy(arr).to(self.device)
            except (OSError, ValueError):
                log.warning("ignoring an unreadable cache file %s", path)
        emb = enc.embed(texts)
        buf = io.BytesIO()
        np.save(buf, emb.cpu().numpy().astype(np.float32))
        atomic_write_bytes(path, buf.getvalue())
        return emb
