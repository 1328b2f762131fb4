"""k-reciprocal re-ranking against the classic dense algorithm (Zhong et al. 2017), written plainly
here as the reference; sparse/chunked and features-based forms must agree with it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation import pairwise_distance, rerank, rerank_from_features


def classic_rerank(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
    """The original dense algorithm, with a stable argsort so that ties have one defined order."""
    original = np.concatenate([np.concatenate([q_q, q_g], axis=1),
                               np.concatenate([q_g.T, g_g], axis=1)], axis=0)
    original = np.power(original, 2).astype(np.float32)
    original = np.transpose(1.0 * original / np.max(original, axis=0))
    V = np.zeros_like(original).astype(np.float32)
    initial_rank = np.argsort(original, kind="stable").astype(np.int32)
    query_num = q_g.shape[0]
    all_num = q_g.shape[0] + q_g.shape[1]
    half = int(np.around(k1 / 2.0)) + 1
    for i in range(all_num):
        forward = initial_rank[i, :k1 + 1]
        backward = initial_rank[forward, :k1 + 1]
        k_reciprocal = forward[np.where(backward == i)[0]]
        expansion = k_reciprocal
        for candidate in k_reciprocal:
            c_forward = initial_rank[candidate, :half]
            c_backward = initial_rank[c_forward, :half]
            c_reciprocal = c_forward[np.where(c_backward == candidate)[0]]
            if len(np.intersect1d(c_reciprocal, k_reciprocal)) > 2.0 / 3 * len(c_reciprocal):
                expansion = np.append(expansion, c_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        V[i, expansion] = 1.0 * weight / np.sum(weight)
    original = original[:query_num]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    inv_index = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard = np.zeros_like(original, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        for j in np.where(V[i, :] != 0)[0]:
            temp_min[0, inv_index[j]] += np.minimum(V[i, j], V[inv_index[j], j])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_value) + original * lambda_value
    return final[:query_num, query_num:]


def clustered(rng, n_q, n_g, dim, n_ids=15):
    ids = rng.integers(0, n_ids, n_q + n_g)
    feats = rng.normal(size=(n_ids, dim))[ids] + 0.6 * rng.normal(size=(n_q + n_g, dim))
    feats = torch.tensor(feats, dtype=torch.float32)
    return feats[:n_q], feats[n_q:]


@pytest.mark.parametrize("n_q,n_g,k1,k2,lam", [(30, 120, 20, 6, 0.3), (25, 80, 10, 3, 0.5),
                                               (10, 50, 5, 1, 0.0), (5, 15, 20, 6, 1.0)])
def test_matches_classic_dense(n_q, n_g, k1, k2, lam):
    rng = np.random.default_rng(n_q)
    qf, gf = clustered(rng, n_q, n_g, 12)
    q_g, q_q, g_g = (pairwise_distance(a, b).numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf)))
    expect = classic_rerank(q_g, q_q, g_g, k1, k2, lam)
    got = rerank(q_g, q_q, g_g, k1, k2, lam)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (n_q, n_g)
    np.testing.assert_allclose(got, expect, atol=2e-6)
    np.testing.assert_array_equal(rerank(q_g, q_q, g_g, k1, k2, lam, chunk_size=7), got)
    assert isinstance(rerank(torch.from_numpy(q_g), q_q, g_g, k1, k2, lam), torch.Tensor)


def test_ties_and_asymmetric_input_follow_the_classic_order():
    rng = np.random.default_rng(7)
    qf, gf = clustered(rng, 20, 70, 6)
    q_g, q_q, g_g = (np.round(pairwise_distance(a, b).numpy(), 1)       # many exact ties
                     for a, b in ((qf, gf), (qf, qf), (gf, gf)))
    np.testing.assert_allclose(rerank(q_g, q_q, g_g), classic_rerank(q_g, q_q, g_g), atol=2e-6)
    g_g = g_g + rng.random(g_g.shape).astype(np.float32) * 0.05          # not symmetric
    np.testing.assert_allclose(rerank(q_g, q_q, g_g, 8, 3), classic_rerank(q_g, q_q, g_g, 8, 3),
                               atol=2e-6)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_from_features_equals_dense_form(metric):
    rng = np.random.default_rng(11)
    qf, gf = clustered(rng, 40, 150, 16)
    feats = torch.cat([qf, gf])
    full = pairwise_distance(feats, feats, metric).numpy()
    expect = rerank(full[:40, 40:], full[:40, :40], full[40:, 40:])
    for chunk in (None, 9):
        got = rerank_from_features(qf, gf, metric=metric, chunk_size=chunk)
        np.testing.assert_allclose(got.numpy(), expect, atol=2e-6)
    got = rerank_from_features(qf.numpy(), gf.numpy(), metric=metric)
    assert isinstance(got, np.ndarray)


def test_from_features_local_mode():
    from pipeline.alignment import local_distance

    rng = np.random.default_rng(12)
    qf, gf = clustered(rng, 15, 45, 8)
    ql, gl = qf.view(15, 4, 2), gf.view(45, 4, 2)
    feats, stripes = torch.cat([qf, gf]), torch.cat([ql, gl])
    d_global, d_local = pairwise_distance(feats, feats), local_distance(stripes, stripes)
    # global+local: on the common scale (4 stripes not of unit length: paths of at most 7 cells below 1
    # each); global+local-sum: the reproductions' plain sum
    for distance, full in (("global+local", d_global / 2 + d_local / 7), ("global+local-sum", d_global + d_local)):
        full = full.numpy()
        expect = rerank(full[:15, 15:], full[:15, :15], full[15:, 15:], k1=8, k2=3)
        got = rerank_from_features(qf, gf, k1=8, k2=3, local=(ql, gl), distance=distance)
        np.testing.assert_allclose(got.numpy(), expect, atol=2e-6, err_msg=distance)


def test_reranking_improves_a_clustered_retrieval():
    from pipeline.evaluation import rank_metrics

    rng = np.random.default_rng(5)
    ids = np.arange(60).repeat(6)
    cams = np.tile(np.arange(6), 60)
    feats = torch.tensor(rng.normal(size=(60, 32))[ids] * 0.5 + rng.normal(size=(360, 32)),
                         dtype=torch.float32)
    q = cams == 0
    qf, gf = feats[q], feats[~q]
    args = (ids[q], ids[~q], cams[q], cams[~q])
    plain = rank_metrics(pairwise_distance(qf, gf), *args)
    reranked = rank_metrics(rerank_from_features(qf, gf), *args)
    assert reranked["mAP"] > plain["mAP"]


def test_bad_parameters_are_named():
    d = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    with pytest.raises(ValueError, match="k2 is 30"):
        rerank(d, np.zeros((3, 3)), np.zeros((5, 5)), k1=20, k2=30)
    with pytest.raises(ValueError, match="lambda_value"):
        rerank(d, np.zeros((3, 3)), np.zeros((5, 5)), lambda_value=2.0)
    with pytest.raises(ValueError, match=r"q_q \[Q, Q\]"):
        rerank(d, np.zeros((4, 4)), np.zeros((5, 5)))
    bad = d.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        rerank(bad, np.zeros((3, 3)), np.zeros((5, 5)))
