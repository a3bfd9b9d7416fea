"""Tag word vectors from point-wise mutual information (Concept Mask, ECCV 2018, supplementary 2.1) and the
idf-weighted soft topic embedding of an image's tags (sec. 4.1).

A corpus is a list of documents (an image's tags). p(w) is the fraction of documents that contain w and
p(wi, wj) the fraction that contain both; a tag repeated within a document counts once, tags outside the
vocabulary are ignored. M_ij = log(p(wi, wj) / (p(wi) p(wj))) and the word vectors are the rows of
W = U S^(1/2) from M = U S U^T, truncated to the first D columns. Words of a text encoder that are not tags
are mapped into this space by an affine map fitted on the shared words (`fit_linear_map`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ovseg.core.cache import atomic_write_bytes


def _doc_indices(docs: Iterable[Iterable[str]], vocab: list[str]) -> list[np.ndarray]:
    """Per document, the sorted unique vocabulary indices of its tags (tags outside `vocab` dropped)."""
    index = {w: i for i, w in enumerate(vocab)}
    return [np.array(sorted({index[t] for t in doc if t in index}), dtype=np.int64) for doc in docs]


def _occurrence(docs: Iterable[Iterable[str]], vocab: list[str]) -> tuple[np.ndarray, int]:
    """(V,) number of documents containing each word, and the number of documents."""
    rows = _doc_indices(docs, vocab)
    counts = np.zeros(len(vocab), dtype=np.float64)
    for idx in rows:
        counts[idx] += 1.0
    return counts, len(rows)


def pmi_matrix(docs: list[list[str]] | list[set[str]], vocab: list[str]) -> np.ndarray:
    """(V, V) float64 PMI matrix of the tags in `vocab` over the documents `docs`.

    Pairs that never co-occur get 0: log 0 is undefined and 0 reads as "no association". The diagonal
    follows the same formula, M_ii = -log p(w_i); a word that occurs in no document has a zero row and column.
    """
    rows = _doc_indices(docs, vocab)
    co = np.zeros((len(vocab), len(vocab)), dtype=np.float64)
    for idx in rows:
        co[np.ix_(idx, idx)] += 1.0
    if not rows:
        return co
    p_joint = co / len(rows)
    p = np.diag(p_joint).copy()
    m = np.zeros_like(p_joint)
    seen = p_joint > 0  # implies both words seen
    m[seen] = np.log(p_joint[seen] / np.outer(p, p)[seen])
    return m


def pmi_embedding(m: np.ndarray, dim: int) -> np.ndarray:
    """(V, dim) word vectors: the first `dim` columns of W = U S^(1/2), M = U S U^T (np.linalg.eigh),
    eigenvalues in descending order.

    A PMI matrix need not be positive semi-definite: kept negative eigenvalues are clamped to 0 before the
    square root (the paper's S^(1/2) assumes them non-negative). Each column's sign is chosen so that its
    entry of largest magnitude is positive (the first such entry on ties), which makes the result
    deterministic.
    """
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"M must be a square matrix, got shape {m.shape}")
    if not 1 <= dim <= m.shape[0]:
        raise ValueError(f"dim must be in [1, {m.shape[0]}], not {dim}")
    vals, vecs = np.linalg.eigh(m)
    order = np.argsort(vals)[::-1][:dim]
    vals, vecs = vals[order], vecs[:, order]
    peak = vecs[np.abs(vecs).argmax(axis=0), np.arange(dim)]
    vecs = vecs * np.where(peak < 0, -1.0, 1.0)
    return vecs * np.sqrt(np.clip(vals, 0.0, None))


def idf(docs: list[list[str]] | list[set[str]], vocab: list[str]) -> np.ndarray:
    """(V,) inverse document frequencies alpha_i = -log p(w_i); 0 for words that occur in no document."""
    counts, n = _occurrence(docs, vocab)
    out = np.zeros(len(vocab), dtype=np.float64)
    seen = counts > 0
    out[seen] = -np.log(counts[seen] / n)
    return out


def soft_topic(tags: Iterable[str], vocab_index: dict[str, int], vectors: np.ndarray,
               idf_weights: np.ndarray) -> np.ndarray:
    """Soft topic embedding t = sum_i alpha_i w_i (sec. 4.1) over the distinct tags in the vocabulary.

    Args:
        tags: an image's tags; those missing from `vocab_index` are ignored, a repeated tag counts once.
        vocab_index: word -> row of `vectors`.
        vectors: (V, D) word vectors.
        idf_weights: (V,) alpha_i.

    Returns:
        (D,) float64; zeros when no tag is in the vocabulary.
    """
    idx = np.array(sorted({vocab_index[t] for t in tags if t in vocab_index}), dtype=np.int64)
    vectors = np.asarray(vectors, dtype=np.float64)
    if len(idx) == 0:
        return np.zeros(vectors.shape[1], dtype=np.float64)
    return np.asarray(idf_weights, dtype=np.float64)[idx] @ vectors[idx]


def fit_linear_map(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """The (dx + 1, dy) matrix A (last row: bias) minimising ||[x 1] A - y||^2 + ridge ||A[:-1]||^2.

    The bias is not penalised. Solved as the least-squares problem of [x 1] stacked on sqrt(ridge) [I 0]
    against y stacked on 0 (the same minimiser as the normal equations, better conditioned; exact for
    ridge = 0 when [x 1] has full column rank).

    Args:
        x: (n, dx) source vectors (e.g. a text encoder's vectors of the words shared with the tag vocabulary).
        y: (n, dy) target vectors (their PMI vectors).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"x and y must be (n, dx) and (n, dy), got {x.shape} and {y.shape}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, not {ridge}")
    n, dx = x.shape
    design = np.vstack([np.hstack([x, np.ones((n, 1))]),
                        np.hstack([np.sqrt(ridge) * np.eye(dx), np.zeros((dx, 1))])])
    target = np.vstack([y, np.zeros((dx, y.shape[1]))])
    return np.linalg.lstsq(design, target, rcond=None)[0]


def apply_linear_map(x: np.ndarray, a: np.ndarray) -> np.ndarray:
    """x (..., dx) -> x A[:-1] + A[-1], (..., dy)."""
    a = np.asarray(a, dtype=np.float64)
    return np.asarray(x, dtype=np.float64) @ a[:-1] + a[-1]


@dataclass
class TagEmbedding:
    """PMI word vectors of a tag vocabulary, their idf weights, and an optional affine map from a text
    encoder's space into the PMI space for words outside the vocabulary.

    vocab: V words; vectors: (V, D) float32; idf: (V,) float64; text_map: (dt + 1, D) from `fit_linear_map`
    or None.
    """

    vocab: list[str]
    vectors: np.ndarray
    idf: np.ndarray
    text_map: np.ndarray | None = None
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.vocab = [str(w) for w in self.vocab]
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        self.idf = np.asarray(self.idf, dtype=np.float64)
        if self.text_map is not None:
            self.text_map = np.asarray(self.text_map, dtype=np.float64)
        v = len(self.vocab)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != v or self.idf.shape != (v,):
            raise ValueError(f"vectors must be ({v}, D) and idf ({v},), got {self.vectors.shape} and {self.idf.shape}")
        if self.text_map is not None and (self.text_map.ndim != 2 or self.text_map.shape[1] != self.vectors.shape[1]):
            raise ValueError(f"text_map must be (dt + 1, {self.vectors.shape[1]}), got {self.text_map.shape}")
        self.index = {w: i for i, w in enumerate(self.vocab)}
        if len(self.index) != v:
            raise ValueError("the vocabulary has repeated words")

    def vector(self, word: str, text_vector: np.ndarray | None = None) -> np.ndarray:
        """(D,) float32: the PMI vector of `word` if it is a tag, else `text_vector` (the word's text-encoder
        vector) mapped by `text_map`; KeyError naming the word when neither is possible."""
        i = self.index.get(word)
        if i is not None:
            return self.vectors[i]
        if text_vector is None or self.text_map is None:
            why = "no text vector was given" if text_vector is None else "there is no text map"
            raise KeyError(f"{word!r} is not in the tag vocabulary and {why}")
        return apply_linear_map(text_vector, self.text_map).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        """Write one .npz (the vocabulary as UTF-8 JSON bytes), atomically."""
        arrays = {"vocab": np.frombuffer(json.dumps(self.vocab).encode("utf-8"), dtype=np.uint8),
                  "vectors": self.vectors, "idf": self.idf}
        if self.text_map is not None:
            arrays["text_map"] = self.text_map
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> TagEmbedding:
        with np.load(path, allow_pickle=False) as data:
            vocab = json.loads(data["vocab"].tobytes().decode("utf-8"))
            text_map = data["text_map"] if "text_map" in data.files else None
            return cls(vocab=vocab, vectors=data["vectors"], idf=data["idf"], text_map=text_map)
