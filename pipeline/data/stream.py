"""The training stream: identity-balanced P×K uint8 batches on every rank, read sequentially from shards.

The plan (plan.py) fixes which images make every step from the manifests and (seed, epoch, rank,
world_size). This module turns it into pixels:

- Step t goes to DataLoader worker (t - start_step) mod num_workers; PyTorch returns worker outputs
  round-robin, so batches arrive in step order whatever the worker count. A worker reads the shards
  of a window once, sequentially, from wherever they are (locations.py: a folder, HTTP, a pipe:
  command, an object store, or the node-local cache), keeping only the bytes of the samples its own
  steps use, and decodes only those (images.py); skipped steps are never read or decoded, so a
  resumed run replays exactly and cheaply.
- With a decode cache (`decode_cache="host"` or `"device"`, decoded.py) the worker decodes only the
  images that no earlier step of the epoch uses and that the process has not decoded before, and the
  training process assembles every batch from the cache; the batches are the same.
- Augmentation is not done here: batches are uint8 [P·K, 3, H, W] at the training size, and the
  trainer augments them on the training device with `transforms.TrainAugment` (the one augmentation
  path; its randomness is the trainer's checkpointed RNG).

Bad input: an undecodable image is replaced by the next decodable image of the same identity, with a
warning, and counted in `.stats["corrupt_images"]` (per batch without a cache; once per image with
one); missing, truncated, modified or unreachable shards raise `ShardError` naming the file or URL; a
worker that dies surfaces as a DataLoader error (with a timeout, never a hang).
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import decoded as dc
from .images import decode_rgb, resize_batch
from .locations import DEFAULT_ATTEMPTS, DEFAULT_TIMEOUT_S, ShardError, ShardSource, as_source
from .plan import DEFAULT_WINDOW_IMAGES, Cut, Group, TrainSets, as_cuts, cut_steps, epoch_steps, plan_rank
from .shards import load_manifest, read_samples

DEFAULT_LOADER_TIMEOUT_S = 300.0
META = dc.META


class _TrainSteps(IterableDataset):
    """Batches of one rank's epoch; each DataLoader worker makes its own share of the steps."""

    def __init__(self, sources: list[ShardSource], sets: TrainSets, *, p: int, k: int, rank: int,
                 world_size: int, epoch: int, seed: int, steps: int, start_step: int,
                 image_size: tuple[int, int], verify: bool, window_images: int, planned_steps: int,
                 cuts: list[Cut]):
        super().__init__()
        self.sources, self.sets = sources, sets
        self.p, self.k, self.rank, self.world_size = p, k, rank, world_size
        self.epoch, self.seed, self.steps, self.start_step = epoch, seed, steps, start_step
        self.image_size, self.verify, self.window_images = image_size, verify, window_images
        self.planned_steps, self.cuts = planned_steps, cuts   # the epoch as first planned; its re-cuts
        self.states = None   # decode-cache states at the epoch's start (None: no cache)

    # ------------------------------------------------------------------------------------ reading
    def image_id(self, shard: int, pos: int) -> int:
        return self.sets.image_base[shard] + pos

    def fetch(self, keys) -> dict:
        """Raw samples {(shard, position): Sample}: one sequential pass over each shard involved."""
        wanted: dict[int, set[int]] = {}
        for shard, pos in keys:
            wanted.setdefault(shard, set()).add(pos)
        raw = {}
        for shard, positions in sorted(wanted.items()):
            d, entry, first = self.sets.shards[shard]
            for pos, sample in read_samples(self.sources[d], "train", entry, first, sorted(positions),
                                            self.verify).items():
                raw[shard, pos] = sample
        return raw

    def meta(self, shard: int, sample) -> list[int]:
        d = self.sets.shards[shard][0]
        pid = sample.meta["pid"]
        return [self.sets.global_pid(d, pid), self.sets.label(d, pid), sample.meta["camid"],
                sample.meta["index"], d]

    def decode(self, shard: int, pos: int, raw: dict):
        """(uint8 [h, w, 3], metadata row) of one image, or None (with a warning) if it is corrupt."""
        sample = raw[shard, pos]
        try:
            return decode_rgb(sample.image, self.image_size), self.meta(shard, sample)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt image
            d, entry, _ = self.sets.shards[shard]
            warnings.warn(f"skipping corrupt image {sample.key} (pid {sample.meta.get('pid')}, source "
                          f"{sample.meta.get('source')}) in shard {self.sources[d].url(entry['name'])}: {exc}",
                          stacklevel=2)
            return None

    @staticmethod
    def candidates(start: int, count: int, pos: int) -> list[int]:
        """The image at `pos`, then the identity's others in order: the fallbacks for a corrupt image."""
        return [start + (pos - start + j) % count for j in range(count)]

    def no_image_error(self, shard: int, pid: int, count: int) -> ShardError:
        d, entry, _ = self.sets.shards[shard]
        return ShardError(f"shard {self.sources[d].url(entry['name'])}: none of the {count} images of pid "
                          f"{pid} can be decoded; re-run launch/prepare_data.py on intact images")

    # ---------------------------------------------------------------------------------- the epoch
    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, int]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = plan_rank(self.sets, p=self.p, k=self.k, rank=self.rank, world_size=self.world_size,
                         epoch=self.epoch, seed=self.seed, steps=self.planned_steps, cuts=self.cuts,
                         window_images=self.window_images)
        steps = [(step, window, batch) for step, (window, batch) in enumerate(plan) if step >= self.start_step]
        first_use: dict[int, int] = {}
        if self.states is not None:     # the step that decodes each image the cache does not have yet
            for step, _, batch in steps:
                for g in batch:
                    for pos in g.positions:
                        i = self.image_id(g.identity.shard, pos)
                        if self.states[i] == dc.UNKNOWN:
                            first_use.setdefault(i, step)
        mine = [s for s in steps if (s[0] - self.start_step) % workers == worker]
        for _, items in itertools.groupby(mine, key=lambda item: item[1]):
            items = list(items)
            keys = {(g.identity.shard, pos) for step, _, batch in items for g in batch for pos in g.positions
                    if self.states is None or first_use.get(self.image_id(g.identity.shard, pos)) == step}
            raw = self.fetch(keys)
            for step, _, batch in items:
                yield self._batch(batch, raw) if self.states is None else self._new_images(step, batch, raw,
                                                                                           first_use)

    def _batch(self, batch: list[Group], raw: dict) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The whole batch, decoded here (no cache)."""
        chosen: dict[tuple[int, int], tuple] = {}
        bad: set = set()
        counts = {"corrupt": 0, "decoded": 0}
        images, metas = [], []
        for group in batch:
            shard = group.identity.shard
            for pos in group.positions:
                if (shard, pos) not in chosen:            # with replacement: decode once per batch
                    chosen[shard, pos] = self._first_good(group, pos, raw, bad, counts)
                image, meta = chosen[shard, pos]
                images.append(image)
                metas.append(meta)
        meta = torch.tensor(metas, dtype=torch.int64)
        out = {"images": resize_batch(images, self.image_size)}
        out.update({name: meta[:, i].contiguous() for i, name in enumerate(META)})
        return out, counts

    def _first_good(self, group: Group, pos: int, raw: dict, bad: set, counts: dict):
        ident = group.identity
        shard, candidates = ident.shard, self.candidates(ident.start, ident.count, pos)
        for cand in candidates:
            if (shard, cand) in bad:
                continue
            if (shard, cand) not in raw:   # a fallback: fetch the rest of the identity at once
                raw.update(self.fetch((shard, q) for q in candidates if (shard, q) not in raw))
            counts["decoded"] += 1
            got = self.decode(shard, cand, raw)
            if got is not None:
                return got
            bad.add((shard, cand))
            counts["corrupt"] += 1
        raise self.no_image_error(shard, ident.pid, ident.count)

    def _new_images(self, step: int, batch: list[Group], raw: dict, first_use: dict):
        """With a decode cache: the batch's image ids plus the pixels of the images first used here."""
        ids, groups, new, new_meta, bad = [], [], [], [], []
        arrays = []
        for group in batch:
            ident = group.identity
            groups.append([ident.shard, ident.start, ident.count, ident.pid])
            for pos in group.positions:
                i = self.image_id(ident.shard, pos)
                ids.append(i)
                if first_use.get(i) == step and i not in new and i not in bad:
                    got = self.decode(ident.shard, pos, raw)
                    if got is None:
                        bad.append(i)
                    else:
                        new.append(i)
                        arrays.append(got[0])
                        new_meta.append(got[1])
        out = {"ids": torch.tensor(ids, dtype=torch.int64), "groups": torch.tensor(groups, dtype=torch.int64),
               "new_ids": torch.tensor(new, dtype=torch.int64),
               "new_pixels": resize_batch(arrays, self.image_size),
               "new_meta": torch.tensor(new_meta, dtype=torch.int64).view(-1, len(META)),
               "bad_ids": torch.tensor(bad, dtype=torch.int64)}
        return out, {"corrupt": len(bad), "decoded": len(new) + len(bad)}

    def resolve(self, item: dict, cache: dc.DecodeCache, counts: dict) -> torch.Tensor:
        """In the training process: the cache rows of a batch, replacing corrupt images by the next
        decodable image of the identity (decoded here when no step has decoded it yet)."""
        ids = item["ids"].clone()
        for slot in torch.nonzero(torch.from_numpy(cache.state[ids.numpy()] != dc.DECODED))[:, 0].tolist():
            shard, start, count, pid = item["groups"][slot // self.k].tolist()
            pos = int(ids[slot]) - self.sets.image_base[shard]
            for cand in self.candidates(start, count, pos):
                i = self.image_id(shard, cand)
                if cache.state[i] == dc.UNKNOWN:
                    got = self.decode(shard, cand, self.fetch([(shard, cand)]))
                    counts["decoded"] += 1
                    if got is None:
                        cache.mark_corrupt([i])
                        counts["corrupt"] += 1
                    else:
                        cache.store(torch.tensor([i]), resize_batch([got[0]], self.image_size),
                                    torch.tensor([got[1]]))
                if cache.state[i] == dc.DECODED:
                    ids[slot] = i
                    break
            else:
                raise self.no_image_error(shard, pid, count)
        return ids


@contextlib.contextmanager
def _workers(dataset: IterableDataset, num_workers: int, timeout_s: float):
    """The dataset itself (num_workers=0) or a DataLoader over it whose workers are shut down on exit.

    Shutting down explicitly matters after an error: the exception's traceback references the
    DataLoader's iterator, which would otherwise keep idle workers alive until garbage collection."""
    if num_workers == 0:
        yield iter(dataset)
        return
    # An explicit generator: the DataLoader would otherwise draw its base seed from the global RNG,
    # changing the trainer's random state (which checkpoints restore for exact resumption).
    iterator = iter(DataLoader(dataset, batch_size=None, num_workers=num_workers, timeout=timeout_s,
                               prefetch_factor=2, persistent_workers=False,
                               generator=torch.Generator().manual_seed(0)))
    try:
        yield iterator
    except (ConnectionError, EOFError) as exc:
        # A worker killed while handing over a batch breaks the pipe before the DataLoader notices.
        raise RuntimeError(f"a DataLoader worker of the data stream died ({exc!r}); its log above may "
                           "say why (e.g. out of memory)") from exc
    finally:
        iterator._shutdown_workers()


class TrainBatches:
    """One rank's epoch: `len()` steps (identical on every rank); `.stats` counts corrupt and decoded
    images (`decoded`: decoder calls made for this epoch, in this process and its workers)."""

    def __init__(self, dataset: _TrainSteps, num_workers: int, timeout_s: float, cache: dc.DecodeCache | None):
        self.dataset, self.num_workers, self.timeout_s, self.cache = dataset, num_workers, timeout_s, cache
        self.stats = {"corrupt_images": 0, "batches": 0, "decoded": 0}

    def __len__(self) -> int:
        return self.dataset.steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        cache = self.cache
        self.dataset.states = None if cache is None else cache.state.copy()
        with _workers(self.dataset, self.num_workers, self.timeout_s) as source:
            for item, counts in source:
                if cache is not None:
                    cache.store(item["new_ids"], item["new_pixels"], item["new_meta"])
                    cache.mark_corrupt(item["bad_ids"])
                    item = cache.batch(self.dataset.resolve(item, cache, counts))
                self.stats["corrupt_images"] += int(counts["corrupt"])
                self.stats["decoded"] += int(counts["decoded"])
                self.stats["batches"] += 1
                yield item


def train_batches(shards, *, p: int, k: int, rank: int, world_size: int, epoch: int, seed: int = 0,
                  num_workers: int = 0, image_size: tuple[int, int] | list[int] = (256, 128),
                  start_step: int = 0, steps_per_epoch: int | None = None, verify: bool = True,
                  window_images: int = DEFAULT_WINDOW_IMAGES, timeout_s: float = DEFAULT_LOADER_TIMEOUT_S,
                  cache_dir: str | Path | None = None, decode_cache: str | dc.DecodeCache = "none",
                  device: torch.device | str | None = None, ranks_per_node: int = 1,
                  io_timeout_s: float = DEFAULT_TIMEOUT_S, io_attempts: int = DEFAULT_ATTEMPTS,
                  cuts=None) -> TrainBatches:
    """Identity-balanced P×K training batches for one rank and epoch (see plan.py and this module).

    shards: a location (folder, URL, `pipe:` template; locations.py), a ShardSource, or a list of them
    (several shard sets trained as one: pids namespaced, labels contiguous over the union; plan.py).
    Batches: `images` uint8 [P·K, 3, H, W] at `image_size` (on `device` with decode_cache="device"),
    `pids` (global), `labels` (over the union), `camids`, `index` (position in its set's train split),
    `dataset` (index of the shard set), all int64; the K images of an identity are adjacent.
    cache_dir: node-local copy of remote shards. decode_cache: "none", "host", "device" (decoded.py;
    a string reuses the process's cache across calls) or a DecodeCache. io_timeout_s / io_attempts:
    per-read timeout and attempts in a row for remote files. timeout_s: DataLoader worker timeout.
    cuts: the epoch was partly trained at other world sizes (plan.Cut, or their dicts, oldest first):
    this rank's share of the rest of it (plan.plan_rank), `cut_steps(cuts, world_size)` steps."""
    if p < 1 or k < 1:
        raise ValueError(f"p={p}, k={k}: both must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers is {num_workers}; must be >= 0")
    locations = shards if isinstance(shards, (list, tuple)) else [shards]
    if not locations:
        raise ValueError("shards is an empty list; give at least one shard location")
    options = dict(cache_dir=None if cache_dir is None else str(cache_dir), timeout_s=io_timeout_s,
                   attempts=io_attempts)
    sources = [as_source(location, **options) for location in locations]
    sets = TrainSets([load_manifest(source) for source in sources])
    if sets.num_classes < p:
        raise ValueError(f"{', '.join(map(str, sources))}: the train split has {sets.num_classes} identities, "
                         f"fewer than P={p}; a batch needs P distinct identities: lower data.p")
    for d, entry, _ in sets.shards:       # local shards: missing or truncated files fail here, at once
        path = sources[d].local_path(entry["name"])
        if path is not None and not path.is_file():
            raise ShardError(f"shard {path} is missing (listed in {sources[d].url('manifest.json')}); re-run "
                             "launch/prepare_data.py or restore the file")
        if path is not None and "bytes" in entry and path.stat().st_size != entry["bytes"]:
            raise ShardError(f"shard {path} has {path.stat().st_size} bytes, the manifest says "
                             f"{entry['bytes']}: truncated or replaced; re-run launch/prepare_data.py")
    cuts = as_cuts(cuts)
    planned = cuts[0].steps if cuts else epoch_steps(sets, p, k, world_size, steps_per_epoch)
    steps = cut_steps(cuts, world_size) if cuts else planned
    if steps < 1:
        raise ValueError(f"steps_per_epoch is {steps}; must be >= 1" if not cuts else
                         f"the re-cut epoch {[c.as_dict() for c in cuts]} has no step left for {world_size} ranks")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} is outside the epoch's {steps} steps")
    size = (int(image_size[0]), int(image_size[1]))
    cache = None
    if isinstance(decode_cache, dc.DecodeCache):
        cache = decode_cache
    elif decode_cache in ("host", "device"):
        key = (tuple(s.location for s in sources), tuple(e["sha256"] for _, e, _ in sets.shards), size,
               decode_cache, str(device))
        cache = dc.shared_cache(key, sets.images, size, kind=decode_cache, device=device,
                                ranks_per_node=ranks_per_node)
    elif decode_cache != "none":
        raise ValueError(f"decode_cache is {decode_cache!r}; one of none, host, device")
    if cache is not None and (len(cache) != sets.images or cache.image_size != size):
        raise ValueError(f"the decode cache holds {len(cache)} images at {cache.image_size}; these shards "
                         f"have {sets.images} train images at {size}")
    dataset = _TrainSteps(sources, sets, p=p, k=k, rank=rank, world_size=world_size, epoch=epoch, seed=seed,
                          steps=steps, start_step=start_step, image_size=size, verify=verify,
                          window_images=window_images, planned_steps=planned, cuts=cuts)
    return TrainBatches(dataset, num_workers, timeout_s, cache)
