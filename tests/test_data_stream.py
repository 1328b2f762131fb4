"""The training stream's properties 1-7 (one test each), on real shards.

World sizes are simulated by calling `train_batches` with each rank in one process (the stream's plan
depends only on the manifest and (seed, epoch, rank, world_size)); num_workers=2 uses real DataLoader
worker processes.
"""
from __future__ import annotations

import os
import shutil
import signal
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.data import load_manifest, train_batches
from pipeline.data import shards as shards_mod
from pipeline.data import stream
from pipeline.data.datasets import parse_market1501
from pipeline.data.shards import ShardError, read_samples, split_layout, write_shards
from pipeline.data.synthetic import make_synthetic

SIZE = (64, 32)


def epoch(shards, *, p, k, rank=0, world_size=1, num_workers=0, **kw) -> list[dict]:
    return list(train_batches(shards, p=p, k=k, rank=rank, world_size=world_size, epoch=kw.pop("epoch", 0),
                              num_workers=num_workers, image_size=SIZE, **kw))


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[key], y[key]) for key in x) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def uneven_shards(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny dataset packed into many small, uneven train shards (3-4 identities each)."""
    out = tmp_path_factory.mktemp("uneven")
    write_shards(parse_market1501(tiny_dataset), out, images_per_shard=7, progress=False)
    return out


# ------------------------------------------------------------------------------------------- property 1
@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_p1_every_batch_is_p_identities_times_k_images(tiny_shards, num_workers):
    manifest = load_manifest(tiny_shards)
    counts = {pid: n for e in manifest["splits"]["train"]["shards"] for pid, n in e["ids"]}
    p = 4
    for k in (2, 16):          # 16 > every identity's image count: sampled with replacement
        for world_size in (1, 2, 3):
            for rank in range(world_size):
                for batch in epoch(tiny_shards, p=p, k=k, rank=rank, world_size=world_size,
                                   num_workers=num_workers):
                    assert batch["images"].shape == (p * k, 3, *SIZE) and batch["images"].dtype == torch.uint8
                    pids = batch["pids"].view(p, k)
                    assert (pids == pids[:, :1]).all(), "an identity's K images are adjacent"
                    assert len(set(pids[:, 0].tolist())) == p
                    labels = batch["labels"].view(p, k)
                    for row_pids, row_labels, row_index in zip(pids, labels, batch["index"].view(p, k)):
                        pid = int(row_pids[0])
                        assert (row_labels == int(manifest["label_map"][str(pid)])).all()
                        # without replacement while possible, otherwise every image at least once
                        assert len(set(row_index.tolist())) == min(k, counts[pid])


# ------------------------------------------------------------------------------------------- property 2
@pytest.mark.timeout(90)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_p2_every_rank_yields_the_same_number_of_batches(tiny_shards, uneven_shards, num_workers):
    p, k = 4, 2
    cases = [(shards, steps) for shards in (tiny_shards, uneven_shards) for steps in (None, 20)]
    if num_workers:
        cases = [(uneven_shards, None), (tiny_shards, 7)]
    for shards, steps in cases:       # steps=20: longer than the data, a rank resamples and never runs dry
        images = load_manifest(shards)["splits"]["train"]["images"]
        for world_size in (1, 2, 3):
            want = steps or max(1, images // (world_size * p * k))
            for rank in range(world_size):
                loader = train_batches(shards, p=p, k=k, rank=rank, world_size=world_size, epoch=1,
                                       num_workers=num_workers, image_size=SIZE, steps_per_epoch=steps)
                assert len(loader) == want
                assert sum(1 for _ in loader) == want


# ------------------------------------------------------------------------------------------- property 3
@pytest.mark.timeout(60)
def test_p3_ranks_hold_different_identities_in_each_step(tiny_shards, uneven_shards):
    p, k = 4, 2
    for shards in (tiny_shards, uneven_shards):
        ids = load_manifest(shards)["splits"]["train"]["identities"]
        for world_size, steps in ((2, None), (3, None), (3, 12)):
            assert ids >= world_size * p    # 12 identities: world size 3 is the tight case
            runs = [epoch(shards, p=p, k=k, rank=r, world_size=world_size, epoch=2, steps_per_epoch=steps)
                    for r in range(world_size)]
            for step in zip(*runs):
                sets = [set(b["pids"].tolist()) for b in step]
                assert sum(map(len, sets)) == len(set().union(*sets)), f"shared identities {sets}"


def test_p3_falls_back_to_shared_identities_when_too_few(tiny_shards):
    """12 identities cannot fill 2 ranks x P=8 disjointly: both ranks still get full batches."""
    runs = [epoch(tiny_shards, p=8, k=2, rank=r, world_size=2) for r in range(2)]
    assert len(runs[0]) == len(runs[1]) > 0
    assert all(len(set(b["pids"].tolist())) == 8 for run in runs for b in run)


# ------------------------------------------------------------------------------------------- property 4
@pytest.mark.timeout(60)
def test_p4_an_epoch_uses_at_least_90_percent_of_the_images(tiny_shards, uneven_shards):
    for shards in (tiny_shards, uneven_shards):
        total = load_manifest(shards)["splits"]["train"]["images"]
        for world_size in (1, 2, 3):
            used: set[int] = set()
            for rank in range(world_size):
                for batch in epoch(shards, p=2, k=2, rank=rank, world_size=world_size, epoch=3):
                    used.update(batch["index"].tolist())
            assert len(used) / total >= 0.9, f"world size {world_size}: {len(used)}/{total} images used"


# ------------------------------------------------------------------------------------------- property 5
@pytest.mark.timeout(90)
def test_p5_deterministic_epochs_differ_and_resume_replays_without_decoding(tiny_shards, monkeypatch):
    p, k, world_size = 4, 2, 2
    base = epoch(tiny_shards, p=p, k=k, rank=1, world_size=world_size)
    assert base[0]["images"].dtype == torch.uint8      # augmentation is the trainer's, on its device
    assert same_batches(base, epoch(tiny_shards, p=p, k=k, rank=1, world_size=world_size))
    # batches do not even depend on the worker count
    assert same_batches(base, epoch(tiny_shards, p=p, k=k, rank=1, world_size=world_size, num_workers=2))
    for change in ({"epoch": 1}, {"seed": 1}, {"rank": 0}):
        assert not same_batches(base, epoch(tiny_shards, p=p, k=k, world_size=world_size, **{"rank": 1, **change}))

    decoded = []
    real_decode = stream.decode_rgb
    monkeypatch.setattr(stream, "decode_rgb", lambda data, size: decoded.append(1) or real_decode(data, size))
    full = epoch(tiny_shards, p=p, k=k, rank=1, world_size=world_size)
    start = 3
    decoded.clear()
    resumed = epoch(tiny_shards, p=p, k=k, rank=1, world_size=world_size, start_step=start)
    assert same_batches(full[start:], resumed)
    assert len(decoded) == sum(len(set(b["index"].tolist())) for b in full[start:])
    assert (len(full) - start) % 2 == 1      # workers get unequal shares of the remaining steps
    assert same_batches(full[start:], epoch(tiny_shards, p=p, k=k, rank=1, world_size=world_size,
                                            start_step=start, num_workers=2))


# ------------------------------------------------------------------------------------------- property 6
@pytest.mark.timeout(90)
def test_p6_streams_sequentially_decodes_only_batch_images_and_memory_is_bounded(
        tiny_dataset, tmp_path, monkeypatch):
    """Shards are read as streams (webdataset's tar iteration, mode 'r|*', no seeking); only the images of
    the batches are decoded;
    what a worker holds at once (the raw samples of one window) does not grow with the dataset."""
    big_raw = tmp_path / "big"
    make_synthetic(big_raw, train_ids=48, test_ids=2, seed=1, image_size=SIZE, images_per_id=12, progress=False)
    big = tmp_path / "big_shards"
    write_shards(parse_market1501(big_raw), big, images_per_shard=40, progress=False)
    small = tmp_path / "small_shards"
    write_shards(parse_market1501(tiny_dataset), small, images_per_shard=40, progress=False)

    opens, held, decoded = [], [], []
    real_open, real_fetch, real_decode = tarfile.open, stream._TrainSteps.fetch, stream.decode_rgb

    def spy_open(name=None, mode="r", fileobj=None, **kw):
        opens.append((Path(repr(fileobj) if name is None else name).name, mode))
        return real_open(name, mode, fileobj, **kw)

    def spy_fetch(self, batches):
        raw = real_fetch(self, batches)
        held.append(len(raw))
        return raw

    monkeypatch.setattr(shards_mod.tarfile, "open", spy_open)
    monkeypatch.setattr(stream._TrainSteps, "fetch", spy_fetch)
    monkeypatch.setattr(stream, "decode_rgb", lambda data, size: decoded.append(1) or real_decode(data, size))
    peaks = {}
    for name, shards in (("small", small), ("big", big)):
        opens.clear(), held.clear(), decoded.clear()
        batches = epoch(shards, p=2, k=2, window_images=48, verify=False)
        assert {mode for _, mode in opens} == {"r|*"}
        per_shard = Counter(n for n, _ in opens)
        assert max(per_shard.values()) <= 3, per_shard       # a shard is read once per window it spans
        assert len(decoded) == sum(len(set(b["index"].tolist())) for b in batches)
        peaks[name] = max(held)
    images = {n: load_manifest(s)["splits"]["train"]["images"] for n, s in (("small", small), ("big", big))}
    assert images["big"] >= 3.5 * images["small"]
    # one window: about window_images images plus groups deferred from the previous window
    assert peaks["big"] <= 100 and peaks["big"] <= 1.5 * peaks["small"] + 20, peaks


# ------------------------------------------------------------------------------------------- property 7
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.timeout(90)
def test_p7_corrupt_images_are_skipped_and_counted(tiny_dataset, tmp_path):
    raw = _copy(tiny_dataset, tmp_path / "raw")
    victims = sorted((raw / "bounding_box_train").glob("*.jpg"))[:3]
    for victim in victims:
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 3])          # truncated JPEG
    out = tmp_path / "shards"
    write_shards(parse_market1501(raw), out, images_per_shard=40, progress=False)
    p, k, steps = 4, 4, 12                                   # 12 steps x 16 images: every image drawn
    with pytest.warns(UserWarning, match="corrupt image"):
        loader = train_batches(out, p=p, k=k, rank=0, world_size=1, epoch=0, image_size=SIZE,
                               steps_per_epoch=steps)
        batches = list(loader)
    assert len(batches) == steps and all(b["images"].shape[0] == p * k for b in batches)
    assert loader.stats["corrupt_images"] >= len(victims)
    sources = {s.meta["index"]: s.meta["source"]
               for e, first in split_layout(load_manifest(out), "train")
               for s in read_samples(out, "train", e, first, list(range(e["samples"])), False).values()}
    bad = {i for i, src in sources.items() if Path(src).name in {v.name for v in victims}}
    assert not bad & {i for b in batches for i in b["index"].tolist()}, "corrupt images reached a batch"
    workers = train_batches(out, p=p, k=k, rank=0, world_size=1, epoch=0, image_size=SIZE,
                            steps_per_epoch=steps, num_workers=2)
    list(workers)
    assert workers.stats["corrupt_images"] == loader.stats["corrupt_images"]   # summed over workers


@pytest.mark.timeout(90)
def test_p7_bad_shards_are_errors_naming_the_shard(tiny_shards, tmp_path):
    manifest = load_manifest(tiny_shards)
    name = manifest["splits"]["train"]["shards"][1]["name"]
    kw = dict(p=4, k=2, rank=0, world_size=1, epoch=0, image_size=SIZE)

    missing = _copy(tiny_shards, tmp_path / "missing")
    (missing / name).unlink()
    with pytest.raises(ShardError, match=f"{name}.*missing"):
        list(train_batches(missing, **kw))

    truncated = _copy(tiny_shards, tmp_path / "truncated")
    data = (truncated / name).read_bytes()
    (truncated / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=f"{name}.*truncated"):
        list(train_batches(truncated, **kw))

    modified = _copy(tiny_shards, tmp_path / "modified")
    data = bytearray((modified / name).read_bytes())
    data[2000] ^= 0xFF                                          # inside the first image's bytes
    (modified / name).write_bytes(bytes(data))
    for num_workers in (0, 2):
        with pytest.raises(Exception, match=f"{name}: sha256"):
            list(train_batches(modified, num_workers=num_workers, verify=True, **kw))
    assert len(list(train_batches(modified, verify=False, **kw))) > 0

    with pytest.raises(ShardError, match="manifest.json not found"):
        train_batches(tmp_path / "nowhere", **kw)


@pytest.mark.timeout(60)
def test_p7_a_dead_worker_is_an_error_not_a_hang(tiny_shards):
    loader = train_batches(tiny_shards, p=4, k=2, rank=0, world_size=1, epoch=0, image_size=SIZE,
                           steps_per_epoch=400, num_workers=2, timeout_s=30)
    iterator = iter(loader)
    next(iterator)
    import psutil

    children = psutil.Process().children()
    assert len(children) >= 2
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="worker"):
        os.kill(children[0].pid, signal.SIGKILL)   # the DataLoader may raise as soon as the signal lands
        for _ in iterator:
            pass
    assert time.monotonic() - started < 30
    iterator.close()
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
