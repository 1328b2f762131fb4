"""Decode once (`data.decode_cache`): every train image decoded at most once per process, kept as uint8.

`DecodeCache` holds one row per train image of the shard sets ([N, 3, H, W] uint8 at the training
size) in host memory (`host`) or in the training device's memory (`device`), plus each image's
metadata (global pid, label, camid, index, set) and a state (unknown, decoded, corrupt).

How the stream uses it (stream.py): the cache lives in the training process, never in DataLoader
workers. At the start of an epoch the workers get a copy of the states; every worker computes the
whole plan, so each knows the step that first uses each image not yet decoded, and the worker that
owns that step decodes it (and only it) and ships its pixels with that step. The training process
stores them and assembles every batch with one `index_select` from the cache (on the device for
`device`, so the P×K pixels never cross the bus again; `TrainAugment` then runs there too; batches are
channels_last views, as the streaming path's). Each image
is therefore decoded once per process whatever the number of workers, decoding still runs in
parallel in the workers during the first epochs, and once every image is cached a step reads no
shard at all. Batches equal the streaming path's (`decode_cache=none`) for the same seed, epoch and
step: same images chosen, same decoder, same pixels (tests/test_data_decoded.py). Corrupt images are
found once and remembered; the training process decodes their replacement itself when no step has
yet (that image may then be decoded a second time by the step that first uses it).

Memory: N·H·W·3 bytes per process, checked against what is available before the first batch
(`MemoryError` saying how much is needed and how much there is). Every rank sees other identities each
epoch, so after a few epochs every rank's cache holds the whole train split: a node with R ranks needs
R times the figure (`ranks_per_node`). Market-1501 at 256×128: 1.27 GB per rank; MSMT17: 3.2 GB.
"""
from __future__ import annotations

import numpy as np
import psutil
import torch

UNKNOWN, DECODED, CORRUPT = 0, 1, 2
META = ("pids", "labels", "camids", "index", "dataset")   # columns of DecodeCache.meta
_HEADROOM = 0.9   # use at most this share of the available memory


def cache_bytes(images: int, image_size: tuple[int, int]) -> int:
    """Bytes one process's cache takes: pixels plus metadata."""
    return images * (3 * image_size[0] * image_size[1] + 8 * len(META) + 1)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class DecodeCache:
    """One process's decoded train images (see the module docstring).

    kind: "host" (CPU memory) or "device" (`device`'s memory). `available` overrides the measured
    free memory (for tests); `ranks_per_node` processes are assumed to build one each."""

    def __init__(self, images: int, image_size: tuple[int, int], *, kind: str = "host",
                 device: torch.device | str | None = None, ranks_per_node: int = 1,
                 available: int | None = None, key: tuple = ()):
        if kind not in ("host", "device"):
            raise ValueError(f"decode_cache is {kind!r}; one of none, host, device")
        self.kind, self.key = kind, key
        self.device = torch.device("cpu") if kind == "host" else torch.device(device or "cpu")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        need = cache_bytes(images, self.image_size) * max(1, ranks_per_node)
        have = available_bytes(self.device) if available is None else int(available)
        if need > _HEADROOM * have:
            where = "host memory" if self.device.type == "cpu" else f"{self.device} memory"
            raise MemoryError(
                f"data.decode_cache={kind} needs {_gb(need)} of {where} ({images} train images x "
                f"{self.image_size[0]}x{self.image_size[1]}x3 bytes per process x {ranks_per_node} process(es) "
                f"on this node) but {_gb(have)} is available (at most {int(_HEADROOM * 100)}% is used). Set "
                "data.decode_cache=none, a smaller data.image_size, or fewer processes per node.")
        # [N, H, W, 3]: rows are copied in and out without transposing; batches are channels_last views
        self.pixels = torch.empty((images, *self.image_size, 3), dtype=torch.uint8, device=self.device)
        self.meta = torch.zeros((images, len(META)), dtype=torch.int64)
        self.state = np.zeros(images, dtype=np.int8)

    def __len__(self) -> int:
        return int(self.state.shape[0])

    @property
    def decoded(self) -> int:
        return int((self.state == DECODED).sum())

    def store(self, ids: torch.Tensor, pixels: torch.Tensor, meta: torch.Tensor) -> None:
        if ids.numel():
            self.pixels[ids.to(self.device)] = pixels.permute(0, 2, 3, 1).to(self.device, non_blocking=True)
            self.meta[ids] = meta
            self.state[ids.numpy()] = DECODED

    def mark_corrupt(self, ids: torch.Tensor | list[int]) -> None:
        self.state[np.asarray(ids, dtype=np.int64)] = CORRUPT

    def batch(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of images `ids` (all decoded): `images` on the cache's device, metadata on the CPU."""
        states = self.state[ids.numpy()]
        if (states != DECODED).any():
            raise RuntimeError(f"decode cache: images {ids[torch.from_numpy(states != DECODED)][:5].tolist()} "
                               "were never decoded (a bug in the stream)")
        out = {"images": self.pixels.index_select(0, ids.to(self.device)).permute(0, 3, 1, 2)}
        meta = self.meta.index_select(0, ids)
        out.update({name: meta[:, i].contiguous() for i, name in enumerate(META)})
        return out


_CACHES: dict[tuple, DecodeCache] = {}


def shared_cache(key: tuple, images: int, image_size: tuple[int, int], *, kind: str, device=None,
                 ranks_per_node: int = 1, available: int | None = None) -> DecodeCache:
    """The process's cache for `key` (shard sets, image size, kind, device), created on first use and
    reused by every later `train_batches` call (one per epoch). One cache is kept: a new key frees the
    previous one."""
    cache = _CACHES.get(key)
    if cache is None:
        _CACHES.clear()
        cache = DecodeCache(images, image_size, kind=kind, device=device, ranks_per_node=ranks_per_node,
                            available=available, key=key)
        _CACHES[key] = cache
    return cache


def release_caches() -> None:
    """Free the process's decode caches."""
    _CACHES.clear()
