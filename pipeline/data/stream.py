"""The training stream: identity-balanced P×K batches on every rank, read sequentially from shards.

How an epoch is made (every step is a pure function of the manifest and (seed, epoch, rank,
world_size), so every process computes the same plan without talking to the others):

1. Identities to ranks. The train shards are permuted with a seed all ranks share; their identities,
   in shard order, form one stream that is cut into `world_size` contiguous segments of about equal
   image count, each with at least P identities. Segments are disjoint, so in every step different
   ranks hold different identities (property 3), and each rank reads about 1/world_size of the data.
   With fewer than world_size·P identities, disjoint batches are impossible and every rank uses all
   identities (with its own randomness).
2. Groups. The rank's epoch has a fixed length (`steps`, the same on every rank) and needs steps·P
   groups of K images. They are apportioned to identities in proportion to their image counts; each
   identity's groups walk through a fresh permutation of its images, so images repeat only once all
   are used (an identity with fewer than K images is sampled with replacement). With balanced
   segments this uses nearly every image once per epoch (property 4).
3. Batches. The segment is cut into windows of consecutive identities (`window_images` images, at least
   2P identities); a window's groups are shuffled and assembled greedily into batches of P distinct
   identities, a group whose identity is already in the batch waiting for the next one. Leftovers
   at the end are topped up with fresh groups, so the rank never runs dry (property 2).
4. Images. Step t goes to DataLoader worker (t - start_step) mod num_workers; PyTorch returns worker
   outputs round-robin, so batches arrive in step order whatever the worker count. A worker reads
   the shards of a window once, sequentially, keeping only the bytes of the samples its own steps
   use, and decodes only those (property 6); skipped steps are never read or decoded (property 5).
   Augmentation is seeded per step, so the batches do not depend on the number of workers either.

Bad input: an undecodable image is replaced by another image of the same identity, with a warning, and
counted in `.stats["corrupt_images"]`; missing, truncated or modified shards raise `ShardError` naming
the shard; a worker that dies surfaces as a DataLoader error (with a timeout, never a hang).
"""
from __future__ import annotations

import contextlib
import io
import itertools
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import transforms
from .shards import ShardError, check_shard, iter_samples, load_manifest, read_samples, split_layout

DEFAULT_WINDOW_IMAGES = 4096
DEFAULT_TIMEOUT_S = 300.0


# --------------------------------------------------------------------------------------------------
# Randomness: every stream derives from explicit integers, never from global RNG state.
# --------------------------------------------------------------------------------------------------
def make_rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


def step_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


_SHARDS, _RANK, _AUGMENT = 1, 2, 3     # stream tags: distinct seeds for distinct purposes


# --------------------------------------------------------------------------------------------------
# Plan (metadata only)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    shard: int       # index of its train shard
    pid: int
    start: int       # position of its first image within the shard
    count: int


@dataclass(frozen=True)
class Group:
    identity: Identity
    positions: tuple[int, ...]   # K positions within the shard


def train_identities(manifest: dict) -> list[list[Identity]]:
    """Identities of every train shard, in shard order (from the manifest's `ids` runs)."""
    out = []
    for shard, entry in enumerate(manifest["splits"]["train"]["shards"]):
        ids, start = [], 0
        for pid, count in entry["ids"]:
            ids.append(Identity(shard, int(pid), start, int(count)))
            start += int(count)
        out.append(ids)
    return out


def epoch_steps(manifest: dict, p: int, k: int, world_size: int, steps_per_epoch: int | None = None) -> int:
    """Steps per epoch, identical on every rank: fixed by the manifest unless given."""
    if steps_per_epoch is not None:
        return int(steps_per_epoch)
    return max(1, manifest["splits"]["train"]["images"] // (world_size * p * k))


def rank_segment(per_shard: list[list[Identity]], *, p: int, rank: int, world_size: int, epoch: int,
                 seed: int) -> list[Identity]:
    """The identities rank `rank` uses this epoch (see the module docstring, step 1)."""
    order = make_rng(seed, epoch, _SHARDS).permutation(len(per_shard))
    stream = [ident for s in order for ident in per_shard[s]]
    n = len(stream)
    if n < p:
        raise ValueError(f"the train split has {n} identities, fewer than P={p}; a batch needs P distinct "
                         "identities: lower data.p")
    if world_size == 1 or n < world_size * p:
        return stream
    cumulative = np.cumsum([ident.count for ident in stream])
    cuts = [0]
    for r in range(1, world_size):
        target = cumulative[-1] * r / world_size
        i = int(np.searchsorted(cumulative, target))          # the first c with cumulative[c] >= target
        cut = i if i > 0 and target - cumulative[i - 1] < cumulative[i] - target else i + 1
        cut = min(max(cut, cuts[-1] + p), n - (world_size - r) * p)
        cuts.append(cut)
    cuts.append(n)
    return stream[cuts[rank]:cuts[rank + 1]]


def apportion(weights: list[int], total: int) -> list[int]:
    """Integers proportional to `weights` summing to `total` (largest remainders)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w * total / w.sum()
    out = np.floor(exact).astype(np.int64)
    short = total - int(out.sum())
    if short:
        out[np.argsort(-(exact - out), kind="stable")[:short]] += 1
    return out.tolist()


class _Draws:
    """K positions per draw for each identity, walking fresh permutations of its images."""

    def __init__(self, rng: np.random.Generator, k: int):
        self.rng, self.k = rng, k
        self.queues: dict[tuple[int, int], deque] = {}

    def draw(self, ident: Identity) -> Group:
        n, k = ident.count, self.k
        if n < k:  # every image once, the rest with replacement
            picks = list(self.rng.permutation(n)) + list(self.rng.integers(0, n, k - n))
            return Group(ident, tuple(ident.start + int(x) for x in picks))
        queue = self.queues.setdefault((ident.shard, ident.start), deque())
        picked: list[int] = []
        deferred: list[int] = []
        while len(picked) < k:
            if not queue:
                queue.extend(int(x) for x in self.rng.permutation(n))
            x = queue.popleft()
            (deferred if x in picked else picked).append(x)  # a repeat across permutations waits
        queue.extendleft(reversed(deferred))
        return Group(ident, tuple(ident.start + x for x in picked))


class _Assembler:
    """Greedy P-distinct-identity batches from a stream of groups (deferring repeats)."""

    def __init__(self, p: int):
        self.p = p
        self.pending: list[Group] = []
        self.pids: Counter = Counter()

    def add(self, group: Group) -> None:
        self.pending.append(group)
        self.pids[group.identity.pid] += 1

    def take(self, allow_short: bool = False) -> list[Group] | None:
        if len(self.pids) < self.p and not allow_short:
            return None
        batch, rest, seen = [], [], set()
        for g in self.pending:
            if len(batch) < self.p and g.identity.pid not in seen:
                batch.append(g)
                seen.add(g.identity.pid)
            else:
                rest.append(g)
        self.pending = rest
        self.pids -= Counter(seen)
        return batch


def _windows(segment: list[Identity], min_images: int, min_ids: int) -> list[tuple[int, int]]:
    out, lo, images = [], 0, 0
    for i, ident in enumerate(segment):
        images += ident.count
        if images >= min_images and i + 1 - lo >= min_ids:
            out.append((lo, i + 1))
            lo, images = i + 1, 0
    if lo < len(segment):
        if out and (len(segment) - lo < min_ids):
            out[-1] = (out[-1][0], len(segment))
        else:
            out.append((lo, len(segment)))
    return out


def plan_epoch(manifest: dict, *, p: int, k: int, rank: int, world_size: int, epoch: int, seed: int,
               steps: int, window_images: int = DEFAULT_WINDOW_IMAGES) -> Iterator[tuple[int, list[Group]]]:
    """(window number, batch of P groups) for each step of the rank's epoch, in step order."""
    segment = rank_segment(train_identities(manifest), p=p, rank=rank, world_size=world_size,
                           epoch=epoch, seed=seed)
    rng = make_rng(seed, epoch, _RANK, rank, world_size)
    quotas = apportion([ident.count for ident in segment], steps * p)
    draws, assembler, made = _Draws(rng, k), _Assembler(p), 0
    windows = _windows(segment, window_images, 2 * p)
    for number, (lo, hi) in enumerate(windows):
        groups = [draws.draw(segment[j]) for j in range(lo, hi) for _ in range(quotas[j])]
        for i in rng.permutation(len(groups)):
            assembler.add(groups[i])
            batch = assembler.take()
            while batch is not None:
                yield number, batch
                made += 1
                if made == steps:
                    return
                batch = assembler.take()
    while made < steps:  # leftovers (repeated identities) topped up with fresh groups
        batch = assembler.take(allow_short=True)
        have = {g.identity.pid for g in batch}
        others = [ident for ident in segment if ident.pid not in have]
        for i in sorted(rng.choice(len(others), p - len(batch), replace=False)):
            batch.append(draws.draw(others[i]))
        yield len(windows), batch
        made += 1


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
def decode(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Encoded image -> uint8 [H, W, 3] at `size` (H, W). Raises on undecodable data."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (size[1], size[0]))   # DCT-domain downscale when the source is larger
        im = im.convert("RGB")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        return np.array(im)          # writable, so torch can wrap it without a warning


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """[H, W, 3] uint8 arrays -> one [N, 3, H, W] uint8 tensor (a single copy)."""
    h, w, _ = images[0].shape
    out = torch.empty((len(images), 3, h, w), dtype=torch.uint8)
    for i, image in enumerate(images):
        out[i].copy_(torch.from_numpy(image).permute(2, 0, 1))
    return out


class _TrainSteps(IterableDataset):
    """Batches of one rank's epoch; each DataLoader worker makes its own share of the steps."""

    def __init__(self, shards_dir: str, manifest: dict, *, p: int, k: int, rank: int, world_size: int,
                 epoch: int, seed: int, steps: int, start_step: int, image_size: tuple[int, int],
                 augment: bool, aug: dict, verify: bool, window_images: int):
        super().__init__()
        self.shards_dir, self.manifest = shards_dir, manifest
        self.p, self.k, self.rank, self.world_size = p, k, rank, world_size
        self.epoch, self.seed, self.steps, self.start_step = epoch, seed, steps, start_step
        self.image_size, self.augment, self.aug = image_size, augment, aug
        self.verify, self.window_images = verify, window_images
        self.layout = split_layout(manifest, "train")
        self.label_map = {int(pid): label for pid, label in manifest["label_map"].items()}

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        augment = transforms.TrainAugment(self.image_size, **self.aug) if self.augment else None
        plan = plan_epoch(self.manifest, p=self.p, k=self.k, rank=self.rank, world_size=self.world_size,
                          epoch=self.epoch, seed=self.seed, steps=self.steps, window_images=self.window_images)
        mine = ((step, window, batch) for step, (window, batch) in enumerate(plan)
                if step >= self.start_step and (step - self.start_step) % workers == worker)
        for _, items in itertools.groupby(mine, key=lambda item: item[1]):
            items = list(items)
            raw = self._fetch([batch for _, _, batch in items])
            for step, _, batch in items:
                yield self._batch(step, batch, raw, augment)

    def _fetch(self, batches: list[list[Group]]) -> dict:
        """Raw samples of one window's batches: one sequential pass over each shard they touch."""
        wanted: dict[int, set[int]] = {}
        for batch in batches:
            for g in batch:
                wanted.setdefault(g.identity.shard, set()).update(g.positions)
        raw = {}
        for shard, positions in sorted(wanted.items()):
            entry, first = self.layout[shard]
            for pos, sample in read_samples(self.shards_dir, "train", entry, first, sorted(positions),
                                            self.verify).items():
                raw[shard, pos] = sample
        return raw

    def _image(self, group: Group, pos: int, raw: dict, bad: set) -> tuple[np.ndarray, dict, int]:
        """Decode one image, falling back to other images of the identity; returns (image, meta, failures)."""
        ident = group.identity
        entry, first = self.layout[ident.shard]
        failures = 0
        candidates = [pos] + [ident.start + (pos - ident.start + j) % ident.count for j in range(1, ident.count)]
        for cand in candidates:
            if (ident.shard, cand) in bad:
                continue
            if (ident.shard, cand) not in raw:  # a fallback: fetch the rest of the identity at once
                rest = [q for q in candidates if (ident.shard, q) not in raw]
                raw.update({(ident.shard, q): s for q, s in read_samples(
                    self.shards_dir, "train", entry, first, rest, self.verify).items()})
            sample = raw[ident.shard, cand]
            try:
                return decode(sample.image, self.image_size), sample.meta, failures
            except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt image
                bad.add((ident.shard, cand))
                failures += 1
                warnings.warn(f"skipping corrupt image {sample.key} (pid {ident.pid}, source "
                              f"{sample.meta.get('source')}) in shard {entry['name']}: {exc}", stacklevel=2)
        raise ShardError(f"shard {Path(self.shards_dir) / entry['name']}: none of the {ident.count} images of "
                         f"pid {ident.pid} can be decoded; re-run launch/prepare_data.py on intact images")

    def _batch(self, step: int, batch: list[Group], raw: dict, augment) -> tuple[dict[str, torch.Tensor], int]:
        images, pids, labels, camids, indices, corrupt = [], [], [], [], [], 0
        bad: set = set()
        decoded: dict = {}
        for group in batch:
            for pos in group.positions:
                if (group.identity.shard, pos) not in decoded:  # with replacement, decode once
                    decoded[group.identity.shard, pos] = self._image(group, pos, raw, bad)
                    corrupt += decoded[group.identity.shard, pos][2]
                image, meta, _ = decoded[group.identity.shard, pos]
                images.append(image)
                pids.append(meta["pid"])
                labels.append(self.label_map[meta["pid"]])
                camids.append(meta["camid"])
                indices.append(meta["index"])
        x = _to_tensor(images)
        if augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(step_seed(self.seed, self.epoch, _AUGMENT, self.rank, self.world_size, step))
                x = augment(x)
        out = {"images": x, "pids": torch.tensor(pids, dtype=torch.int64),
               "labels": torch.tensor(labels, dtype=torch.int64),
               "camids": torch.tensor(camids, dtype=torch.int64),
               "index": torch.tensor(indices, dtype=torch.int64)}
        return out, corrupt


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
    """One rank's epoch: `len()` steps (identical on every rank); `.stats` counts corrupt images."""

    def __init__(self, dataset: _TrainSteps, num_workers: int, timeout_s: float):
        self.dataset, self.num_workers, self.timeout_s = dataset, num_workers, timeout_s
        self.stats = {"corrupt_images": 0, "batches": 0}

    def __len__(self) -> int:
        return self.dataset.steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        with _workers(self.dataset, self.num_workers, self.timeout_s) as source:
            for batch, corrupt in source:
                self.stats["corrupt_images"] += int(corrupt)
                self.stats["batches"] += 1
                yield batch


def train_batches(shards_dir: str | Path, *, p: int, k: int, rank: int, world_size: int, epoch: int,
                  seed: int = 0, num_workers: int = 0, image_size: tuple[int, int] | list[int] = (256, 128),
                  start_step: int = 0, steps_per_epoch: int | None = None, augment: bool = True,
                  verify: bool = True, window_images: int = DEFAULT_WINDOW_IMAGES,
                  timeout_s: float = DEFAULT_TIMEOUT_S, **aug) -> TrainBatches:
    """Identity-balanced P×K training batches for one rank and epoch (see the module docstring).

    Batches: `images` [P·K, 3, H, W] (augment=True: float32 augmented and normalised with
    `TrainAugment(image_size, **aug)`; augment=False: uint8 resized), `pids`, `labels`, `camids` and
    `index` (position of each image in the train split), all int64; the K images of an identity are
    adjacent.
    `aug` takes TrainAugment's flip_prob, pad, erasing_prob."""
    if p < 1 or k < 1:
        raise ValueError(f"p={p}, k={k}: both must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers is {num_workers}; must be >= 0")
    unknown = set(aug) - {"flip_prob", "pad", "erasing_prob"}
    if unknown:
        raise TypeError(f"train_batches got unexpected keyword arguments {sorted(unknown)}")
    manifest = load_manifest(shards_dir)
    if manifest["num_classes"] < p:
        raise ValueError(f"{shards_dir}: the train split has {manifest['num_classes']} identities, fewer "
                         f"than P={p}; a batch needs P distinct identities: lower data.p")
    for entry in manifest["splits"]["train"]["shards"]:
        check_shard(Path(shards_dir) / entry["name"], entry, verify=False)
    steps = epoch_steps(manifest, p, k, world_size, steps_per_epoch)
    if steps < 1:
        raise ValueError(f"steps_per_epoch is {steps}; must be >= 1")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} is outside the epoch's {steps} steps")
    dataset = _TrainSteps(str(shards_dir), manifest, p=p, k=k, rank=rank, world_size=world_size,
                          epoch=epoch, seed=seed, steps=steps, start_step=start_step,
                          image_size=(int(image_size[0]), int(image_size[1])), augment=augment, aug=aug,
                          verify=verify, window_images=window_images)
    return TrainBatches(dataset, num_workers, timeout_s)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, disjoint index ranges whose union is [0, total), sizes differing by at most one."""
    return total * rank // world_size, total * (rank + 1) // world_size


class _EvalBatches(IterableDataset):
    def __init__(self, shards_dir: str, manifest: dict, split: str, *, lo: int, hi: int, batch_size: int,
                 image_size: tuple[int, int], verify: bool):
        super().__init__()
        self.shards_dir, self.split, self.lo, self.hi = shards_dir, split, lo, hi
        self.batch_size, self.image_size, self.verify = batch_size, image_size, verify
        self.layout = split_layout(manifest, split)
        self.starts = [first for _, first in self.layout]

    def __len__(self) -> int:
        return -(-(self.hi - self.lo) // self.batch_size)

    def _locate(self, index: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - self.starts[shard]

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = [(b, range(self.lo + b * self.batch_size, min(self.hi, self.lo + (b + 1) * self.batch_size)))
                   for b in range(len(self)) if b % workers == worker]
        if not batches:
            return
        wanted: dict[int, list[int]] = {}
        for _, indices in batches:
            for index in indices:
                shard, pos = self._locate(index)
                wanted.setdefault(shard, []).append(pos)
        streams = {}

        def sample_at(index: int):
            shard, pos = self._locate(index)
            if shard not in streams:
                streams.clear()     # indices only grow: the previous shard is done
                entry, first = self.layout[shard]
                path = Path(self.shards_dir) / entry["name"]
                check_shard(path, entry, self.verify)
                streams[shard] = iter_samples(path, self.split, first, entry["samples"], wanted[shard])
            sample = next(streams[shard], None)
            if sample is None or sample.position != pos:
                raise ShardError(f"shard {self.layout[shard][0]['name']}: expected sample {pos}, got "
                                 f"{None if sample is None else sample.position}")
            return sample

        for _, indices in batches:
            images, pids, camids, index_out, corrupt = [], [], [], [], 0
            for index in indices:
                sample = sample_at(index)
                try:
                    images.append(decode(sample.image, self.image_size))
                except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt image
                    corrupt += 1
                    warnings.warn(f"corrupt image {sample.key} (source {sample.meta.get('source')}) in "
                                  f"{self.split}: using a mean-colour image in its place ({exc})", stacklevel=2)
                    images.append(np.full((*self.image_size, 3), transforms.MEAN_UINT8, np.uint8))
                pids.append(sample.meta["pid"])
                camids.append(sample.meta["camid"])
                index_out.append(sample.meta["index"])
            out = {"images": transforms.normalize(_to_tensor(images)),
                   "pids": torch.tensor(pids, dtype=torch.int64),
                   "camids": torch.tensor(camids, dtype=torch.int64),
                   "index": torch.tensor(index_out, dtype=torch.int64)}
            yield out, corrupt


class EvalBatches:
    """A rank's part of an evaluation split, in index order; `.stats` counts corrupt images."""

    def __init__(self, dataset: _EvalBatches, num_workers: int, timeout_s: float):
        self.dataset, self.num_workers, self.timeout_s = dataset, num_workers, timeout_s
        self.stats = {"corrupt_images": 0}

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        with _workers(self.dataset, min(self.num_workers, len(self.dataset)), self.timeout_s) as source:
            for batch, corrupt in source:
                self.stats["corrupt_images"] += int(corrupt)
                yield batch


def eval_batches(shards_dir: str | Path, split: str, *, batch_size: int, image_size: tuple[int, int] | list[int],
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, verify: bool = True,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> EvalBatches:
    """Batches of `split` ("query" or "gallery"; "train" works too) for one rank: `images` (normalised
    float), `pids`, `camids`, `index` (int64 position in the split). Ranks get contiguous, disjoint parts
    whose union is the whole split; within a rank the order is the index order."""
    if split not in ("train", "query", "gallery"):
        raise ValueError(f"split is {split!r}; one of train, query, gallery")
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    manifest = load_manifest(shards_dir)
    lo, hi = rank_range(manifest["splits"][split]["images"], rank, world_size)
    dataset = _EvalBatches(str(shards_dir), manifest, split, lo=lo, hi=hi, batch_size=batch_size,
                           image_size=(int(image_size[0]), int(image_size[1])), verify=verify)
    return EvalBatches(dataset, num_workers, timeout_s)


def read_images(shards_dir: str | Path, split: str, indices: list[int], verify: bool = False) -> list[Image.Image]:
    """The original images at `indices` of `split` (in the order given), for ranked-list pictures."""
    manifest = load_manifest(shards_dir)
    layout = split_layout(manifest, split)
    starts = [first for _, first in layout]
    total = manifest["splits"][split]["images"]
    wanted: dict[int, list[int]] = {}
    for index in indices:
        if not 0 <= index < total:
            raise IndexError(f"{split} index {index} outside [0, {total})")
        shard = int(np.searchsorted(starts, index, side="right")) - 1
        wanted.setdefault(shard, []).append(index - starts[shard])
    found = {}
    for shard, positions in wanted.items():
        entry, first = layout[shard]
        for pos, sample in read_samples(shards_dir, split, entry, first, positions, verify).items():
            with Image.open(io.BytesIO(sample.image)) as im:
                found[first + pos] = im.convert("RGB")
    return [found[i] for i in indices]
