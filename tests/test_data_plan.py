"""The pure epoch plan (pipeline/data/plan.py): a function of the manifests and (seed, epoch, rank,
world_size) only, over one shard set or several."""
from __future__ import annotations

import hashlib

import pytest

from pipeline.data import load_manifest
from pipeline.data import plan


def test_plan_is_a_pure_function_of_its_inputs(tiny_shards):
    manifest = load_manifest(tiny_shards)
    kw = dict(p=4, k=2, rank=0, world_size=2, epoch=5, seed=3, steps=6)
    a = [b for _, b in plan.plan_epoch(manifest, **kw)]
    assert a == [b for _, b in plan.plan_epoch(manifest, **kw)]
    assert a == [b for _, b in plan.plan_epoch([manifest], **kw)]          # one set given as a list
    digest = hashlib.sha256(repr(a).encode()).hexdigest()
    assert digest != hashlib.sha256(repr([b for _, b in plan.plan_epoch(manifest, **{**kw, "rank": 1})]
                                         ).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# An epoch re-cut for another world size (a run resumed on fewer or more ranks)
# ------------------------------------------------------------------------------------------------
def _batches(manifest, world, steps, cuts=(), **kw):
    """Every rank's batches (as tuples of (pid, positions)) at `world` ranks."""
    kw = dict(p=4, k=2, epoch=1, seed=7, **kw)
    return [[tuple((g.identity.pid, g.positions) for g in batch)
             for _, batch in plan.plan_rank(manifest, rank=r, world_size=world, steps=steps, cuts=cuts, **kw)]
            for r in range(world)]


def test_recut_deals_exactly_the_batches_the_old_ranks_had_left(tiny_shards):
    manifest = load_manifest(tiny_shards)
    steps = 9
    for old_world in (1, 2, 3):
        old = _batches(manifest, old_world, steps)
        assert old == [[tuple((g.identity.pid, g.positions) for g in b) for _, b in plan.plan_epoch(
            manifest, p=4, k=2, epoch=1, seed=7, rank=r, world_size=old_world, steps=steps)]
            for r in range(old_world)], "plan_rank without cuts must be plan_epoch"
        for done in (1, 4, 8):
            left = [b for rank in old for b in rank[done:]]           # old-rank order, end to end
            for new_world in (1, 2, 3, 4):
                cut = plan.Cut(old_world, steps, done)
                new = _batches(manifest, new_world, steps, cuts=[cut])
                n = plan.cut_steps([cut], new_world)
                assert n == len(left) // new_world and all(len(r) == n for r in new), (old_world, done, new_world)
                # Contiguous pieces, in order: nothing repeated, nothing lost but the < W tail.
                assert [b for rank in new for b in rank] == left[:n * new_world]
                assert len(left) - n * new_world < new_world


def test_a_recut_epoch_can_be_recut_again(tiny_shards):
    manifest = load_manifest(tiny_shards)
    first, steps = plan.Cut(2, 9, 3), 9                                      # 2 ranks did 3 of 9 steps
    middle = _batches(manifest, 3, steps, cuts=[first])                      # 12 batches -> 3 ranks x 4
    second = plan.Cut(3, plan.cut_steps([first], 3), 1)                     # they did 1 step each
    last = _batches(manifest, 1, steps, cuts=[first, second])
    assert last == [[b for rank in middle for b in rank[1:]]]
    with pytest.raises(ValueError, match="does not follow"):
        list(plan.plan_rank(manifest, p=4, k=2, rank=0, world_size=1, epoch=1, seed=7, steps=steps,
                            cuts=[first, plan.Cut(3, 5, 1)]))
    with pytest.raises(ValueError, match="invalid epoch cut"):
        plan.Cut(2, 3, 4)


def test_epoch_fraction_is_continuous_across_cuts():
    assert plan.epoch_fraction([], 3, 12) == 0.25
    cut = plan.Cut(2, 12, 3)                   # a quarter done at 2 ranks
    assert plan.epoch_fraction([cut], 0, 9) == 0.25
    assert plan.epoch_fraction([cut], 9, 9) == 1.0
    assert plan.epoch_fraction([cut], 3, 9) == pytest.approx(0.25 + 0.75 / 3)
    assert plan.epoch_fraction([cut, plan.Cut(1, 18, 9)], 0, 4) == pytest.approx(0.625)


def test_train_batches_of_a_recut_epoch_are_the_planned_ones(tiny_shards):
    from pipeline.data import train_batches

    manifest = load_manifest(tiny_shards)
    cut = {"world_size": 2, "steps": 6, "done": 2}            # as the checkpoint stores it
    kw = dict(p=4, k=2, epoch=0, seed=1, image_size=(64, 32), steps_per_epoch=6)
    for rank in range(3):
        got = [b["pids"].view(-1, 2)[:, 0].tolist()
               for b in train_batches(tiny_shards, rank=rank, world_size=3, cuts=[cut], **kw)]
        want = [[g.identity.pid for g in batch] for _, batch in plan.plan_rank(
            manifest, p=4, k=2, rank=rank, world_size=3, epoch=0, seed=1, steps=6, cuts=[cut])]
        assert got == want and len(got) == 2          # (6 - 2) x 2 = 8 batches -> 2 steps on 3 ranks
