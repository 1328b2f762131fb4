"""Training-data throughput: `train_batches` (tar shards, P×K plan, decode + augment) against a
map-style baseline that opens the same JPEG files from a folder with PIL, resizes them and applies the
same `TrainAugment` to each P×K batch; one process each, same run, same images.

    python benchmarks/data_throughput.py                       # < 2 minutes
    python benchmarks/data_throughput.py --train-ids 300 --steps 200 --num-workers 4

Also prints the augmentation alone: `TrainAugment` against kornia's augmentation modules doing the same
steps (flip, pad + random crop, normalise, random erasing) on the same batch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import train_batches  # noqa: E402
from pipeline.data.datasets import parse_market1501  # noqa: E402
from pipeline.data.shards import write_shards  # noqa: E402
from pipeline.data.synthetic import make_synthetic  # noqa: E402
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainAugment  # noqa: E402


class FolderImages(Dataset):
    """The baseline: one JPEG file opened with PIL per item, resized, as a uint8 tensor."""

    def __init__(self, records, image_size: tuple[int, int]):
        self.records, self.size = records, image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        with Image.open(r.path) as im:
            im = im.convert("RGB").resize((self.size[1], self.size[0]), Image.BILINEAR)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1), r.pid


class PKSampler(Sampler):
    """The usual random identity sampler: P identities x K images per batch."""

    def __init__(self, records, p: int, k: int, seed: int = 0):
        self.by_pid: dict[int, list[int]] = {}
        for i, r in enumerate(records):
            self.by_pid.setdefault(r.pid, []).append(i)
        self.p, self.k, self.rng = p, k, np.random.default_rng(seed)

    def __iter__(self):
        pids = list(self.by_pid)
        while True:
            chosen = self.rng.choice(pids, self.p, replace=False)
            batch = []
            for pid in chosen:
                idx = self.by_pid[pid]
                batch.extend(self.rng.choice(idx, self.k, replace=len(idx) < self.k).tolist())
            yield batch


def time_images(batches, steps: int, augment=None) -> float:
    """Images per second over `steps` batches (after one warm-up batch)."""
    it = iter(batches)
    next(it)
    n, start = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        images = batch["images"] if isinstance(batch, dict) else augment(batch[0])
        n += images.shape[0]
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-ids", type=int, default=60)
    ap.add_argument("--source-size", default="128x64", help="HxW of the synthetic JPEGs (Market crops: 128x64)")
    ap.add_argument("--image-size", default="256x128", help="HxW the loaders produce")
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25, help="timed batches per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="alternating measurements; the median is reported")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for both loaders")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: one core)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = tuple(int(v) for v in args.source_size.split("x"))
    size = tuple(int(v) for v in args.image_size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        raw, shards = Path(tmp) / "raw", Path(tmp) / "shards"
        t = time.perf_counter()
        make_synthetic(raw, train_ids=args.train_ids, test_ids=2, image_size=source, progress=False)
        dataset = parse_market1501(raw)
        records = dataset.splits["train"]
        made = time.perf_counter() - t
        t = time.perf_counter()
        write_shards(dataset, shards, progress=False)
        packed = time.perf_counter() - t
        print(f"dataset: {len(records)} train images at {source[0]}x{source[1]} "
              f"(synthesised in {made:.1f}s, packed in {packed:.2f}s = {len(records) / packed:.0f} img/s)")
        print(f"batches: P={args.p} x K={args.k} at {size[0]}x{size[1]}, {args.steps} timed batches, "
              f"{args.num_workers} workers, {args.threads} torch thread(s)")

        augment = TrainAugment(size)
        ours, base = [], []
        for r in range(args.repeats):
            stream = train_batches(shards, p=args.p, k=args.k, rank=0, world_size=1, epoch=r, image_size=size,
                                   steps_per_epoch=args.steps + 1, num_workers=args.num_workers, augment=True)
            ours.append(time_images(stream, args.steps))
            folder = DataLoader(FolderImages(records, size), batch_sampler=PKSampler(records, args.p, args.k, r),
                                num_workers=args.num_workers)
            base.append(time_images(folder, args.steps, augment))
        o, b = statistics.median(ours), statistics.median(base)
        print(f"decode + augment, images/s   baseline (folder + PIL, map-style): {b:8.0f}   "
              f"train_batches (shards): {o:8.0f}   ratio {o / b:.2f}x")

        import kornia.augmentation as KA

        kornia = torch.nn.Sequential(KA.RandomHorizontalFlip(), KA.RandomCrop(size, padding=10),
                                     KA.Normalize(torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)),
                                     KA.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3)))
        x = torch.randint(0, 256, (args.p * args.k, 3, *size), dtype=torch.uint8)
        times = {"kornia": [], "ours": []}
        for _ in range(3 * args.repeats):
            for name, fn in (("kornia", lambda: kornia(x.float() / 255)), ("ours", lambda: augment(x))):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        k_ms, o_ms = (1000 * statistics.median(times[n]) for n in ("kornia", "ours"))
        print(f"augmentation only, ms/batch  kornia modules: {k_ms:8.1f}   TrainAugment: {o_ms:8.1f}   "
              f"ratio {k_ms / o_ms:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
