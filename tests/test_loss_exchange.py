"""The loss's exchange and mining groups with real gloo process groups, on features (no model: 8 ranks,
whose start-up is most of the time; tests/test_distributed_equivalence.py runs the real model under DDP
at 2 and 3 ranks).

Each rank holds a slice of one float64 feature batch (global, stripes, logits; two networks for the
mutual cases) and runs the real criterion forward and backward. Compared with one process per mining
group holding only that group's samples, to a tight tolerance: global, local and locally mined triplets,
mutual learning, both margins, mining_ranks 0 (all), 8, 2 and 4 (4 groups of 2, 2 of 4: each equals
a 2- or 4-rank run on its samples, which equals one process on them), and the former exchange (gather_all).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import LossConfig
from pipeline.distributed import LaunchError, check_group_size, cleanup, count_traffic, init_distributed
from pipeline.losses import TERMS, AlignedReIDCriterion

from gloo_ranks import PROCESS_TIMEOUT_S, run_ranks

NUM_CLASSES = 8

# 24 samples (divisible by 2, 3, 4 and 8), identities with 1 to 5 images, so the ranks and the groups hold
# different numbers of valid anchors. Each case: (mining_ranks, exchange, local_mining, mutual, margin).
FEATURE_PIDS = [0, 1, 2, 3, 0, 2, 4, 1, 2, 4, 0, 2, 5, 6, 5, 7, 6, 5, 1, 7, 6, 4, 2, 5]   # pid 3: one image
CASES = [(0, "rows", "global", True, 0.3), (0, "rows", "local", False, None), (0, "gather_all", "local", True, 0.3),
         (-1, "rows", "global", True, None), (2, "rows", "global", True, 0.3), (2, "rows", "local", True, None),
         (4, "rows", "local", False, 0.3)]   # -1: the world size


def loss_config(margin: float | None, mining: str) -> LossConfig:
    # Distinct weights so a term counted twice or dropped changes the result.
    return LossConfig(margin=margin, global_weight=1.0, local_weight=0.7, id_weight=0.5, label_smoothing=0.1,
                      mutual_prob_weight=0.8, mutual_metric_weight=0.3, local_mining=mining)


def feature_batch(dtype=torch.float64) -> list[dict]:
    gen = torch.Generator().manual_seed(7)
    count = len(FEATURE_PIDS)
    return [{"global": torch.randn(count, 16, generator=gen, dtype=torch.float64).to(dtype),
             "local": torch.randn(count, 4, 8, generator=gen, dtype=torch.float64).to(dtype),
             "logits": torch.randn(count, NUM_CLASSES, generator=gen, dtype=torch.float64).to(dtype)}
            for _ in range(2)]


def feature_loss(nets: list[dict], rows: slice, case: tuple, mining_ranks: int, exchange: str = "rows"):
    """Loss and terms of `rows` of the feature batch, plus the gradient of the loss w.r.t. those rows."""
    _, _, mining, mutual, margin = case
    cfg = loss_config(margin, mining)
    cfg.mining_ranks = mining_ranks
    leaves = [{k: v[rows].clone().requires_grad_() for k, v in net.items()} for net in nets[:1 + mutual]]
    pids = torch.tensor(FEATURE_PIDS)[rows]
    criterion = AlignedReIDCriterion(cfg, mutual=mutual, exchange=exchange)
    loss, terms = criterion(leaves if mutual else leaves[0], pids, pids)
    loss.backward()
    return loss.detach(), terms, [{k: v.grad for k, v in net.items()} for net in leaves]


def _feature_worker(rank: int, world: int, out_dir: str) -> None:
    init_distributed("gloo", timeout_s=RANKS_TIMEOUT_S)
    per_rank = len(FEATURE_PIDS) // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    results = []
    for case in CASES:
        mining_ranks = world if case[0] == -1 else case[0]
        loss, terms, grads = feature_loss(feature_batch(), rows, case, mining_ranks, case[1])
        results.append({"loss": loss, "terms": terms, "grads": grads})
    # Traffic: the rows exchange moves less than the former one, and bf16 features travel as bf16.
    traffic = {}
    for name, exchange, dtype in (("old", "gather_all", torch.float32), ("new", "rows", torch.float32),
                                  ("new_bf16", "rows", torch.bfloat16)):
        with count_traffic() as counter:
            feature_loss(feature_batch(dtype), rows, (0, exchange, "global", True, 0.3), 0, exchange)
        traffic[name] = torch.tensor(counter.bytes)
    torch.save({"cases": results, "traffic": traffic}, Path(out_dir) / f"rank{rank}.pt")
    cleanup()


RANKS_TIMEOUT_S = 2 * PROCESS_TIMEOUT_S   # 8 process starts: about 40 s on 2 idle cores, more when busy


@pytest.mark.slow
@pytest.mark.timeout(RANKS_TIMEOUT_S + 60)
@pytest.mark.parametrize("world", [8])
def test_exchange_and_mining_groups(tmp_path: Path, world: int) -> None:
    """Every case against one process per mining group (the group's samples only). Within a group of G
    ranks, the mean of its ranks' losses (and terms) is the group's single-process loss L_g, and a rank's
    feature gradient is G * dL_g/dx (DDP's average over all W ranks then gives the gradient of the mean
    over groups of L_g). mining_ranks 0 and W are the exact full loss; the gather_all exchange (the former
    one) gives the same numbers as the rows exchange."""
    ranks = run_ranks(_feature_worker, world, tmp_path, timeout_s=RANKS_TIMEOUT_S)
    per_rank = len(FEATURE_PIDS) // world
    for index, case in enumerate(CASES):
        size = world if case[0] in (0, -1) else case[0]
        for first in range(0, world, size):
            group = slice(first * per_rank, (first + size) * per_rank)
            ref_loss, ref_terms, ref_grads = feature_loss(feature_batch(), group, case, 0)
            members = [ranks[r]["cases"][index] for r in range(first, first + size)]
            msg = f"case {case}, group from rank {first}"
            torch.testing.assert_close(torch.stack([m["loss"] for m in members]).mean(), ref_loss,
                                       rtol=1e-10, atol=1e-12, msg=msg)
            for name in TERMS:
                torch.testing.assert_close(torch.stack([m["terms"][name] for m in members]).mean(),
                                           ref_terms[name], rtol=1e-10, atol=1e-12, msg=f"{msg}: {name}")
            for n, ref_net in enumerate(ref_grads):
                for key in ("global", "local", "logits"):
                    got = torch.cat([m["grads"][n][key] for m in members]) / size
                    torch.testing.assert_close(got, ref_net[key], rtol=1e-9, atol=1e-12, msg=f"{msg}: {key}")
    assert ref_terms["local_triplet"] > 1e-6 and ref_terms["global_triplet"] > 1e-6
    traffic = ranks[0]["traffic"]
    assert traffic["new"] < traffic["old"], traffic
    assert traffic["new_bf16"] < 0.6 * traffic["new"], traffic   # features as bf16 (pids, indices: int)


def test_mining_ranks_must_divide_the_world_size() -> None:
    """Before any process group starts (reid-train, with the launcher's world size) and again when the
    criterion is built, naming the key."""
    check_group_size(4, 8)
    check_group_size(0, 3)
    with pytest.raises(LaunchError, match=r"'loss.mining_ranks' is 3, but the world size 8 is not divisible"):
        check_group_size(3, 8)
    cfg = loss_config(0.3, "global")
    cfg.mining_ranks = 2   # a single process is a world of 1
    with pytest.raises(LaunchError, match="'loss.mining_ranks' is 2, but the world size 1"):
        AlignedReIDCriterion(cfg)


def test_reid_train_refuses_indivisible_mining_ranks(monkeypatch, capsys) -> None:
    """reid-train stops with status 2 before any process group or data, naming the key, once per node."""
    from pipeline.cli.train import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["--config", "demo", "loss.mining_ranks=3"]) == 2
    err = capsys.readouterr().err
    assert "launch error: 'loss.mining_ranks' is 3, but the world size 4 is not divisible by it" in err
