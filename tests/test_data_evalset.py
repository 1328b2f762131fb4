"""Evaluation reading (pipeline/data/evalset.py) on real shards: a split partitioned across ranks in
index order, single images for the ranked-list pictures, and the choice of the evaluated set."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import eval_batches, eval_source, load_manifest, read_images, transforms
from pipeline.data.evalset import locate
from pipeline.data.shards import split_layout

SIZE = (64, 32)


@pytest.mark.timeout(60)
def test_eval_batches_partition_the_split_in_order(tiny_shards):
    manifest = load_manifest(tiny_shards)
    for split in ("query", "gallery"):
        total = manifest["splits"][split]["images"]
        reference = None
        for world_size in (1, 2, 3):
            parts = []
            for rank in range(world_size):
                loader = eval_batches(tiny_shards, split, batch_size=7, image_size=SIZE, rank=rank,
                                      world_size=world_size)
                batches = list(loader)
                assert len(batches) == len(loader)
                assert all(b["images"].dtype == torch.float32 and b["images"].shape[1:] == (3, *SIZE)
                           for b in batches)
                parts.append(torch.cat([b["index"] for b in batches]) if batches else torch.empty(0))
                if world_size == 1:
                    reference = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
            joined = torch.cat(parts)
            assert joined.tolist() == list(range(total))     # disjoint, complete, in order
        if split == "gallery":
            workers = list(eval_batches(tiny_shards, split, batch_size=7, image_size=SIZE, num_workers=2))
            assert all(torch.equal(torch.cat([b[key] for b in workers]), reference[key]) for key in reference)


def test_read_images_returns_the_indexed_originals(tiny_shards):
    manifest = load_manifest(tiny_shards)
    total = manifest["splits"]["gallery"]["images"]
    indices = [total - 1, 0, total // 2]
    images = read_images(tiny_shards, "gallery", indices)
    batches = list(eval_batches(tiny_shards, "gallery", batch_size=total, image_size=SIZE))
    for index, image in zip(indices, images):
        assert image.size == (SIZE[1], SIZE[0]) and image.mode == "RGB"
        expected = transforms.normalize(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None])
        assert torch.allclose(batches[0]["images"][index], expected[0])
    with pytest.raises(IndexError):
        read_images(tiny_shards, "gallery", [total])


def test_locate_maps_split_indices_to_shard_positions(tiny_shards):
    layout = split_layout(load_manifest(tiny_shards), "gallery")
    assert len(layout) > 1
    first_of_second = layout[1][1]
    assert locate(layout, [first_of_second, 0, first_of_second - 1]) == {
        0: [0, first_of_second - 1], 1: [0]}
    with pytest.raises(IndexError):
        locate(layout, [-1])


def test_eval_source_picks_the_set_by_index_or_location(tmp_path):
    sets = [str(tmp_path / "a"), "http://127.0.0.1:1/b/"]
    assert eval_source(sets).location == sets[0]
    assert eval_source(sets, 1).location == sets[1]
    assert eval_source(sets[0], "pipe:cat /x/{name}").location == "pipe:cat /x/{name}"
    assert eval_source(sets, 1, cache_dir=str(tmp_path)).cache_dir == str(tmp_path)
    with pytest.raises(ValueError, match="eval.shards is 2.*2 set"):
        eval_source(sets, 2)
