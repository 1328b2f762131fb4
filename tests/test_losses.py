"""Batch-hard mining and the AlignedReID criterion in one process, against direct loop computations:
unequal identity counts, anchors without positives, soft margin, label smoothing, mutual terms,
disabled terms. Cross-rank exactness is in test_distributed_equivalence.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.alignment import paired_local_distance
from pipeline.config import LossConfig
from pipeline.losses import AlignedReIDCriterion, batch_hard_mining, pairwise_euclidean, valid_anchors

# Unequal counts (4, 1, 2, 3 images) and a singleton (pid 7): a `.view(N, -1)` reshape cannot hold it.
PIDS = torch.tensor([5, 7, 5, 9, 2, 5, 2, 9, 5, 2])


def loop_mining(dist: torch.Tensor, pids: torch.Tensor) -> list[tuple[int, int] | None]:
    out = []
    for a in range(len(pids)):
        pos = [j for j in range(len(pids)) if pids[j] == pids[a] and j != a]
        neg = [j for j in range(len(pids)) if pids[j] != pids[a]]
        if not pos or not neg:
            out.append(None)
            continue
        out.append((max(pos, key=lambda j: dist[a, j]), min(neg, key=lambda j: dist[a, j])))
    return out


def outputs(n: int, *, seed: int, stripes: int = 4, dim: int = 6, classes: int = 10) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
            for name, shape in (("global", (n, dim)), ("local", (n, stripes, dim)), ("logits", (n, classes)))}


def only(**weights) -> LossConfig:
    base = {"global_weight": 0.0, "local_weight": 0.0, "id_weight": 0.0, "local_id_weight": 0.0,
            "mutual_prob_weight": 0.0, "mutual_metric_weight": 0.0}
    return LossConfig(**{**base, **weights})


def test_mining_unequal_counts_matches_loops() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(len(PIDS), 5, generator=gen, dtype=torch.float64)
    dist = pairwise_euclidean(feats, feats)
    pos, neg, valid = batch_hard_mining(dist, PIDS, PIDS, torch.arange(len(PIDS)))
    for a, expected in enumerate(loop_mining(dist, PIDS)):
        assert bool(valid[a]) == (expected is not None)
        if expected is not None:
            assert (int(pos[a]), int(neg[a])) == expected
    assert not valid[1] and valid.sum() == len(PIDS) - 1
    torch.testing.assert_close(valid_anchors(PIDS), valid)


def test_mining_rows_of_a_larger_batch() -> None:
    """Anchors that are a slice of the batch (a rank's own rows) get the same pairs as in the full matrix."""
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(len(PIDS), 5, generator=gen, dtype=torch.float64)
    full = batch_hard_mining(pairwise_euclidean(feats, feats), PIDS, PIDS, torch.arange(len(PIDS)))
    rows = slice(4, 8)
    part = batch_hard_mining(pairwise_euclidean(feats[rows], feats), PIDS[rows], PIDS, torch.arange(4, 8))
    for got, expected in zip(part, full):
        torch.testing.assert_close(got, expected[rows])


def test_no_positive_or_no_negative_is_invalid() -> None:
    assert valid_anchors(torch.tensor([3, 3, 3])).tolist() == [False] * 3        # no negative
    assert valid_anchors(torch.tensor([1, 2, 3])).tolist() == [False] * 3        # no positive
    dist = torch.rand(3, 3)
    assert not batch_hard_mining(dist, torch.tensor([3, 3, 3]), torch.tensor([3, 3, 3]),
                                 torch.arange(3))[2].any()


@pytest.mark.parametrize("margin", [0.3, None])
def test_triplet_terms_match_direct_computation(margin: float | None) -> None:
    out = outputs(len(PIDS), seed=2)
    crit = AlignedReIDCriterion(only(global_weight=1.0, local_weight=1.0, margin=margin), mutual=False)
    loss, terms = crit(out, PIDS, PIDS)
    g, loc = out["global"].detach(), out["local"].detach()
    dist = torch.cdist(g, g)
    hinge = (lambda v: F.relu(v + margin)) if margin is not None else (lambda v: math.log1p(math.exp(v)))
    pairs = [p for p in loop_mining(dist, PIDS) if p is not None]
    anchors = [a for a, p in enumerate(loop_mining(dist, PIDS)) if p is not None]
    global_terms, local_terms, correct = [], [], 0
    for a, (p, n) in zip(anchors, pairs):
        global_terms.append(float(hinge(dist[a, p] - dist[a, n])))
        lp = paired_local_distance(loc[a:a + 1], loc[p:p + 1])
        ln = paired_local_distance(loc[a:a + 1], loc[n:n + 1])
        local_terms.append(float(hinge(lp - ln)))
        correct += int(dist[a, n] > dist[a, p])
    # Mean over the valid anchors only: the singleton neither counts nor dilutes the mean.
    assert terms["global_triplet"].item() == pytest.approx(sum(global_terms) / len(anchors), rel=1e-9)
    assert terms["local_triplet"].item() == pytest.approx(sum(local_terms) / len(anchors), rel=1e-9)
    assert terms["precision"].item() == pytest.approx(correct / len(anchors))
    assert loss.item() == pytest.approx(terms["global_triplet"].item() + terms["local_triplet"].item())
    loss.backward()
    assert out["global"].grad[1].abs().sum() > 0  # the singleton still serves as a negative of others
    assert torch.isfinite(out["local"].grad).all() and out["local"].grad.abs().sum() > 0


def test_id_loss_with_label_smoothing() -> None:
    out = outputs(6, seed=3, classes=4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    crit = AlignedReIDCriterion(only(id_weight=1.0, label_smoothing=0.2), mutual=False)
    _, terms = crit(out, labels, labels)
    logp = F.log_softmax(out["logits"].detach(), 1)
    target = torch.full_like(logp, 0.2 / 4)
    target[torch.arange(6), labels] += 0.8
    assert terms["id"].item() == pytest.approx(-(target * logp).sum(1).mean().item(), rel=1e-12)


def test_mutual_terms_detach_partner() -> None:
    pair = [outputs(len(PIDS), seed=4), outputs(len(PIDS), seed=5)]
    cfg = only(mutual_prob_weight=1.0, mutual_metric_weight=1.0)
    loss, terms = AlignedReIDCriterion(cfg, mutual=True)(pair, PIDS, PIDS)
    n = len(PIDS)
    p = [F.softmax(o["logits"].detach(), 1) for o in pair]
    kl = sum((p[1 - i] * (p[1 - i].log() - p[i].log())).sum() / n for i in range(2))
    d = [torch.cdist(o["global"].detach(), o["global"].detach()) for o in pair]
    metric = sum(((d[i] - d[1 - i]) ** 2).sum() / n ** 2 for i in range(2))
    assert terms["mutual_prob"].item() == pytest.approx(kl.item(), rel=1e-9)
    assert terms["mutual_metric"].item() == pytest.approx(metric.item(), rel=1e-6)
    loss.backward()
    # Network 0's own KL gradient: d/dz_0 KL(p_1 || p_0) / n = (p_0 - p_1) / n, nothing through p_1.
    expected = (p[0] - p[1]) / n
    torch.testing.assert_close(pair[0]["logits"].grad, expected)


def test_zero_weight_skips_term() -> None:
    out = outputs(len(PIDS), seed=6)
    loss, terms = AlignedReIDCriterion(only(global_weight=1.0), mutual=False)(out, PIDS, PIDS)
    loss.backward()
    assert out["local"].grad is None and out["logits"].grad is None
    assert terms["local_triplet"] == 0 and terms["id"] == 0
    assert set(terms) == {"global_triplet", "local_triplet", "id", "local_id", "mutual_prob", "mutual_metric",
                          "precision", "total"}
    crit = AlignedReIDCriterion(LossConfig(), mutual=False)
    crit(outputs(len(PIDS), seed=7), PIDS, PIDS)
    assert set(crit.last_timing) == {"comm_s", "dp_s", "loss_s"} and crit.last_timing["loss_s"] > 0


def test_duplicate_features_keep_finite_gradients() -> None:
    out = outputs(4, seed=8)
    with torch.no_grad():
        out["global"][1] = out["global"][0]
        out["local"][1] = out["local"][0]
    pids = torch.tensor([0, 0, 1, 1])
    loss, _ = AlignedReIDCriterion(LossConfig(), mutual=False)(out, pids, pids)
    loss.backward()
    assert all(torch.isfinite(t.grad).all() for t in out.values())


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="every loss weight is 0"):
        AlignedReIDCriterion(only(), mutual=False)
    crit = AlignedReIDCriterion(LossConfig(), mutual=True)
    with pytest.raises(ValueError, match="list of 2 output dicts"):
        crit(outputs(4, seed=0), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    crit = AlignedReIDCriterion(LossConfig(), mutual=False)
    with pytest.raises(ValueError, match="lacks"):
        crit({"global": torch.zeros(4, 3)}, torch.zeros(4, dtype=torch.long),
             torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="has 4 rows but pids has 3"):
        crit(outputs(4, seed=0), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_local_mining_picks_the_hardest_pairs_by_local_distance():
    """loss.local_mining=local: each anchor's local triplet uses its farthest positive and nearest
    negative under the aligned local distance, whatever the global distances say."""
    from pipeline.alignment import local_distance
    from pipeline.config import LossConfig

    torch.manual_seed(0)
    n, pids = 12, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    out = {"global": torch.randn(n, 16), "local": torch.randn(n, 4, 8, requires_grad=True),
           "logits": torch.randn(n, 4)}
    cfg = LossConfig(global_weight=0.0, id_weight=0.0, local_weight=1.0, margin=None, local_mining="local")
    loss, _ = AlignedReIDCriterion(cfg, mutual=False)(out, pids, pids)
    d = local_distance(out["local"].detach(), out["local"].detach())
    same, eye = pids[:, None] == pids[None, :], torch.eye(n, dtype=torch.bool)
    d_ap = d.masked_fill(~same | eye, -float("inf")).amax(1)
    d_an = d.masked_fill(same, float("inf")).amin(1)
    expected = torch.nn.functional.softplus(d_ap - d_an).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    cfg.local_mining = "global"
    other, _ = AlignedReIDCriterion(cfg, mutual=False)(out, pids, pids)
    assert not torch.isclose(other, loss)
