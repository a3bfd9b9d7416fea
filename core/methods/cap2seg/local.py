"""Cap2Seg's local pixel-level branch and semi-global fusion (seed 000, sec. 3.4-3.5).

The local model M reads no pixel of the image: from a source pixel s of a known class c_s it predicts whether a
target pixel t belongs to a class u, P(c_t = u | x, c_s) = sigmoid(M(pos(s), pos(t), w_{c_s}, w_u)) (eq. 7), with
pos() the coordinates scaled to [0, 1] and w the packaged MiniLM's word vectors (the paper's word2vec). M is an
MLP over the stacked input vector; its first linear layer is computed as the sum of its slices (source, target,
class), which is the same function at a fraction of the cost. Eq. 8 averages the sources:
P(c_t = u | x) = mean_s sigmoid(M(...)) over n_sub sampled known-class pixels (20, the paper's value, in
training; every known cell at inference, which is eq. 8 without the sub-sampling).

Pixels live on a GRID x GRID lattice over the image (10 x 10: two rows per stripe for K = 5; M is evaluated
for every source and cell, so the lattice sets the cost): a cell's class is
the known class covering at least half of it, else none.

Training (eq. 9): a known class u' plays the unknown one; sources are cells of the other known classes; the
targets are the labelled cells, positive where their class is u'. Eq. 10 sums P over each horizontal stripe
into Y_hat. Departure: eq. 10 prints a softmax over those sums, which on a 10-cell-wide stripe (sums up to 20) is
all but one-hot whatever M says; the sums are divided by their total instead, the form of eq. 4's ground truth.
The consistency loss (eq. 11) is the L2 distance between Y_hat and the entailment model's V_hat over known
classes, and at inference the semi-global prior is V* = (Y_hat + V_hat) / 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ovseg.core.errors import OvsegError

GRID = 10
N_SUB = 20
WEIGHTS_FILE = "local.pt"


@dataclass
class LocalConfig:
    word_dim: int = 384
    hidden: int = 128
    grid: int = GRID
    n_sub: int = N_SUB


def grid_positions(grid: int = GRID) -> torch.Tensor:
    """(grid*grid, 2) the (row, column) centres of the lattice's cells in [0, 1], row-major."""
    c = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    rows, cols = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


def grid_labels(masks: dict[int, np.ndarray], grid: int = GRID) -> np.ndarray:
    """Known-class masks -> (grid, grid) int16 cell labels: the class index covering at least half of a cell
    (the largest share wins), -1 where none does.

    Args:
        masks: class index -> HxW mask (bool, or a float share in [0, 1]).
    """
    import cv2

    labels = np.full((grid, grid), -1, np.int16)
    best = np.full((grid, grid), 0.5, np.float32)
    for index, mask in masks.items():
        share = cv2.resize(np.asarray(mask, np.float32), (grid, grid), interpolation=cv2.INTER_AREA)
        better = share >= best
        labels[better] = index
        best = np.maximum(best, np.where(better, share, 0))
    return labels


def stripe_shares(prob: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 10 (normalised, module docstring): (..., grid*grid) row-major cell probabilities -> (..., k) the share
    of their sum in each of k horizontal stripes (rows split as eq. 4 splits them)."""
    grid = int(round(prob.shape[-1] ** 0.5))
    rows = prob.reshape(*prob.shape[:-1], grid, grid).sum(-1)
    edges = [(j * grid) // k for j in range(k + 1)]
    sums = torch.stack([rows[..., edges[j]:edges[j + 1]].sum(-1) for j in range(k)], dim=-1)
    return sums / sums.sum(-1, keepdim=True).clamp_min(1e-8)


def consistency_loss(y_hat: torch.Tensor, v_hat: torch.Tensor) -> torch.Tensor:
    """Eq. 11 averaged over pairs: ||Y_hat - V_hat||_2 for (N, K) distributions (zero, attached, for N = 0)."""
    if y_hat.shape != v_hat.shape:
        raise OvsegError(f"stripe distributions {tuple(y_hat.shape)} and {tuple(v_hat.shape)} differ")
    if y_hat.shape[0] == 0:
        return (y_hat.sum() + v_hat.sum()) * 0.0
    return (y_hat - v_hat).norm(dim=-1).mean()


def local_loss(prob: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Eq. 9 averaged over the counted cells: binary cross-entropy of P(c_t = u' | x) (eq. 8) against
    I(c_t = u'). prob, labels, weight: (N, T); weight is 1 on the target cells that count (labelled ones)."""
    p = prob.clamp(1e-6, 1 - 1e-6)
    bce = -(labels * p.log() + (1 - labels) * (1 - p).log())
    return (bce * weight).sum() / weight.sum().clamp_min(1.0)


class LocalInference(nn.Module):
    """M of eq. 7: an MLP over [pos(s), pos(t), w_{c_s}, w_u]."""

    def __init__(self, config: LocalConfig | None = None):
        super().__init__()
        self.config = config or LocalConfig()
        d, h = self.config.word_dim, self.config.hidden
        self.first = nn.Linear(4 + 2 * d, h)  # the stacked input vector's first layer
        self.rest = nn.Sequential(nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
        self.register_buffer("positions", grid_positions(self.config.grid), persistent=False)

    def _slices(self):
        d = self.config.word_dim
        w = self.first.weight
        return w[:, 0:2], w[:, 2:4], w[:, 4:4 + d], w[:, 4 + d:]

    def forward(self, src_pos: torch.Tensor, src_vec: torch.Tensor, src_valid: torch.Tensor,
                word: torch.Tensor) -> torch.Tensor:
        """Eq. 8 over the lattice.

        Args:
            src_pos: (B, S, 2) source positions in [0, 1]; src_vec: (B, S, D) their classes' word vectors;
            src_valid: (B, S) bool, the sources that exist (a pair may have fewer than S);
            word: (B, D) the vector of the class u asked about.

        Returns:
            (B, T) P(c_t = u | x) on the T = grid*grid cells (0 where a row has no valid source).
        """
        a_s, a_t, a_c, a_u = self._slices()
        src = src_pos @ a_s.T + src_vec @ a_c.T  # (B, S, H)
        tgt = self.positions.to(src.dtype) @ a_t.T  # (T, H)
        cls = word @ a_u.T + self.first.bias  # (B, H)
        h = src[:, :, None, :] + tgt[None, None] + cls[:, None, None, :]  # (B, S, T, H)
        p = torch.sigmoid(self.rest(h).squeeze(-1))  # (B, S, T)
        valid = src_valid.to(p.dtype)[:, :, None]
        return (p * valid).sum(1) / valid.sum(1).clamp_min(1.0)

    # ------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, labels: np.ndarray, known_vectors: torch.Tensor, word_vector: torch.Tensor,
                max_sources: int | None = None, seed: int = 0) -> np.ndarray | None:
        """The local prior of one class on one image: (grid, grid) P(c_t = u | x), or None when the image has
        no known-class cell to start from.

        Args:
            labels: (grid, grid) cell labels (`grid_labels`), indices into known_vectors or -1.
            known_vectors: (C, D) the known classes' word vectors. word_vector: (D,) the class asked about.
            max_sources: sub-sample this many known cells (seeded); None uses every known cell.
        """
        g = self.config.grid
        if labels.shape != (g, g):
            raise OvsegError(f"local cell labels must be {g}x{g}, got {labels.shape}")
        cells = np.flatnonzero(labels.reshape(-1) >= 0)
        if len(cells) == 0:
            return None
        if max_sources is not None and len(cells) > max_sources:
            cells = np.random.default_rng(seed).choice(cells, max_sources, replace=False)
        dev = self.first.weight.device
        pos = self.positions[torch.as_tensor(cells, device=self.positions.device)].to(dev)
        vec = known_vectors.to(dev).float()[torch.as_tensor(labels.reshape(-1)[cells].astype(np.int64), device=dev)]
        prob = self(pos[None], vec[None], torch.ones(1, len(cells), dtype=torch.bool, device=dev),
                    word_vector.to(dev).float()[None])
        return prob[0].reshape(g, g).cpu().numpy()

    # ----------------------------------------------------------------------------------------- checkpoint
    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        from ovseg.core.methods.cap2seg.weights import save_half

        return save_half(self, Path(folder) / WEIGHTS_FILE, extra)

    @classmethod
    def load(cls, folder: str | Path, device="cpu") -> "LocalInference":
        from ovseg.core.methods.cap2seg.weights import load_half

        return load_half(cls, LocalConfig, Path(folder) / WEIGHTS_FILE, "cap2seg local branch", device)[0]


def sample_sources(labels: np.ndarray, exclude: int, n_sub: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """n_sub known cells (with replacement when fewer) whose class is not `exclude`: (cell indices (n,),
    their class indices (n,)); empty arrays when there is none."""
    flat = labels.reshape(-1)
    cells = np.flatnonzero((flat >= 0) & (flat != exclude))
    if len(cells) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pick = rng.choice(cells, n_sub, replace=len(cells) < n_sub)
    return pick, flat[pick].astype(np.int64)


def fuse(y_hat: np.ndarray | None, v_hat: np.ndarray) -> np.ndarray:
    """Sec. 3.5: V* = (Y_hat + V_hat) / 2; V_hat alone when the local branch had no source."""
    return np.asarray(v_hat, np.float64) if y_hat is None else (np.asarray(y_hat) + np.asarray(v_hat)) / 2.0
