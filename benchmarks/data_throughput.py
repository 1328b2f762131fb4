"""Training-data throughput: `train_batches` against the usual map-style loaders, side by side, one run.

Every figure is images per second of uint8 P×K batches at the training size (what the trainer gets;
it augments them on its device), medians of interleaved repeats, one core (torch threads 1, no
workers) unless said otherwise. Baselines:

- local: a PIL map-style folder loader (one JPEG file per item, PIL decode + bilinear resize, random
  P×K identity sampler) against the shard stream (decode_cache=none), and the shard stream with
  decode_cache=host once its cache is warm (after the first epoch);
- HTTP: the same folder loader fetching each JPEG with its own GET (a kept-alive connection) against
  the shard stream reading the shards over HTTP; both from a real HTTP server on 127.0.0.1 that sleeps
  `--delay-ms` (2 ms) per request, started by this script as a separate process;
- scaling: 1 against 2 DataLoader workers, for both loaders;
- decode once: how many images the host cache decodes with 2 workers, against the images used;
- augmentation alone: TrainAugment against kornia's modules (when kornia is installed: `.[bench]`).

    python benchmarks/data_throughput.py                       # about 3 minutes on 2 busy cores
    python benchmarks/data_throughput.py --train-ids 300 --steps 60 --repeats 5
"""
from __future__ import annotations

import argparse
import http.client
import http.server
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data import DecodeCache, load_manifest, train_batches  # noqa: E402
from pipeline.data.datasets import parse_market1501  # noqa: E402
from pipeline.data.images import decoder_name  # noqa: E402
from pipeline.data.shards import write_shards  # noqa: E402
from pipeline.data.synthetic import make_synthetic  # noqa: E402
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainAugment  # noqa: E402


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------
def _pil_uint8(data_or_path, size: tuple[int, int]) -> torch.Tensor:
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(src) as im:
        im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


class FolderImages(Dataset):
    """The baseline: one JPEG per item (a file, or an HTTP GET when `url` is given), PIL decode + resize."""

    def __init__(self, records, image_size: tuple[int, int], root: Path, url: str | None = None):
        self.records, self.size, self.root, self.url = records, image_size, root, url
        self.conn = None

    def __len__(self) -> int:
        return len(self.records)

    def _get(self, path: Path) -> bytes:
        if self.conn is None:       # one kept-alive connection per process (a strong baseline)
            u = urlparse(self.url)
            self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        self.conn.request("GET", "/raw/" + path.relative_to(self.root).as_posix())
        resp = self.conn.getresponse()
        data = resp.read()
        assert resp.status == 200, resp.status
        return data

    def __getitem__(self, i: int):
        r = self.records[i]
        return _pil_uint8(self._get(r.path) if self.url else r.path, self.size), r.pid


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


def folder_loader(records, size, root, p, k, seed, workers, url=None):
    return DataLoader(FolderImages(records, size, root, url), batch_sampler=PKSampler(records, p, k, seed),
                      num_workers=workers)


def rate(batches, steps: int) -> float:
    """Images per second over `steps` batches (after one warm-up batch)."""
    it = iter(batches)
    next(it)
    n, start = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        n += (batch["images"] if isinstance(batch, dict) else batch[0]).shape[0]
    return n / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------
# The HTTP server (a separate process: `--serve DIR`)
# --------------------------------------------------------------------------------------------------
def serve(directory: str, port: int, delay_ms: float) -> None:
    class Slow(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"      # keep-alive, so the per-file baseline pays no reconnects
        disable_nagle_algorithm = True     # else headers and body in two packets wait for a delayed ACK

        def __init__(self, *a, **kw):
            super().__init__(*a, directory=directory, **kw)

        def do_GET(self):
            time.sleep(delay_ms / 1000)
            super().do_GET()

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", port), Slow).serve_forever()


def start_server(directory: Path, delay_ms: float) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(directory), "--port", str(port),
                             "--delay-ms", str(delay_ms)], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the benchmark's HTTP server did not start")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------
def compare(label: str, measures: dict, repeats: int) -> dict[str, float]:
    """Run each measurement `repeats` times, interleaved; print medians and ratios to the first."""
    got: dict[str, list[float]] = {name: [] for name in measures}
    for r in range(repeats):
        for name, fn in measures.items():
            got[name].append(fn(r))
    med = {name: statistics.median(v) for name, v in got.items()}
    names = list(med)
    base = med[names[0]]
    parts = [f"{name}: {med[name]:8.0f}" + ("" if i == 0 else f" ({med[name] / base:.2f}x)")
             for i, name in enumerate(names)]
    print(f"{label:<34} " + "   ".join(parts), flush=True)
    return med


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-ids", type=int, default=60)
    ap.add_argument("--source-size", default="128x64", help="HxW of the synthetic JPEGs (Market crops: 128x64)")
    ap.add_argument("--image-size", default="256x128", help="HxW the loaders produce")
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="timed batches per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved measurements; the median is reported")
    ap.add_argument("--delay-ms", type=float, default=2.0, help="the HTTP server's added time per request")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.delay_ms)
        return 0
    torch.set_num_threads(1)
    source = tuple(int(v) for v in args.source_size.split("x"))
    size = tuple(int(v) for v in args.image_size.split("x"))
    p, k, steps = args.p, args.k, args.steps

    with tempfile.TemporaryDirectory() as tmp:
        raw, shards = Path(tmp) / "raw", Path(tmp) / "shards"
        make_synthetic(raw, train_ids=args.train_ids, test_ids=2, image_size=source, progress=False)
        dataset = parse_market1501(raw)
        records = dataset.splits["train"]
        write_shards(dataset, shards, progress=False)
        n_images = load_manifest(shards)["splits"]["train"]["images"]
        print(f"{len(records)} train images at {source[0]}x{source[1]} -> batches P={p} x K={k} at "
              f"{size[0]}x{size[1]} uint8; {steps} timed batches, median of {args.repeats}; decoder: "
              f"{decoder_name()}; torch {torch.__version__}", flush=True)

        def ours(r, workers=0, shards_at=shards, **kw):
            return rate(train_batches(shards_at, p=p, k=k, rank=0, world_size=1, epoch=r, image_size=size,
                                      steps_per_epoch=steps + 1, num_workers=workers, **kw), steps)

        def folder(r, workers=0, url=None):
            return rate(folder_loader(records, size, raw, p, k, r, workers, url), steps)

        cache = DecodeCache(n_images, size)
        warm = train_batches(shards, p=p, k=k, rank=0, world_size=1, epoch=100, image_size=size,
                             decode_cache=cache)
        for _ in warm:          # the first epoch: fills the cache
            pass
        print(f"(host cache warmed by one epoch: {cache.decoded} of {n_images} images decoded)")
        compare("local, 1 core, images/s", {
            "folder+PIL": folder, "shards": ours,
            "shards+host cache": lambda r: ours(r, decode_cache=cache)}, args.repeats)

        server, url = start_server(Path(tmp), args.delay_ms)
        try:
            compare(f"HTTP (+{args.delay_ms:g} ms/request), images/s", {
                "per-file GET+PIL": lambda r: folder(r, url=url),
                "shards over HTTP": lambda r: ours(r, shards_at=f"{url}/shards/")}, args.repeats)
        finally:
            server.kill()
            server.wait()

        one = compare("folder+PIL: 1 -> 2 workers", {
            "1 worker": lambda r: folder(r, 1), "2 workers": lambda r: folder(r, 2)}, args.repeats)
        two = compare("shards: 1 -> 2 workers", {
            "1 worker": lambda r: ours(r, 1), "2 workers": lambda r: ours(r, 2)}, args.repeats)
        print(f"{'shards (1 worker) vs folder+PIL (1 worker)':<34} {two['1 worker'] / one['1 worker']:.2f}x")

        once = DecodeCache(n_images, size)
        decoded, used = 0, set()
        for epoch in range(2):
            loader = train_batches(shards, p=p, k=k, rank=0, world_size=1, epoch=epoch, image_size=size,
                                   num_workers=2, decode_cache=once)
            for batch in loader:
                used.update(batch["index"].tolist())
            decoded += loader.stats["decoded"]
        print(f"{'decode once, 2 workers, 2 epochs':<34} images decoded: {decoded}   distinct images used: "
              f"{len(used)}")

    augment = TrainAugment(size)
    x = torch.randint(0, 256, (p * k, 3, *size), dtype=torch.uint8)
    try:
        import kornia.augmentation as KA
    except ImportError:
        print("augmentation only: kornia not installed (pip install -e '.[bench]')")
        return 0
    kornia = torch.nn.Sequential(KA.RandomHorizontalFlip(), KA.RandomCrop(size, padding=10),
                                 KA.Normalize(torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)),
                                 KA.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3)))

    def ms(fn):
        t = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t)

    times = {"kornia": [], "ours": []}
    for _ in range(3 * args.repeats):
        times["kornia"].append(ms(lambda: kornia(x.float() / 255)))
        times["ours"].append(ms(lambda: augment(x)))
    k_ms, o_ms = (statistics.median(times[n]) for n in ("kornia", "ours"))
    print(f"{'augmentation only, ms/batch':<34} kornia modules: {k_ms:8.1f}   TrainAugment: {o_ms:8.1f} "
          f"({k_ms / o_ms:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
