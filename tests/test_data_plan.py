"""The pure epoch plan (pipeline/data/plan.py): a function of the manifests and (seed, epoch, rank,
world_size) only, over one shard set or several."""
from __future__ import annotations

import hashlib

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
