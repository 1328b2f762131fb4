"""CMC / mAP / mINP against a plain per-query reference (stable argsort, then a loop), on random data
with junk, distractors, same-camera matches and ties; chunked = unchunked; features form = matrix form."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation import (pairwise_distance, rank_metrics, rank_metrics_from_features,
                                 rerank)
from pipeline.evaluation.metrics import feature_distance, query_stats_from_features, summarise


def reference_metrics(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50):
    """The protocol written out plainly: full stable argsort, one query at a time."""
    order = np.argsort(dist, axis=1, kind="stable")
    firsts, aps, inps = [], [], []
    for i in range(dist.shape[0]):
        o = order[i]
        keep = (g_pids[o] != -1) & ~((g_pids[o] == q_pids[i]) & (g_cams[o] == q_cams[i]))
        hits = (g_pids[o] == q_pids[i])[keep]
        if not hits.any():
            continue
        ranks = np.flatnonzero(hits) + 1
        firsts.append(ranks[0])
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inps.append(len(ranks) / ranks[-1])
    firsts = np.array(firsts)
    return {"rank1": np.mean(firsts <= 1), "rank5": np.mean(firsts <= 5),
            "rank10": np.mean(firsts <= 10), "mAP": np.mean(aps), "mINP": np.mean(inps),
            "cmc": np.array([np.mean(firsts <= k) for k in range(1, max_rank + 1)]),
            "valid_queries": len(firsts)}


def assert_same(a: dict, b: dict, atol: float = 1e-12) -> None:
    assert set(b) >= {"rank1", "rank5", "rank10", "mAP", "mINP", "cmc", "valid_queries"}
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP", "cmc", "valid_queries"):
        np.testing.assert_allclose(np.asarray(b[key], dtype=float), np.asarray(a[key], dtype=float),
                                   atol=atol, err_msg=key)


def make_labels(rng, n_q, n_g, n_ids=40, n_cams=4):
    """Query pids 1..n_ids; gallery: the same ids, distractors (pid 0) and junk (pid -1);
    some queries get no valid match at all (their only gallery images share the camera)."""
    q_pids = rng.integers(1, n_ids + 1, n_q)
    g_pids = rng.integers(-1, n_ids + 1, n_g)
    q_cams = rng.integers(0, n_cams, n_q)
    g_cams = rng.integers(0, n_cams, n_g)
    # pid n_ids + 1: only same-camera gallery images -> the query must be skipped.
    q_pids[:3], q_cams[:3] = n_ids + 1, 0
    g_pids[:5], g_cams[:5] = n_ids + 1, 0
    return q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_reference_with_junk_distractors_and_ties(dtype):
    rng = np.random.default_rng(0)
    q_pids, g_pids, q_cams, g_cams = make_labels(rng, 120, 700)
    dist = rng.random((120, 700)).astype(dtype)
    dist[:, ::4] = np.round(dist[:, ::4], 2)               # many exact ties
    for d in (dist, np.round(dist, 1)):                     # and a matrix made mostly of ties
        ref = reference_metrics(d, q_pids, g_pids, q_cams, g_cams)
        assert ref["valid_queries"] == 117                  # the three same-camera-only queries skipped
        for chunk in (None, 1, 7, 1000):
            assert_same(ref, rank_metrics(d, q_pids, g_pids, q_cams, g_cams, chunk_size=chunk))
        assert_same(ref, rank_metrics(torch.from_numpy(d), torch.from_numpy(q_pids),
                                      torch.from_numpy(g_pids), torch.from_numpy(q_cams),
                                      torch.from_numpy(g_cams)))


def test_good_ranking_with_ties_matches_reference():
    """Matches near the top (a useful model): only a small window of the gallery is searched."""
    rng = np.random.default_rng(5)
    q_pids, g_pids, q_cams, g_cams = make_labels(rng, 150, 900)
    dist = rng.random((150, 900)) + np.where(q_pids[:, None] == g_pids[None, :], 0.0, 0.9)
    dist = np.round(dist, 2).astype(np.float32)             # ties, also between matches and others
    ref = reference_metrics(dist, q_pids, g_pids, q_cams, g_cams)
    assert ref["mINP"] > 0.2 and ref["rank1"] > 0.8         # last matches ranked early: small window
    for chunk in (None, 1, 16):
        assert_same(ref, rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, chunk_size=chunk))


def test_hand_computed_query():
    # Gallery by distance: same pid+cam (removed), non-match, match, junk, distractor, match.
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    g_pids = np.array([7, 3, 7, -1, 0, 7])
    g_cams = np.array([1, 2, 2, 1, 1, 3])
    out = rank_metrics(dist, np.array([7]), g_pids, np.array([1]), g_cams, max_rank=5)
    # valid order: 3 (rank 1), 7 (rank 2), 0 (rank 3), 7 (rank 4)
    assert out["rank1"] == 0.0 and out["rank5"] == 1.0
    assert out["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert out["mINP"] == pytest.approx(2 / 4)
    np.testing.assert_array_equal(out["cmc"], [0, 1, 1, 1, 1])
    assert out["valid_queries"] == 1


def test_good_ranking_scores_one():
    rng = np.random.default_rng(1)
    q_pids = np.arange(20)
    g_pids = np.repeat(np.arange(20), 3)
    dist = np.abs(q_pids[:, None] - g_pids[None, :]).astype(np.float32) + rng.random((20, 60)) * 0.1
    out = rank_metrics(dist, q_pids, g_pids, np.zeros(20, int), np.ones(60, int))
    assert out["rank1"] == out["mAP"] == out["mINP"] == 1.0


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_from_features_equals_matrix_form(metric):
    rng = np.random.default_rng(2)
    q_pids, g_pids, q_cams, g_cams = make_labels(rng, 90, 400, n_ids=30)
    centres = rng.normal(size=(32, 16))
    qf = torch.tensor(centres[np.clip(q_pids, 0, 31)] + rng.normal(size=(90, 16)), dtype=torch.float32)
    gf = torch.tensor(centres[np.clip(g_pids, 0, 31)] + rng.normal(size=(400, 16)), dtype=torch.float32)
    full = rank_metrics(pairwise_distance(qf, gf, metric), q_pids, g_pids, q_cams, g_cams)
    assert full["rank1"] > 0.3                               # structured data: a meaningful check
    for chunk in (None, 1, 13):
        got = rank_metrics_from_features(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric,
                                         chunk_size=chunk)
        assert_same(full, got, atol=1e-9)
    # Disjoint query shares (as ranks compute them) summarise to the same figures.
    parts = [query_stats_from_features(qf[s], gf, q_pids[s], g_pids, q_cams[s], g_cams, metric)
             for s in (slice(0, 31), slice(31, 60), slice(60, 90))]
    assert_same(full, summarise(parts), atol=1e-9)


def test_local_distance_modes():
    from pipeline.alignment import local_distance

    rng = np.random.default_rng(3)
    q_pids, g_pids, q_cams, g_cams = make_labels(rng, 30, 80, n_ids=10)
    qf, gf = torch.randn(30, 8), torch.randn(80, 8)
    ql, gl = torch.randn(30, 4, 6), torch.randn(80, 4, 6)
    d_local = local_distance(ql, gl)
    # global+local: each distance over its largest possible value; 4 stripes: paths of at most 7 cells,
    # each below 1 for stripes that are not unit length.
    expect = {"local": d_local, "global+local-sum": pairwise_distance(qf, gf) + d_local,
              "global+local": pairwise_distance(qf, gf) / 2 + d_local / 7}
    for mode, dist in expect.items():
        ref = reference_metrics(dist.numpy(), q_pids, g_pids, q_cams, g_cams)
        got = rank_metrics_from_features(qf if mode != "local" else None,
                                         gf if mode != "local" else None, q_pids, g_pids,
                                         q_cams, g_cams, local=(ql, gl), distance=mode, chunk_size=7)
        assert_same(ref, got, atol=1e-9)


def test_global_local_common_scale_by_hand():
    """combine_scaled on a 1 x 1 case worked out by hand: unit global features at 90 degrees
    (distance sqrt 2), and 2 unit stripes each (bound (2*2 - 1) * tanh(1))."""
    import math

    from pipeline.evaluation.metrics import local_distance_bound

    qf, gf = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    ql = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    gl = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    # Element distances tanh(|f - g| / 2): d00 = tanh(sqrt2 / 2), d01 = same, d10 = d11 = 0.
    e = math.tanh(math.sqrt(2) / 2)
    path = min(e + e + 0.0, e + 0.0 + 0.0)        # (0,0)->(0,1)->(1,1) or (0,0)->(1,0)->(1,1)
    bound = 3 * math.tanh(1.0)
    assert local_distance_bound(gl) == pytest.approx(bound)
    assert local_distance_bound(2 * gl) == 3.0       # not unit length: tanh < 1 is the only bound
    got = feature_distance(qf, gf, x_local=ql, y_local=gl, distance="global+local")
    assert got.item() == pytest.approx(math.sqrt(2) / 2 + path / bound, abs=1e-5)
    plain = feature_distance(qf, gf, x_local=ql, y_local=gl, distance="global+local-sum")
    assert plain.item() == pytest.approx(math.sqrt(2) + path, abs=1e-5)


def test_rerank_output_feeds_metrics():
    rng = np.random.default_rng(4)
    q_pids, g_pids, q_cams, g_cams = make_labels(rng, 20, 100, n_ids=10)
    qf, gf = torch.randn(20, 8), torch.randn(100, 8)
    dist = rerank(pairwise_distance(qf, gf), pairwise_distance(qf, qf), pairwise_distance(gf, gf))
    assert_same(reference_metrics(dist.numpy(), q_pids, g_pids, q_cams, g_cams),
                rank_metrics(dist, q_pids, g_pids, q_cams, g_cams))


def test_bad_input_is_named():
    q = np.zeros(3, int)
    g = np.zeros(5, int)
    with pytest.raises(ValueError, match="g_pids has 4 entries"):
        rank_metrics(np.zeros((3, 5)), q, np.zeros(4, int), q, g)
    with pytest.raises(ValueError, match="2-D"):
        rank_metrics(np.zeros(5), q, g, q, g)
    bad = np.zeros((3, 5))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        rank_metrics(bad, q, g, q, g)
    with pytest.raises(ValueError, match="no query has a correct match"):
        rank_metrics(np.zeros((3, 5)), q, g + 1, q, g)
    with pytest.raises(ValueError, match="metric"):
        rank_metrics_from_features(np.zeros((3, 2)), np.zeros((5, 2)), q, g, q, g, metric="l1")
    with pytest.raises(ValueError, match="needs local="):
        rank_metrics_from_features(np.zeros((3, 2)), np.zeros((5, 2)), q, g, q, g, distance="local")
    with pytest.raises(ValueError, match="max_rank"):
        rank_metrics(np.zeros((3, 5)), q, g, q, g, max_rank=0)
