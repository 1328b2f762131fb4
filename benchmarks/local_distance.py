"""Test-time aligned local distance: ours (`pipeline.alignment.local_distance`) against the method of
the public reproductions, in one run on the same features.

Baseline (re-implemented here from its description): NumPy, in blocks of 200 x 200 images; per block
the Euclidean matrix of all stripes, the element distance (e^d - 1) / (e^d + 1), then a Python loop
over the m x n cells, each vectorised over the block's pairs (np.stack + np.min).
Ours: wavefront DP (m + n - 1 vectorised steps), one augmented matmul per block, element distance in
place, blocks of `chunk_size` pairs.

Memory: each side runs in a fresh subprocess; the kernel's peak-RSS counter is reset
(/proc/self/clear_refs = 5) right before the call and the peak RSS delta (VmHWM after - VmRSS before)
is the memory the call needed (result included), measured the same way for both sides. For NumPy
tracemalloc's peak of traced allocations is printed as well (NumPy reports its buffers to it; torch's
CPU allocator does not, hence RSS for the comparison).

    python benchmarks/local_distance.py                    # 1,000 x 5,000 pairs, m = n = 8, c = 128
    python benchmarks/local_distance.py --market           # + ours on Market-1501 size (3,368 x 15,913)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--gallery", type=int, default=5000)
    ap.add_argument("--stripes", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=200, help="baseline block size (images per side)")
    ap.add_argument("--chunk-size", type=int, default=None, help="ours: pairs per block (default: library's)")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per side (median reported)")
    ap.add_argument("--market", action="store_true", help="also time ours on 3,368 x 15,913 (Market-1501)")
    ap.add_argument("--side", choices=["numpy", "torch"], help=argparse.SUPPRESS)  # child process
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args()


def features(count: int, stripes: int, dim: int, seed: int) -> np.ndarray:
    """Post-ReLU stripe features, like the local branch's output."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal((count, stripes, dim), dtype=np.float32), 0.0)


def baseline_block(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    big_m, m, c = x.shape
    big_n, n, _ = y.shape
    a, b = x.reshape(big_m * m, c), y.reshape(big_n * n, c)
    sq = -2.0 * a @ b.T + np.square(a).sum(1)[:, None] + np.square(b).sum(1)[None, :]
    sq[sq < 0] = 0
    d = np.sqrt(sq)
    d = (np.exp(d) - 1.0) / (np.exp(d) + 1.0)
    d = d.reshape(big_m, m, big_n, n).transpose(1, 3, 0, 2)        # [m, n, M, N]
    s = np.zeros_like(d)
    for i in range(m):
        for j in range(n):
            if i == 0 and j == 0:
                s[i, j] = d[i, j]
            elif i == 0:
                s[i, j] = s[i, j - 1] + d[i, j]
            elif j == 0:
                s[i, j] = s[i - 1, j] + d[i, j]
            else:
                s[i, j] = np.min(np.stack([s[i - 1, j], s[i, j - 1]]), axis=0) + d[i, j]
    return s[-1, -1].copy()


def baseline_local_distance(x: np.ndarray, y: np.ndarray, block: int) -> np.ndarray:
    out = np.empty((len(x), len(y)), dtype=np.float32)
    for i in range(0, len(x), block):
        for j in range(0, len(y), block):
            out[i:i + block, j:j + block] = baseline_block(x[i:i + block], y[j:j + block])
    return out


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_delta_mb(fn) -> tuple[object, float]:
    """Run fn() and return (result, peak RSS growth in MB during it)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    result = fn()
    return result, (_status_kb("VmHWM") - before) / 1024


def child(args: argparse.Namespace) -> None:
    """Measure one side in this fresh process; write its figures (and result) next to args.out."""
    x = features(args.queries, args.stripes, args.dim, seed=0)
    y = features(args.gallery, args.stripes, args.dim, seed=1)
    figures: dict = {}
    if args.side == "numpy":
        run = lambda: baseline_local_distance(x, y, args.block)  # noqa: E731
        figures["threads"] = f"NumPy/OpenBLAS ({os.environ.get('OPENBLAS_NUM_THREADS', 'default')} threads)"
    else:
        import torch

        from pipeline.alignment import local_distance

        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        local_distance(xt[:4], yt[:4])   # load kernels / thread pool outside the measurement
        run = lambda: local_distance(xt, yt, chunk_size=args.chunk_size).numpy()  # noqa: E731
        figures["threads"] = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    result, figures["rss_mb"] = peak_rss_delta_mb(run)
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    figures["seconds"] = statistics.median(times)
    if args.side == "numpy":
        tracemalloc.start()
        run()
        figures["tracemalloc_mb"] = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.stop()
    np.save(args.out + ".npy", result)
    Path(args.out).write_text(json.dumps(figures))


def launch(side: str, args: argparse.Namespace, out: Path, queries: int, gallery: int, repeat: int) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--out", str(out), "--queries", str(queries),
           "--gallery", str(gallery), "--stripes", str(args.stripes), "--dim", str(args.dim),
           "--block", str(args.block), "--repeat", str(repeat)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    subprocess.run(cmd, check=True, timeout=3600)
    return json.loads(out.read_text())


def main() -> None:
    args = parse()
    if args.side:
        child(args)
        return
    pairs = args.queries * args.gallery
    print(f"aligned local distance: {args.queries} x {args.gallery} pairs, m = n = {args.stripes}, "
          f"c = {args.dim}, float32, CPU", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = launch("numpy", args, Path(tmp) / "numpy.json", args.queries, args.gallery, args.repeat)
        ours = launch("torch", args, Path(tmp) / "torch.json", args.queries, args.gallery, args.repeat)
        results = [np.load(Path(tmp) / f"{side}.json.npy") for side in ("numpy", "torch")]
        diff = float(np.abs(results[0] - results[1]).max())
        market = None
        if args.market:
            market = launch("torch", args, Path(tmp) / "market.json", 3368, 15913, 1)
    print(f"{'':34}{'time (s)':>10}{'pairs/s':>14}{'peak RSS +MB':>14}")
    for name, fig in (("baseline (NumPy, 200x200 blocks)", base), ("ours (pipeline.alignment)", ours)):
        print(f"{name:34}{fig['seconds']:10.2f}{pairs / fig['seconds']:14,.0f}{fig['rss_mb']:14.1f}   "
              f"{fig['threads']}")
    print(f"baseline tracemalloc peak: {base['tracemalloc_mb']:.1f} MB")
    print(f"speed-up: {base['seconds'] / ours['seconds']:.2f}x (goal >= 3x); memory ratio baseline/ours: "
          f"{base['rss_mb'] / max(ours['rss_mb'], 1e-9):.2f}x; max |difference| {diff:.2e}")
    print("method: median of --repeat calls per side; memory = peak RSS growth during the first call in a "
          "fresh process (VmHWM reset through /proc/self/clear_refs), the [M, N] result included")
    if market is not None:
        print(f"Market-1501 size (3,368 x 15,913), ours: {market['seconds']:.1f} s, peak RSS "
              f"+{market['rss_mb']:.0f} MB (the float32 result alone is {3368 * 15913 * 4 / 2 ** 20:.0f} MB)")


if __name__ == "__main__":
    main()
