"""PMI tag vectors, idf, soft topic embedding and the text-to-PMI linear map, checked against hand computations."""

import math

import numpy as np
import pytest

from ovseg.core.methods.concept_mask.pmi import (TagEmbedding, apply_linear_map, fit_linear_map, idf, pmi_embedding,
                                                 pmi_matrix, soft_topic)

VOCAB = ["a", "b", "c", "d", "e"]
# 4 documents; "z" is not in the vocabulary and the repeated "a" counts once; "e" occurs nowhere.
DOCS = [["a", "b", "a", "z"], ["a", "b"], {"a", "c"}, ["c", "d"]]
# document counts: a 3, b 2, c 2, d 1, e 0 (N = 4) -> p(a) = 3/4, p(b) = p(c) = 1/2, p(d) = 1/4
# co-occurrence counts: ab 2 (docs 1, 2), ac 1 (doc 3), cd 1 (doc 4); bc, ad, bd never -> 0
L43, L23, L2, L4 = math.log(4 / 3), math.log(2 / 3), math.log(2), math.log(4)
EXPECTED_M = np.array([
    # M_ab = log((2/4) / (3/4 * 1/2)) = log(4/3); M_ac = log((1/4) / (3/4 * 1/2)) = log(2/3);
    # M_cd = log((1/4) / (1/2 * 1/4)) = log 2; diagonal -log p(w).
    [L43, L43, L23, 0.0, 0.0],
    [L43, L2, 0.0, 0.0, 0.0],
    [L23, 0.0, L2, L2, 0.0],
    [0.0, 0.0, L2, L4, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0],
])


def test_pmi_matrix_by_hand():
    m = pmi_matrix(DOCS, VOCAB)
    assert m.dtype == np.float64 and m.shape == (5, 5)
    np.testing.assert_allclose(m, EXPECTED_M, atol=1e-12)
    # pairs that never co-occur are exactly 0, and the never-seen word's row and column are 0
    assert m[1, 2] == m[0, 3] == m[1, 3] == 0.0
    assert not m[4].any() and not m[:, 4].any()


def test_pmi_matrix_of_an_empty_corpus_is_zero():
    assert not pmi_matrix([], VOCAB).any()


def _with_eigenvalues(values, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(values), len(values))))
    return q @ np.diag(values) @ q.T


def test_embedding_reconstructs_a_psd_matrix():
    b = np.random.default_rng(1).normal(size=(4, 4))
    m = b @ b.T
    w = pmi_embedding(m, 4)
    np.testing.assert_allclose(w @ w.T, m, atol=1e-10)


def test_embedding_truncation_keeps_largest_eigenvalues_and_clamps_negatives():
    m = _with_eigenvalues([0.5, 5.0, -1.0, 3.0])
    w = pmi_embedding(m, 2)
    # the columns of U S^(1/2) are orthogonal with squared norms = the kept eigenvalues, in descending order
    np.testing.assert_allclose(w.T @ w, np.diag([5.0, 3.0]), atol=1e-10)
    full = pmi_embedding(m, 4)
    np.testing.assert_allclose((full ** 2).sum(axis=0), [5.0, 3.0, 0.5, 0.0], atol=1e-10)  # -1 clamped to 0
    np.testing.assert_allclose(full[:, :2], w, atol=1e-12)


def test_embedding_sign_convention():
    m = _with_eigenvalues([4.0, 2.0, 1.0, 0.5], seed=3)
    w = pmi_embedding(m, 4)
    peak_rows = np.abs(w).argmax(axis=0)
    assert (w[peak_rows, np.arange(4)] > 0).all()
    # the convention makes the vectors follow a relabelling of the words, whatever signs eigh returns
    perm = np.array([2, 0, 3, 1])
    np.testing.assert_allclose(pmi_embedding(m[np.ix_(perm, perm)], 4), w[perm], atol=1e-10)


@pytest.mark.parametrize("dim", [0, 6])
def test_embedding_rejects_bad_dim(dim):
    with pytest.raises(ValueError):
        pmi_embedding(np.eye(5), dim)


def test_idf_by_hand():
    # -log p: a -log(3/4), b -log(1/2), c -log(1/2), d -log(1/4), e unseen -> 0
    np.testing.assert_allclose(idf(DOCS, VOCAB), [L43, L2, L2, L4, 0.0], atol=1e-12)


def test_soft_topic_by_hand():
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [1.0, 1.0], [5.0, 5.0]])
    weights = idf(DOCS, VOCAB)
    index = {w: i for i, w in enumerate(VOCAB)}
    # a (twice: once), c, and an unknown tag: log(4/3) [1, 0] + log 2 [2, -1]
    t = soft_topic(["a", "c", "a", "zebra"], index, vectors, weights)
    np.testing.assert_allclose(t, [L43 + 2 * L2, -L2], atol=1e-12)
    np.testing.assert_array_equal(soft_topic(["zebra"], index, vectors, weights), [0.0, 0.0])


def test_linear_map_recovers_an_affine_map():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 3))
    a_true = rng.normal(size=(4, 2))
    y = x @ a_true[:-1] + a_true[-1]
    a = fit_linear_map(x, y, ridge=0.0)
    assert a.shape == (4, 2)
    np.testing.assert_allclose(a, a_true, atol=1e-10)
    np.testing.assert_allclose(apply_linear_map(x[:2], a), y[:2], atol=1e-10)


def test_linear_map_ridge_matches_the_normal_equations():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    x1 = np.hstack([x, np.ones((6, 1))])
    penalty = 0.7 * np.diag([1.0, 1.0, 1.0, 0.0])  # the bias row is not penalised
    expected = np.linalg.solve(x1.T @ x1 + penalty, x1.T @ y)
    np.testing.assert_allclose(fit_linear_map(x, y, ridge=0.7), expected, atol=1e-10)


def _tag_embedding(with_map=True):
    vectors = pmi_embedding(pmi_matrix(DOCS, VOCAB), 3)
    text = np.random.default_rng(5).normal(size=(5, 4))  # stand-in text-encoder vectors of the tags
    text_map = fit_linear_map(text, vectors, ridge=1e-3) if with_map else None
    return TagEmbedding(vocab=VOCAB, vectors=vectors, idf=idf(DOCS, VOCAB), text_map=text_map)


def test_tag_embedding_lookup_and_fallback():
    emb = _tag_embedding()
    assert emb.index["c"] == 2 and emb.vectors.dtype == np.float32
    np.testing.assert_array_equal(emb.vector("c"), emb.vectors[2])
    tv = np.array([0.1, -0.2, 0.3, 0.4])
    out = emb.vector("zebra", text_vector=tv)
    assert out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_allclose(out, tv @ emb.text_map[:-1] + emb.text_map[-1], rtol=1e-6)
    with pytest.raises(KeyError, match="zebra"):
        emb.vector("zebra")
    with pytest.raises(KeyError, match="zebra"):
        _tag_embedding(with_map=False).vector("zebra", text_vector=tv)


def test_tag_embedding_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        TagEmbedding(vocab=["a", "b"], vectors=np.zeros((3, 2)), idf=np.zeros(2))


@pytest.mark.parametrize("with_map", [True, False])
def test_tag_embedding_save_load_round_trip(tmp_path, with_map):
    emb = _tag_embedding(with_map)
    emb.vocab[4] = "café"  # non-ASCII survives the JSON-in-npz vocabulary
    emb = TagEmbedding(emb.vocab, emb.vectors, emb.idf, emb.text_map)
    path = emb.save(tmp_path / "tags.npz")
    back = TagEmbedding.load(path)
    assert back.vocab == emb.vocab and back.index == emb.index
    np.testing.assert_array_equal(back.vectors, emb.vectors)
    np.testing.assert_array_equal(back.idf, emb.idf)
    if with_map:
        np.testing.assert_array_equal(back.text_map, emb.text_map)
    else:
        assert back.text_map is None
    assert [p.name for p in tmp_path.iterdir()] == ["tags.npz"]  # no temporary file left behind
