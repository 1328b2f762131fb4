"""Evaluation at scale: our chunked metrics and sparse re-ranking against dense NumPy references, in one
run on the same synthetic data.

1. Market-1501 size (3,368 x 15,913, 2048-d): `rank_metrics(distmat)` against the dense reference
   (argsort of the whole matrix, a boolean match matrix, then a loop over the queries, each query
   vectorised); also both sides starting from the features (`rank_metrics_from_features`, which never
   holds the q x g matrix, against the same BLAS distance product + the reference).
2. Re-ranking at 2,000 + 8,000 (2048-d): `rerank(q_g, q_q, g_g)` against the classic dense
   k-reciprocal algorithm (Zhong et al.'s code, NumPy); also `rerank_from_features`. A second, smaller
   size (half of each) gives the scaling from which the largest size that fits in 8 GB is estimated
   (an estimate: not run at that size).
3. MSMT17 size (11,659 x 82,161, 2048-d): `rank_metrics_from_features` within 4 GB of peak memory. The
   dense reference is not run at this size (it needs ~20 GB); its memory is extrapolated from part 1.

Every side runs in a fresh subprocess that loads its inputs from .npy files, then runs once. Time is
the call's wall time. Memory: after loading, the kernel's peak-RSS mark is reset (/proc/self/clear_refs
= 5); "net" is the peak RSS during the call minus the RSS just before it (the memory the call needed,
its result included), "peak" the process's absolute peak RSS (interpreter, imports and inputs
included). Both sides import the same modules and hold the same inputs, measured the same way.
The data: identities with random 2048-d centres, images = centre + noise, L2-normalised; the gallery
holds distractors (pid 0) and junk (pid -1) in Market-1501's proportions; 6 cameras (15 for MSMT17).

    python benchmarks/evaluation.py                               # all parts, < 10 min on 2 cores
    python benchmarks/evaluation.py --parts market rerank         # a selection
    python benchmarks/evaluation.py --rerank-size 1000 4000 --msmt-size 5000 40000 --dim 512
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation import (pairwise_distance, rank_metrics,  # noqa: E402
                                 rank_metrics_from_features, rerank, rerank_from_features)

GB = 1024 ** 3
KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")


# --------------------------------------------------------------------------------------------------
# The dense references
# --------------------------------------------------------------------------------------------------
def reference_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50) -> dict:
    """The usual dense evaluation: argsort of the whole q x g matrix, the match matrix, a query loop."""
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    firsts, aps, inps = [], [], []
    for i in range(distmat.shape[0]):
        order = indices[i]
        keep = ~(((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
                 | (g_pids[order] == -1))
        raw = matches[i][keep]
        if not raw.any():
            continue
        hits = raw.cumsum()
        positions = np.flatnonzero(raw)
        firsts.append(positions[0] + 1)
        inps.append(hits[positions[-1]] / (positions[-1] + 1.0))
        aps.append(((hits / np.arange(1, raw.size + 1)) * raw).sum() / raw.sum())
    firsts = np.array(firsts)
    return {"rank1": float(np.mean(firsts <= 1)), "rank5": float(np.mean(firsts <= 5)),
            "rank10": float(np.mean(firsts <= 10)), "mAP": float(np.mean(aps)),
            "mINP": float(np.mean(inps)), "valid_queries": int(firsts.size)}


def reference_rerank(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
    """The classic dense k-reciprocal re-ranking (the authors' public NumPy code)."""
    original_dist = np.concatenate([np.concatenate([q_q, q_g], axis=1),
                                    np.concatenate([q_g.T, g_g], axis=1)], axis=0)
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1. * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist).astype(np.int32)
    query_num = q_g.shape[0]
    all_num = q_g.shape[0] + q_g.shape[1]
    for i in range(all_num):
        forward_k_neigh_index = initial_rank[i, :k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for candidate in k_reciprocal_index:
            c_forward = initial_rank[candidate, :int(np.around(k1 / 2.)) + 1]
            c_backward = initial_rank[c_forward, :int(np.around(k1 / 2.)) + 1]
            c_reciprocal = c_forward[np.where(c_backward == candidate)[0]]
            if len(np.intersect1d(c_reciprocal, k_reciprocal_index)) > 2. / 3 * len(c_reciprocal):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, c_reciprocal)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = 1. * weight / np.sum(weight)
    original_dist = original_dist[:query_num, ]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del initial_rank
    invIndex = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
                V[i, indNonZero[j]], V[indImages[j], indNonZero[j]])
        jaccard_dist[i] = 1 - temp_min / (2. - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    del original_dist, V, jaccard_dist
    return final_dist[:query_num, query_num:]


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def make_split_labels(rng, n_q: int, n_g: int, n_ids: int, n_cams: int):
    """Market-1501 proportions: ~17.6 % distractors (pid 0), ~24 % junk (pid -1) in the gallery."""
    q_pids = rng.integers(1, n_ids + 1, n_q)
    n_distract, n_junk = int(0.176 * n_g), int(0.24 * n_g)
    g_pids = np.concatenate([rng.integers(1, n_ids + 1, n_g - n_distract - n_junk),
                             np.zeros(n_distract, np.int64), -np.ones(n_junk, np.int64)])
    return q_pids, rng.permutation(g_pids), rng.integers(1, n_cams + 1, n_q), \
        rng.integers(1, n_cams + 1, n_g)


def make_features(rng, pids: np.ndarray, dim: int, noise: float) -> np.ndarray:
    """centre(pid) + noise, L2-normalised; distractors and junk get a centre of their own each."""
    centres = np.random.default_rng(12345).standard_normal((int(pids.max()) + 1, dim),
                                                           dtype=np.float32) / np.sqrt(dim)
    out = rng.standard_normal((pids.size, dim), dtype=np.float32) * np.float32(noise / np.sqrt(dim))
    known = pids > 0
    out[known] += centres[pids[known]]
    out[~known] += rng.standard_normal((int((~known).sum()), dim), dtype=np.float32) / np.sqrt(dim)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def save(folder: Path, **arrays) -> None:
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)


def load(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    return {name: np.load(folder / f"{name}.npy") for name in names}


# --------------------------------------------------------------------------------------------------
# Workers (one per subprocess)
# --------------------------------------------------------------------------------------------------
LABELS = ["q_pids", "g_pids", "q_camids", "g_camids"]
WORKERS = {
    # name: (inputs, function of the loaded inputs)
    "market-ref": (["distmat", *LABELS], lambda d: reference_metrics(
        d["distmat"], d["q_pids"], d["g_pids"], d["q_camids"], d["g_camids"])),
    "market-ours": (["distmat", *LABELS], lambda d: rank_metrics(
        d["distmat"], d["q_pids"], d["g_pids"], d["q_camids"], d["g_camids"])),
    "market-feat-ref": (["qf", "gf", *LABELS], lambda d: reference_metrics(
        pairwise_distance(torch.from_numpy(d["qf"]), torch.from_numpy(d["gf"])).numpy(),
        d["q_pids"], d["g_pids"], d["q_camids"], d["g_camids"])),
    "market-feat-ours": (["qf", "gf", *LABELS], lambda d: rank_metrics_from_features(
        d["qf"], d["gf"], d["q_pids"], d["g_pids"], d["q_camids"], d["g_camids"])),
    "rerank-ref": (["q_g", "q_q", "g_g"], lambda d: reference_rerank(d["q_g"], d["q_q"], d["g_g"])),
    "rerank-ours": (["q_g", "q_q", "g_g"], lambda d: rerank(d["q_g"], d["q_q"], d["g_g"])),
    "rerank-feat-ours": (["qf", "gf"], lambda d: rerank_from_features(d["qf"], d["gf"])),
    "msmt-ours": (["qf", "gf", *LABELS], lambda d: rank_metrics_from_features(
        d["qf"], d["gf"], d["q_pids"], d["g_pids"], d["q_camids"], d["g_camids"])),
}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def worker(name: str, folder: Path, out: Path | None) -> None:
    inputs, fn = WORKERS[name]
    data = load(folder, inputs)
    loaded_peak = _status_kb("VmHWM")
    # Reset the kernel's peak-RSS mark to the current RSS, so VmHWM afterwards is this call's peak.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    result = fn(data)
    seconds = time.perf_counter() - t0
    call_peak = _status_kb("VmHWM")
    if isinstance(result, dict):
        result = {k: float(v) for k, v in result.items() if k in (*KEYS, "valid_queries")}
    else:                                       # a re-ranked matrix: keep it for the comparison
        np.save(out, np.asarray(result))
        result = None
    print(json.dumps({"seconds": seconds, "net_bytes": (call_peak - before) * 1024,
                      "inputs_bytes": sum(a.nbytes for a in data.values()),
                      "rss_before_bytes": before * 1024,
                      "peak_bytes": max(call_peak, loaded_peak) * 1024, "result": result}))


def measure(name: str, folder: Path, out: Path | None = None, timeout: float = 3600) -> dict:
    """Run one side in a fresh process (inputs loaded from .npy, then the call, timed)."""
    cmd = [sys.executable, __file__, "--worker", name, "--data", str(folder)]
    proc = subprocess.run(cmd + (["--out", str(out)] if out else []), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_mem(b: float) -> str:
    return f"{b / GB:.2f} GB" if b >= GB / 4 else f"{b / 1024 ** 2:.0f} MB"


def row(label: str, ref: dict, ours: dict) -> str:
    speed = ref["seconds"] / max(ours["seconds"], 1e-9)
    mem = ref["net_bytes"] / max(ours["net_bytes"], 1)
    return (f"  {label:<34} {ref['seconds']:>8.2f} s {ours['seconds']:>8.2f} s {speed:>7.1f}x   "
            f"{fmt_mem(ref['net_bytes']):>9} {fmt_mem(ours['net_bytes']):>9} {mem:>7.1f}x")


HEADER = (f"  {'':<34} {'reference':>10} {'ours':>10} {'speed':>8}   {'ref net':>9} {'ours net':>9} "
          f"{'memory':>8}")


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------
def part_market(work: Path, args, summary: dict) -> None:
    n_q, n_g = args.market_size
    folder = work / "market"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    q_pids, g_pids, q_cams, g_cams = make_split_labels(rng, n_q, n_g, 750, 6)
    qf, gf = make_features(rng, q_pids, args.dim, args.noise), make_features(rng, g_pids, args.dim,
                                                                             args.noise)
    dist = pairwise_distance(torch.from_numpy(qf), torch.from_numpy(gf)).numpy()
    save(folder, qf=qf, gf=gf, distmat=dist, q_pids=q_pids, g_pids=g_pids, q_camids=q_cams,
         g_camids=g_cams)
    del qf, gf, dist
    print(f"\n1. Metrics at {n_q:,} x {n_g:,} ({args.dim}-d features)", flush=True)
    ref, ours = measure("market-ref", folder), measure("market-ours", folder)
    ref_f, ours_f = measure("market-feat-ref", folder), measure("market-feat-ours", folder)
    for key in KEYS:
        # NumPy's default argsort orders exact ties arbitrarily; ours by gallery index.
        assert abs(ref["result"][key] - ours["result"][key]) < 1e-5, (key, ref, ours)
        assert abs(ref_f["result"][key] - ours_f["result"][key]) < 1e-4, (key, ref_f, ours_f)
    print(HEADER)
    print(row("from the distance matrix", ref, ours))
    print(row("from features (distances included)", ref_f, ours_f))
    r = ours["result"]
    print(f"  same metrics on both sides: rank-1 {r['rank1']:.4f}, mAP {r['mAP']:.4f}, "
          f"mINP {r['mINP']:.4f}, {int(r['valid_queries'])} valid queries")
    print(f"  absolute peaks: ref {fmt_mem(ref['peak_bytes'])}, ours {fmt_mem(ours['peak_bytes'])} "
          f"(inputs {fmt_mem(ours['inputs_bytes'])}); from features: ref "
          f"{fmt_mem(ref_f['peak_bytes'])}, ours {fmt_mem(ours_f['peak_bytes'])} "
          f"(inputs {fmt_mem(ours_f['inputs_bytes'])})")
    summary["market"] = {"ref": ref, "ours": ours, "features_ref": ref_f, "features_ours": ours_f,
                         "size": [n_q, n_g]}


def make_rerank_inputs(folder: Path, n_q: int, n_g: int, dim: int, noise: float) -> None:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    n_ids = max(10, (n_q + n_g) // 20)
    q_pids, g_pids, _, _ = make_split_labels(rng, n_q, n_g, n_ids, 6)
    qf, gf = make_features(rng, q_pids, dim, noise), make_features(rng, g_pids, dim, noise)
    qt, gt = torch.from_numpy(qf), torch.from_numpy(gf)
    save(folder, qf=qf, gf=gf, q_g=pairwise_distance(qt, gt).numpy(),
         q_q=pairwise_distance(qt, qt).numpy(), g_g=pairwise_distance(gt, gt).numpy())


def part_rerank(work: Path, args, summary: dict) -> None:
    sizes = [tuple(args.rerank_size), (args.rerank_size[0] // 2, args.rerank_size[1] // 2)]
    results = {}
    for n_q, n_g in sizes:
        folder = work / f"rerank-{n_q}-{n_g}"
        make_rerank_inputs(folder, n_q, n_g, args.dim, args.noise)
        print(f"\n2. Re-ranking at {n_q:,} + {n_g:,} ({args.dim}-d features; k1=20, k2=6, "
              f"lambda=0.3)", flush=True)
        ref = measure("rerank-ref", folder, folder / "out-ref.npy")
        ours = measure("rerank-ours", folder, folder / "out-ours.npy")
        feat = measure("rerank-feat-ours", folder, folder / "out-feat.npy")
        diff = float(np.abs(np.load(folder / "out-ref.npy") - np.load(folder / "out-ours.npy")).max())
        diff_f = float(np.abs(np.load(folder / "out-ref.npy") - np.load(folder / "out-feat.npy")).max())
        print(HEADER)
        print(row("from q_g, q_q, g_g (as the original)", ref, ours))
        print(row("ours from features (distances incl.)", ref, feat))
        print(f"  max |ours - reference| = {diff:.1e} (matrices), {diff_f:.1e} (features)")
        print(f"  absolute peaks: ref {fmt_mem(ref['peak_bytes'])}, ours {fmt_mem(ours['peak_bytes'])}"
              f" (both hold the q_g, q_q, g_g inputs: {fmt_mem(ours['inputs_bytes'])}), ours from "
              f"features {fmt_mem(feat['peak_bytes'])} (inputs {fmt_mem(feat['inputs_bytes'])})")
        results[(n_q, n_g)] = {"ref": ref, "ours": ours, "features": feat, "max_diff": diff}
        if not args.rerank_scaling:
            break
    summary["rerank"] = {f"{q}+{g}": v for (q, g), v in results.items()}
    if len(results) == 2:
        estimate_8gb(results, sizes, args.dim, summary)


def estimate_8gb(results: dict, sizes: list[tuple[int, int]], dim: int, summary: dict) -> None:
    """Largest N = Q+G (at the measured Q:G ratio) whose total peak stays within 8 GB, from the two
    measured sizes. Reference: net = a·N² + b·N through both points. Ours: the q x g output (4·Q·G
    bytes) is the only quadratic allocation, so net = 4·Q·G + c + b·N, with c (chunk buffers) and b
    (neighbour lists, sparse vectors) through both points. Total = interpreter + inputs + net."""
    share = sizes[0][0] / (sizes[0][0] + sizes[0][1])
    print(f"\n  Largest re-ranking that fits in 8 GB at Q:G = {sizes[0][0]}:{sizes[0][1]}, N = Q+G "
          f"(ESTIMATE from the two measured sizes, not run):")
    estimates = {}
    for side, label, inputs in (
            ("ref", "dense reference (needs q_g, q_q, g_g)", lambda n: 4.0 * n * n),
            ("ours", "ours from q_g, q_q, g_g", lambda n: 4.0 * n * n),
            ("features", "ours from features", lambda n: 4.0 * n * dim)):
        (n1, r1), (n2, r2) = [(q + g, results[(q, g)][side]) for q, g in sizes[::-1]]
        interpreter = r2["rss_before_bytes"] - r2["inputs_bytes"]
        if side == "ref":
            a = (r2["net_bytes"] / n2 - r1["net_bytes"] / n1) / (n2 - n1)
            b = r1["net_bytes"] / n1 - a * n1
            c, model = 0.0, "a·N² + b·N"
        else:
            out1, out2 = (4.0 * share * (1 - share) * n * n for n in (n1, n2))
            b = ((r2["net_bytes"] - out2) - (r1["net_bytes"] - out1)) / (n2 - n1)
            c, a = (r1["net_bytes"] - out1) - b * n1, 4.0 * share * (1 - share)
            model = "4·Q·G + c + b·N"

        def total(n: float) -> float:
            # used within this iteration only: binding the loop variables late is intended
            return interpreter + inputs(n) + a * n * n + max(b, 0.0) * n + max(c, 0.0)  # noqa: B023

        lo, hi = 1.0, 1e8                       # total() grows with n: bisect for 8 GB
        while hi - lo > 1:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if total(mid) <= 8 * GB else (lo, mid)
        estimates[side] = int(lo)
        print(f"    {label:<38} N ~ {int(lo):>9,} (Q ~ {int(lo * share):>7,}, G ~ "
              f"{int(lo * (1 - share)):>7,}); net = {model}: a {a:.2f} B, b {b:,.0f} B, "
              f"c {fmt_mem(max(c, 0.0))}")
    summary["rerank_8gb_estimate"] = estimates


def part_msmt(work: Path, args, summary: dict) -> None:
    n_q, n_g = args.msmt_size
    folder = work / "msmt"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(2)
    q_pids, g_pids, q_cams, g_cams = make_split_labels(rng, n_q, n_g, 3060, 15)
    save(folder, qf=make_features(rng, q_pids, args.dim, args.noise),
         gf=make_features(rng, g_pids, args.dim, args.noise), q_pids=q_pids, g_pids=g_pids,
         q_camids=q_cams, g_camids=g_cams)
    print(f"\n3. Metrics at MSMT17 size, {n_q:,} x {n_g:,} ({args.dim}-d features), ours from features",
          flush=True)
    ours = measure("msmt-ours", folder)
    r = ours["result"]
    verdict = "within" if ours["peak_bytes"] <= 4 * GB else "OVER"
    print(f"  time {ours['seconds']:.1f} s; peak RSS {fmt_mem(ours['peak_bytes'])} absolute "
          f"({verdict} 4 GB; features alone {fmt_mem((n_q + n_g) * args.dim * 4)}), net "
          f"{fmt_mem(ours['net_bytes'])}")
    print(f"  rank-1 {r['rank1']:.4f}, mAP {r['mAP']:.4f}, mINP {r['mINP']:.4f}")
    market = summary.get("market")
    if market:
        scale = (n_q * n_g) / (market["size"][0] * market["size"][1])
        est = market["ref"]["net_bytes"] * scale + 4 * n_q * n_g
        print(f"  dense reference at this size: not run; ESTIMATE from part 1 (its net memory scaled by "
              f"q x g, plus the float32 distance matrix): ~{fmt_mem(est)} beyond the features")
        summary["msmt_ref_estimate_bytes"] = est
    summary["msmt"] = ours


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["market", "rerank", "msmt"],
                        default=["market", "rerank", "msmt"])
    parser.add_argument("--market-size", type=int, nargs=2, default=[3368, 15913], metavar=("Q", "G"))
    parser.add_argument("--rerank-size", type=int, nargs=2, default=[2000, 8000], metavar=("Q", "G"))
    parser.add_argument("--rerank-scaling", action=argparse.BooleanOptionalAction, default=True,
                        help="also run half of each size for the 8 GB estimate (default: on)")
    parser.add_argument("--msmt-size", type=int, nargs=2, default=[11659, 82161], metavar=("Q", "G"))
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension")
    parser.add_argument("--noise", type=float, default=3.3,
                        help="noise norm relative to the identity centres (harder when larger)")
    parser.add_argument("--workdir", help="where the inputs go (default: a temporary directory)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, Path(args.data), Path(args.out) if args.out else None)
        return 0

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; each side in a fresh process "
          f"with its inputs loaded; 'net' = the call's peak RSS above the RSS before it")
    summary: dict = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        for part in args.parts:
            {"market": part_market, "rerank": part_rerank, "msmt": part_msmt}[part](work, args, summary)
    print(f"\ntotal {time.time() - t0:.0f} s")
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
