"""Evaluation reading: a rank's share of a split in index order, and single images for pictures.

Both read shards from any location (locations.py) through the same reader as training (shards.py)
and decode with the same decoder (images.py). `locate` is the one place that maps a split index to
its shard and position.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from . import transforms
from .images import decode_rgb, resize_batch
from .locations import ShardSource, as_source
from .shards import load_manifest, read_samples, split_layout
from .stream import DEFAULT_LOADER_TIMEOUT_S, _workers

SPLIT_NAMES = ("train", "query", "gallery")


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, disjoint index ranges whose union is [0, total), sizes differing by at most one."""
    return total * rank // world_size, total * (rank + 1) // world_size


def locate(layout: list[tuple[dict, int]], indices) -> dict[int, list[int]]:
    """Split indices -> {shard number: [positions within it]} (shards in order, positions as given)."""
    starts = [first for _, first in layout]
    total = starts[-1] + layout[-1][0]["samples"]
    wanted: dict[int, list[int]] = {}
    for index in indices:
        if not 0 <= index < total:
            raise IndexError(f"index {index} outside [0, {total})")
        shard = int(np.searchsorted(starts, index, side="right")) - 1
        wanted.setdefault(shard, []).append(index - starts[shard])
    return dict(sorted(wanted.items()))


class _EvalBatches(IterableDataset):
    def __init__(self, source: ShardSource, manifest: dict, split: str, *, lo: int, hi: int, batch_size: int,
                 image_size: tuple[int, int], verify: bool):
        super().__init__()
        self.source, self.split, self.lo, self.hi = source, split, lo, hi
        self.batch_size, self.image_size, self.verify = batch_size, image_size, verify
        self.layout = split_layout(manifest, split)

    def __len__(self) -> int:
        return -(-(self.hi - self.lo) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, int]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = [range(self.lo + b * self.batch_size, min(self.hi, self.lo + (b + 1) * self.batch_size))
                   for b in range(len(self)) if b % workers == worker]
        wanted = locate(self.layout, [i for indices in batches for i in indices])
        held: dict[int, dict] = {}      # the samples of the shard being read (indices only grow)

        def sample_at(index: int):
            shard, positions = next(iter(locate(self.layout, [index]).items()))
            if shard not in held:
                held.clear()
                entry, first = self.layout[shard]
                held[shard] = read_samples(self.source, self.split, entry, first, wanted[shard], self.verify)
            return held[shard][positions[0]]

        for indices in batches:
            images, metas, corrupt = [], [], 0
            for index in indices:
                sample = sample_at(index)
                try:
                    images.append(decode_rgb(sample.image, self.image_size))
                except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt image
                    corrupt += 1
                    warnings.warn(f"corrupt image {sample.key} (source {sample.meta.get('source')}) in "
                                  f"{self.split}: using a mean-colour image in its place ({exc})", stacklevel=2)
                    images.append(np.full((*self.image_size, 3), transforms.MEAN_UINT8, np.uint8))
                metas.append([sample.meta["pid"], sample.meta["camid"], sample.meta["index"]])
            meta = torch.tensor(metas, dtype=torch.int64)
            out = {"images": transforms.normalize(resize_batch(images, self.image_size)),
                   "pids": meta[:, 0].contiguous(), "camids": meta[:, 1].contiguous(),
                   "index": meta[:, 2].contiguous()}
            yield out, {"corrupt": corrupt}


class EvalBatches:
    """A rank's part of an evaluation split, in index order; `.stats` counts corrupt images."""

    def __init__(self, dataset: _EvalBatches, num_workers: int, timeout_s: float):
        self.dataset, self.num_workers, self.timeout_s = dataset, num_workers, timeout_s
        self.stats = {"corrupt_images": 0}

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        with _workers(self.dataset, min(self.num_workers, len(self.dataset)), self.timeout_s) as source:
            for batch, counts in source:
                self.stats["corrupt_images"] += int(counts["corrupt"])
                yield batch


def eval_batches(shards, split: str, *, batch_size: int, image_size: tuple[int, int] | list[int],
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, verify: bool = True,
                 timeout_s: float = DEFAULT_LOADER_TIMEOUT_S) -> EvalBatches:
    """Batches of `split` ("query" or "gallery"; "train" works too) of one shard set (a location or a
    ShardSource) for one rank: `images` (normalised float), `pids`, `camids`, `index` (int64 position
    in the split). Ranks get contiguous, disjoint parts whose union is the whole split; within a rank
    the order is the index order."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split is {split!r}; one of train, query, gallery")
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    source = as_source(shards)
    manifest = load_manifest(source)
    lo, hi = rank_range(manifest["splits"][split]["images"], rank, world_size)
    dataset = _EvalBatches(source, manifest, split, lo=lo, hi=hi, batch_size=batch_size,
                           image_size=(int(image_size[0]), int(image_size[1])), verify=verify)
    return EvalBatches(dataset, num_workers, timeout_s)


def read_images(shards, split: str, indices: list[int], verify: bool = False) -> list[Image.Image]:
    """The original images at `indices` of `split` (in the order given), for ranked-list pictures."""
    source = as_source(shards)
    layout = split_layout(load_manifest(source), split)
    try:
        wanted = locate(layout, indices)
    except IndexError as exc:
        raise IndexError(f"{split} {exc}") from None
    found = {}
    for shard, positions in wanted.items():
        entry, first = layout[shard]
        for pos, sample in read_samples(source, split, entry, first, positions, verify).items():
            with Image.open(io.BytesIO(sample.image)) as im:
                found[first + pos] = im.convert("RGB")
    return [found[i] for i in indices]


def eval_source(shards, choice: int | str | None = None, **options) -> ShardSource:
    """The shard set to evaluate: `choice` (eval.shards) is an index into `shards` (data.shards, one
    location or a list), a location, or None for the first set. `options`: ShardSource's (cache_dir,
    timeout_s, attempts)."""
    locations = list(shards) if isinstance(shards, (list, tuple)) else [shards]
    if choice is None:
        choice = 0
    if isinstance(choice, int) and not isinstance(choice, bool):
        if not 0 <= choice < len(locations):
            raise ValueError(f"eval.shards is {choice}, but data.shards has {len(locations)} set(s) "
                             f"(indices 0..{len(locations) - 1})")
        choice = locations[choice]
    return as_source(str(choice) if isinstance(choice, Path) else choice, **options)
