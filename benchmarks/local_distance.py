"""Test-time aligned local distance: ours (`pipeline.alignment.local_distance`) against the method of
the public reproductions, side by side in one process on the same features, at several sizes.

Baseline (re-implemented here from its description): NumPy, in blocks of 200 x 200 images; per block
the Euclidean matrix of all stripes, the element distance (e^d - 1) / (e^d + 1), then a Python loop
over the m x n cells, each vectorised over the block's pairs (np.stack + np.min).
Ours: wavefront DP (m + n - 1 vectorised steps), one augmented matmul per cache-sized block, element
distance in place, blocks spread over worker threads (see pipeline/alignment.py).

Time: per size, --repeat rounds, each timing one baseline call and one of ours back to back (order
alternating between rounds), after one untimed call of each; printed are the median wall time of each
side and the median of the per-round ratios (with their range), so drifting load on a shared machine
hits both sides alike, and each side's median CPU time per call (all its threads). Both sides get the
same thread count (--threads: torch's intra-op threads and, through threadpoolctl when installed,
OpenBLAS's).

Memory (largest size only): each side runs once in a fresh subprocess; the kernel's peak-RSS counter is
reset (/proc/self/clear_refs = 5) right before the call and the peak RSS delta (VmHWM after - VmRSS
before) is the memory the call needed, the [M, N] result included.

    python benchmarks/local_distance.py                    # 200x800, 400x1600, 1000x5000; m = n = 8, c = 128
    python benchmarks/local_distance.py --sizes 400x1600 --repeat 9
    python benchmarks/local_distance.py --market           # + Market-1501 size (3,368 x 15,913): ours in
                                                           #   full, the baseline estimated from a slice
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARKET = (3368, 15913)
MARKET_SLICE = 400        # baseline at Market size: timed on this many queries x the whole gallery


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200x800,400x1600,1000x5000",
                    help="comma-separated QUERIESxGALLERY sizes (default: %(default)s)")
    ap.add_argument("--stripes", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=200, help="baseline block size (images per side)")
    ap.add_argument("--chunk-size", type=int, default=None, help="ours: pairs per block (default: library's)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed rounds per size (default: 7 below 1M pairs, else 3)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both sides (default: torch's default, i.e. the cores)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS measurement")
    ap.add_argument("--market", action="store_true",
                    help="also ours on 3,368 x 15,913 (Market-1501), baseline estimated from 400 x 15,913")
    ap.add_argument("--side", choices=["numpy", "torch"], help=argparse.SUPPRESS)  # child process
    ap.add_argument("--queries", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--gallery", type=int, help=argparse.SUPPRESS)
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


def set_threads(threads: int | None) -> str:
    """Give both sides `threads` threads (None: leave the defaults); returns what they have."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return (f"torch {torch.__version__} with {torch.get_num_threads()} threads, NumPy's BLAS with "
                f"{os.environ.get('OPENBLAS_NUM_THREADS', 'its default number of')} threads")
    if threads:
        threadpool_limits(limits=threads, user_api="blas")   # for the rest of the process
    blas = ", ".join(f"{info['internal_api']} {info['num_threads']}" for info in threadpool_info()
                     if info["user_api"] == "blas")
    return f"torch {torch.__version__} with {torch.get_num_threads()} threads, NumPy's BLAS ({blas}) threads"


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
    """One call of one side in this fresh process: its time and peak RSS growth, to args.out."""
    import torch

    from pipeline.alignment import local_distance

    set_threads(args.threads)
    x = features(args.queries, args.stripes, args.dim, seed=0)
    y = features(args.gallery, args.stripes, args.dim, seed=1)
    if args.side == "numpy":
        run = lambda: baseline_local_distance(x, y, args.block)  # noqa: E731
    else:
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        local_distance(xt[:4], yt[:4])   # load kernels / thread pool outside the measurement
        run = lambda: local_distance(xt, yt, chunk_size=args.chunk_size)  # noqa: E731
    start = time.perf_counter()
    _, rss_mb = peak_rss_delta_mb(run)
    seconds = time.perf_counter() - start
    Path(args.out).write_text(json.dumps({"seconds": seconds, "rss_mb": rss_mb}))


def launch(side: str, args: argparse.Namespace, queries: int, gallery: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{side}.json"
        cmd = [sys.executable, __file__, "--side", side, "--out", str(out), "--queries", str(queries),
               "--gallery", str(gallery), "--stripes", str(args.stripes), "--dim", str(args.dim),
               "--block", str(args.block)]
        if args.chunk_size:
            cmd += ["--chunk-size", str(args.chunk_size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        subprocess.run(cmd, check=True, timeout=3600)
        return json.loads(out.read_text())


def side_by_side(args: argparse.Namespace, queries: int, gallery: int, repeat: int) -> dict:
    """Interleaved timing of both sides on the same features (see the module docstring)."""
    import torch

    from pipeline.alignment import local_distance

    x = features(queries, args.stripes, args.dim, seed=0)
    y = features(gallery, args.stripes, args.dim, seed=1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    sides = {"baseline": lambda: baseline_local_distance(x, y, args.block),
             "ours": lambda: local_distance(xt, yt, chunk_size=args.chunk_size).numpy()}
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    results = {name: run() for name, run in sides.items()}   # untimed: warm-up, and the answers
    for r in range(repeat):
        for name in (("baseline", "ours") if r % 2 == 0 else ("ours", "baseline")):
            start, start_cpu = time.perf_counter(), time.process_time()
            sides[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    ratios = [b / o for b, o in zip(times["baseline"], times["ours"])]
    return {"baseline": statistics.median(times["baseline"]), "ours": statistics.median(times["ours"]),
            "ratio": statistics.median(ratios), "ratio_range": (min(ratios), max(ratios)),
            "cpu": (statistics.median(cpu["baseline"]), statistics.median(cpu["ours"])),
            "diff": float(np.abs(results["baseline"] - results["ours"]).max())}


def main() -> None:
    args = parse()
    if args.side:
        child(args)
        return
    sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes.split(",")]
    threads = set_threads(args.threads)
    print(f"aligned local distance, m = n = {args.stripes}, c = {args.dim}, float32, CPU; {threads}; "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    print(f"{'size':>12}{'pairs':>11}{'baseline s':>12}{'ours s':>8}{'ratio':>8}{'range':>12}{'rounds':>7}"
          f"{'CPU s: base':>13}{'ours':>7}{'max |diff|':>11}", flush=True)
    for queries, gallery in sizes:
        pairs = queries * gallery
        repeat = args.repeat or (7 if pairs < 1_000_000 else 3)
        fig = side_by_side(args, queries, gallery, repeat)
        spread = "{:.2f}-{:.2f}".format(*fig["ratio_range"])
        print(f"{f'{queries}x{gallery}':>12}{pairs:>11,}{fig['baseline']:>12.3f}{fig['ours']:>8.3f}"
              f"{fig['ratio']:>7.2f}x{spread:>12}{repeat:>7}{fig['cpu'][0]:>13.3f}{fig['cpu'][1]:>7.3f}"
              f"{fig['diff']:>11.1e}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end. ratio: median over rounds of baseline/ours "
          "wall time (one call of each per round, order alternating), range: its min-max; goal >= 3x. CPU s: "
          "median process CPU time per call, all threads (on a busy machine the wall ratio follows it)",
          flush=True)
    if not args.no_memory:
        queries, gallery = max(sizes, key=lambda s: s[0] * s[1])
        base, ours = (launch(side, args, queries, gallery) for side in ("numpy", "torch"))
        print(f"memory at {queries} x {gallery} (one call in a fresh process per side, peak RSS growth, the "
              f"{queries * gallery * 4 / 2 ** 20:.0f} MB result included): baseline {base['rss_mb']:.0f} MB, "
              f"ours {ours['rss_mb']:.0f} MB", flush=True)
    if args.market:
        ours = launch("torch", args, *MARKET)
        fig = side_by_side(args, MARKET_SLICE, MARKET[1], 1)
        scale = MARKET[0] / MARKET_SLICE
        print(f"Market-1501 size ({MARKET[0]:,} x {MARKET[1]:,}): ours {ours['seconds']:.1f} s measured (one "
              f"call, fresh process; peak RSS +{ours['rss_mb']:.0f} MB, the result alone "
              f"{MARKET[0] * MARKET[1] * 4 / 2 ** 20:.0f} MB); baseline ~{fig['baseline'] * scale:.0f} s "
              f"estimated ({MARKET_SLICE} x {MARKET[1]:,} took {fig['baseline']:.1f} s, ours "
              f"{fig['ours']:.1f} s there, x {scale:.2f})", flush=True)


if __name__ == "__main__":
    main()
