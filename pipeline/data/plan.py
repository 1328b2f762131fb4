"""The epoch plan: which identities and images make each P×K batch of each rank (metadata only).

Every step is a pure function of the manifests and (seed, epoch, rank, world_size), so every process
computes the same plan without talking to the others; nothing here reads an image.

Several shard sets train as one (`TrainSets`): their train shards are listed in set order, and
identities are namespaced so that no two sets share one: set d's pid p becomes the global pid
`pid_offsets[d] + p`, where the offsets add up `max pid + 1` of the sets before it, and its label
becomes `label_offsets[d] + label`, so labels are contiguous over the union (set order, then each
manifest's label order). With one set the offsets are 0: pids and labels are the manifest's.

How an epoch is made:

1. Identities to ranks. The train shards (of all sets) are permuted with a seed all ranks share; their
   identities, in shard order, form one stream that is cut into `world_size` contiguous segments of
   about equal image count, each with at least P identities. Segments are disjoint, so in every step
   different ranks hold different identities, and each rank reads about 1/world_size of the data.
   With fewer than world_size·P identities, disjoint batches are impossible and every rank uses all
   identities (with its own randomness).
2. Groups. The rank's epoch has a fixed length (`steps`, the same on every rank) and needs steps·P
   groups of K images. They are apportioned to identities in proportion to their image counts; each
   identity's groups walk through a fresh permutation of its images, so images repeat only once all
   are used (an identity with fewer than K images is sampled with replacement). With balanced
   segments this uses nearly every image once per epoch.
3. Batches. The segment is cut into windows of consecutive identities (`window_images` images, at least
   2P identities); a window's groups are shuffled and assembled greedily into batches of P distinct
   identities, a group whose identity is already in the batch waiting for the next one. Leftovers
   at the end are topped up with fresh groups, so the rank never runs dry.

An epoch re-cut for another world size (`plan_rank` with `cuts`). A run that resumes mid-epoch on
another number of ranks finishes the epoch with the batches the previous ranks had not used yet: every
old rank's remaining steps, in old-rank order, are laid end to end and cut into `world_size` equal
contiguous pieces, one per new rank (`Cut.remaining // world_size` steps each; the last
`remaining % world_size` batches, fewer than one step, are dropped). Each piece keeps its shards' reading
order. A step of a re-cut epoch may give two ranks the same identity (when a piece boundary falls
inside one old rank's plan); the loss compares pids across ranks, so it stays correct. A re-cut epoch
can be re-cut again (a chain of `Cut`s, oldest first); the next epoch is planned for the new world
size as usual.
"""
from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_WINDOW_IMAGES = 4096
_SHARDS, _RANK = 1, 2     # stream tags: distinct seeds for distinct purposes


def make_rng(*keys: int) -> np.random.Generator:
    """A generator that derives from explicit integers only, never from global RNG state."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


@dataclass(frozen=True)
class Identity:
    shard: int       # index of its train shard in TrainSets.shards
    pid: int         # global pid (the set's pid + its offset)
    start: int       # position of its first image within the shard
    count: int
    dataset: int = 0  # index of its shard set


@dataclass(frozen=True)
class Group:
    identity: Identity
    positions: tuple[int, ...]   # K positions within the shard


class TrainSets:
    """The train splits of one or more shard sets (their manifests, in order) seen as one."""

    def __init__(self, manifests: dict | list[dict]):
        self.manifests = [manifests] if isinstance(manifests, dict) else list(manifests)
        self.shards: list[tuple[int, dict, int]] = []   # (set, shard entry, index of its first sample)
        self.image_base: list[int] = []                 # global image id of each shard's first sample
        self.pid_offsets, self.label_offsets = [], []
        self.label_maps: list[dict[int, int]] = []
        pid_offset = label_offset = images = 0
        for d, manifest in enumerate(self.manifests):
            first = 0
            for entry in manifest["splits"]["train"]["shards"]:
                self.shards.append((d, entry, first))
                self.image_base.append(images + first)
                first += entry["samples"]
            images += first
            label_map = {int(pid): int(label) for pid, label in manifest["label_map"].items()}
            if len(self.manifests) > 1 and min(label_map) < 0:
                raise ValueError(f"shard set {d} has negative train pids; several sets need pids >= 0")
            self.label_maps.append(label_map)
            self.pid_offsets.append(pid_offset)
            self.label_offsets.append(label_offset)
            pid_offset += max(label_map) + 1
            label_offset += int(manifest["num_classes"])
        self.num_classes, self.images = label_offset, images

    def __len__(self) -> int:
        return len(self.manifests)

    def global_pid(self, dataset: int, pid: int) -> int:
        return self.pid_offsets[dataset] + int(pid)

    def label(self, dataset: int, pid: int) -> int:
        """The union label of set `dataset`'s pid `pid` (its own pid, not the global one)."""
        return self.label_offsets[dataset] + self.label_maps[dataset][int(pid)]


def as_train_sets(manifests) -> TrainSets:
    return manifests if isinstance(manifests, TrainSets) else TrainSets(manifests)


def train_identities(manifests) -> list[list[Identity]]:
    """Identities of every train shard of the union, in shard order (from the manifests' `ids` runs)."""
    sets = as_train_sets(manifests)
    out = []
    for shard, (d, entry, _) in enumerate(sets.shards):
        ids, start = [], 0
        for pid, count in entry["ids"]:
            ids.append(Identity(shard, sets.global_pid(d, pid), start, int(count), d))
            start += int(count)
        out.append(ids)
    return out


def epoch_steps(manifests, p: int, k: int, world_size: int, steps_per_epoch: int | None = None) -> int:
    """Steps per epoch, identical on every rank: fixed by the manifests unless given."""
    if steps_per_epoch is not None:
        return int(steps_per_epoch)
    return max(1, as_train_sets(manifests).images // (world_size * p * k))


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


def plan_epoch(manifests, *, p: int, k: int, rank: int, world_size: int, epoch: int, seed: int,
               steps: int, window_images: int = DEFAULT_WINDOW_IMAGES) -> Iterator[tuple[int, list[Group]]]:
    """(window number, batch of P groups) for each step of the rank's epoch, in step order.
    `manifests`: one manifest, a list of them (several shard sets), or a TrainSets."""
    segment = rank_segment(train_identities(manifests), p=p, rank=rank, world_size=world_size,
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
# Re-cutting an epoch for another world size
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cut:
    """Part of an epoch trained at another world size: each of its `world_size` ranks had a plan of
    `steps` steps and ran the first `done`."""
    world_size: int
    steps: int
    done: int

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.done <= self.steps:
            raise ValueError(f"invalid epoch cut {self}: needs world_size >= 1 and 0 <= done <= steps")

    @property
    def remaining(self) -> int:
        """Batches its ranks had not used, over all of them."""
        return (self.steps - self.done) * self.world_size

    def as_dict(self) -> dict[str, int]:
        return {"world_size": self.world_size, "steps": self.steps, "done": self.done}


def as_cuts(cuts: Sequence[Cut | dict] | None) -> list[Cut]:
    return [c if isinstance(c, Cut) else Cut(int(c["world_size"]), int(c["steps"]), int(c["done"]))
            for c in (cuts or [])]


def cut_steps(cuts: Sequence[Cut | dict], world_size: int) -> int:
    """Steps of every rank in an epoch re-cut after `cuts` for `world_size` ranks (0: nothing left)."""
    cuts = as_cuts(cuts)
    return cuts[-1].remaining // world_size


def epoch_fraction(cuts: Sequence[Cut | dict], step: int, steps: int) -> float:
    """The share of the epoch done after `step` of the current `steps` steps, with `cuts` before them:
    each earlier world did `done / steps` of what was left to it. 1.0 at the epoch's last step."""
    done, left = 0.0, 1.0
    for cut in as_cuts(cuts):
        share = cut.done / cut.steps if cut.steps else 1.0
        done, left = done + left * share, left * (1.0 - share)
    return done + left * (step / steps if steps else 1.0)


def plan_rank(manifests, *, p: int, k: int, rank: int, world_size: int, epoch: int, seed: int, steps: int,
              cuts: Sequence[Cut | dict] = (), window_images: int = DEFAULT_WINDOW_IMAGES
              ) -> Iterator[tuple[tuple[int, ...], list[Group]]]:
    """(reading key, batch of P groups) for each step of the rank's epoch. Without `cuts` it is
    plan_epoch (`steps` per rank; key: (window,)). With `cuts`, `steps` is that of the first cut's world
    (the epoch as planned) and the rank's share of the re-cut epoch follows (module docstring; key:
    (old rank, ..., window)): batches with the same key are read in one pass."""
    cuts = as_cuts(cuts)
    sets = as_train_sets(manifests)
    if not cuts:
        for number, batch in plan_epoch(sets, p=p, k=k, rank=rank, world_size=world_size, epoch=epoch, seed=seed,
                                        steps=steps, window_images=window_images):
            yield (number,), batch
        return
    *earlier, last = cuts
    expected = cut_steps(earlier, last.world_size) if earlier else steps
    if last.steps != expected:
        raise ValueError(f"epoch cut {last} does not follow the cuts before it ({expected} steps per rank)")
    n = last.remaining // world_size
    per_old = last.steps - last.done
    lo, hi = rank * n, (rank + 1) * n
    for old in range(lo // per_old, (hi - 1) // per_old + 1) if n else ():
        first = max(lo, old * per_old) - old * per_old + last.done
        stop = min(hi, (old + 1) * per_old) - old * per_old + last.done
        plan = plan_rank(sets, p=p, k=k, rank=old, world_size=last.world_size, epoch=epoch, seed=seed,
                         steps=steps, cuts=earlier, window_images=window_images)
        for key, batch in itertools.islice(plan, first, stop):
            yield (old, *key), batch
