"""Decode once (pipeline/data/decoded.py): `decode_cache=host` (and `device`, here on the CPU) gives
the streaming path's batches exactly, decodes each image at most once per process whatever the number
of DataLoader workers, handles corrupt images the same way, and refuses to start when the cache
would not fit, saying how much it needs and how much there is."""
from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.data import DecodeCache, load_manifest, release_caches, train_batches
from pipeline.data.datasets import parse_market1501
from pipeline.data.decoded import cache_bytes
from pipeline.data.shards import write_shards

SIZE = (64, 32)


def run(shards, cache="none", **kw) -> tuple[list[dict], dict]:
    kw = {"p": 4, "k": 2, "rank": 0, "world_size": 1, "epoch": 0, "image_size": SIZE, **kw}
    loader = train_batches(shards, decode_cache=cache, **kw)
    return list(loader), loader.stats


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) > 0 and all(
        x.keys() == y.keys() and all(torch.equal(x[key], y[key]) for key in x) for x, y in zip(a, b))


def images_of(shards) -> int:
    return load_manifest(shards)["splits"]["train"]["images"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_host_cache_equals_streaming_batch_for_batch_and_decodes_once(tiny_shards, num_workers):
    cache = DecodeCache(images_of(tiny_shards), SIZE, kind="host")
    used: set[int] = set()
    decoded = 0
    for epoch in range(2):
        for world_size, rank in ((2, 1), (1, 0)):
            kw = dict(epoch=epoch, world_size=world_size, rank=rank, num_workers=num_workers)
            want, _ = run(tiny_shards, **kw)
            got, stats = run(tiny_shards, cache, **kw)
            assert same(want, got)
            new = {int(i) + 0 for b in want for i in b["index"]} - used
            assert stats["decoded"] == len(new)        # only images no earlier step of the process decoded
            used |= new
            decoded += stats["decoded"]
    assert cache.decoded == len(used) == decoded
    # resuming mid-epoch from a warm cache: no decoding at all, same batches
    want, _ = run(tiny_shards, epoch=1, start_step=3)
    got, stats = run(tiny_shards, cache, epoch=1, start_step=3, num_workers=num_workers)
    assert same(want, got) and stats["decoded"] == 0


@pytest.mark.timeout(120)
def test_device_cache_and_the_string_form_reuse_one_cache_per_process(tiny_shards):
    release_caches()
    for epoch in range(2):
        want, _ = run(tiny_shards, epoch=epoch)
        got, stats = run(tiny_shards, "device", epoch=epoch, device="cpu")
        assert same(want, got)
        if epoch == 1:
            assert stats["decoded"] < len(want) * 8      # epoch 2 reuses what epoch 1 decoded
    release_caches()


@pytest.mark.timeout(120)
def test_corrupt_images_are_replaced_the_same_way(tiny_dataset, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(tiny_dataset, raw)
    victims = sorted((raw / "bounding_box_train").glob("*.jpg"))[:4]
    for victim in victims:
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 3])
    out = tmp_path / "shards"
    write_shards(parse_market1501(raw), out, images_per_shard=40, progress=False)
    cache = DecodeCache(images_of(out), SIZE)
    with pytest.warns(UserWarning, match="corrupt image"):
        for epoch in range(2):
            want, _ = run(out, k=4, steps_per_epoch=12, epoch=epoch)
            got, stats = run(out, cache, k=4, steps_per_epoch=12, epoch=epoch, num_workers=2)
            assert same(want, got)
    assert (cache.state == 2).sum() == len(victims)      # found corrupt once each, then remembered


def test_a_cache_that_does_not_fit_is_refused_with_both_figures(tiny_shards):
    n = images_of(tiny_shards)
    need = cache_bytes(n, (256, 128))
    with pytest.raises(MemoryError) as err:
        DecodeCache(n, (256, 128), kind="host", ranks_per_node=2, available=need)
    message = str(err.value)
    assert f"{2 * need / 1e9:.2f} GB" in message and f"{need / 1e9:.2f} GB is available" in message
    assert "data.decode_cache=none" in message
    DecodeCache(n, (256, 128), available=2 * need)            # fits
    with pytest.raises(ValueError, match="decode_cache"):
        run(tiny_shards, "disk")
