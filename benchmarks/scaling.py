"""How the distributed AlignedReID loss's traffic and time grow with the world size: the former exchange
(every sample's global and local features gathered, the backward an all-reduce) against the current one
(globals gathered with a reduce-scatter backward, only the mined stripes fetched from their owners), side
by side from one run, with the ratio.

For W = 1, 2, 4, 8 gloo processes on this machine (one thread each), with the Market recipe's feature
sizes (A = 64 samples per rank as 16 identities x 4, D = 2048, 16 stripes x 128), each rank runs the real
criterion forward and backward on random fp32 features (the model is not run), for three settings:
  global:  global triplet + ID (loss.local_weight=0),
  full:    global + local triplet + ID (the recipe),
  grouped: full with loss.mining_ranks=2 (mining and alignment within pairs of ranks),
and once more `full` with bf16 features (what autocast produces; exchanged as bf16).

Bytes per rank per step are COUNTED three ways, all printed:
  sent:    what each rank's process really wrote to gloo's sockets during the loss's forward and backward
           (`wchar` of /proc/self/io, read around the step; gloo's TCP transport writes with writev, and
           the loss writes no files): the figures used below. Per process, so other programs' traffic
           on this machine cannot leak in;
  lo:      the loopback device's transmitted bytes (/proc/net/dev, read by rank 0 between barriers,
           divided by W), how the original 3.0 / 9.0 MiB were measured; it includes every other
           program's loopback traffic at the same time (the table flags a step where lo exceeds sent);
  counter: pipeline/distributed.py's count of the bytes each rank hands to its collectives for other
           ranks (what NCCL's ring or pairwise algorithms move; gloo's own reduce_scatter would move
           twice that, which is why the loss does not use it).
Times (`loss_ms`: forward + backward; `dp_ms`: the dynamic programme's forward) are medians over steps
of the slowest rank; with W processes on 2 cores they measure contention as much as anything.

Extrapolation: bytes(W) = c0 + c1 * (W - 1) fitted to W = 2, 4, 8 per setting (the exchange's bytes are
linear in the number of peers). Network model: 8 GPUs per node, a byte to a peer on the same node
crosses NVLink at 200 GB/s, to a peer on another node the GPU's 50 GB/s NIC; peers are spread evenly, the
two link times add (no overlap with compute or each other) and latency is ignored. Share: that time over
an 8 ms step (8,000 images/s at 64 per GPU). With mining groups of G ranks the traffic is that of a world
of G, all of it on NVLink when a group is one node (G = 8).

    python benchmarks/scaling.py --out /tmp/scaling           # W = 1, 2, 4, 8 (a few minutes on 2 cores)
    python benchmarks/scaling.py --smoke --out /tmp/scaling   # W = 1, 2 at tiny sizes (seconds)

The last stdout line is one JSON object; the plot is <out>/scaling.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import LossConfig  # noqa: E402
from pipeline.distributed import count_traffic  # noqa: E402
from pipeline.losses import AlignedReIDCriterion  # noqa: E402
from rank_processes import run_ranks  # noqa: E402  (benchmarks/, the script's own folder)

MIB = 2 ** 20
GPUS_PER_NODE, NVLINK_BPS, NIC_BPS, STEP_S = 8, 200e9, 50e9, 8e-3
# (name, exchange, local triplet on, mining_ranks, dtype)
RUNS = [("global", "gather_all", False, 0, "fp32"), ("global", "rows", False, 0, "fp32"),
        ("full", "gather_all", True, 0, "fp32"), ("full", "rows", True, 0, "fp32"),
        ("grouped", "gather_all", True, 2, "fp32"), ("grouped", "rows", True, 2, "fp32"),
        ("full_bf16", "rows", True, 0, "bf16")]
METHOD = {"gather_all": "old", "rows": "new"}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for scaling.png and scaling.json")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=2, help="measured steps per setting (after 1 warm-up)")
    ap.add_argument("--p", type=int, default=16, help="identities per rank")
    ap.add_argument("--k", type=int, default=4, help="images per identity")
    ap.add_argument("--dim", type=int, default=2048, help="global feature width D")
    ap.add_argument("--stripes", type=int, default=16)
    ap.add_argument("--local-dim", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="W = 1, 2 at tiny sizes, 1 step (for the tests)")
    ap.add_argument("--timeout", type=int, default=540, help="seconds before a world's ranks are killed")
    args = ap.parse_args()
    if args.smoke:
        args.worlds, args.steps, args.p, args.k, args.dim, args.stripes, args.local_dim = [1, 2], 1, 4, 2, 64, 4, 16
    return args


def loopback_tx() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    return 0


def process_written() -> int:
    """Bytes this process has written through write-like system calls (sockets included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    dist = torch.distributed
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=args.timeout))
    count = args.p * args.k
    pids = (rank * args.p + torch.arange(args.p)).repeat_interleave(args.k)   # whole identities per rank
    gen = torch.Generator().manual_seed(rank)
    base = {"global": torch.randn(count, args.dim, generator=gen),
            "local": torch.randn(count, args.stripes, args.local_dim, generator=gen),
            "logits": torch.randn(count, 751, generator=gen)}
    runs = [(name, exchange, dtype, AlignedReIDCriterion(
                LossConfig(local_weight=1.0 if local else 0.0, mining_ranks=mining_ranks), exchange=exchange), [])
            for name, exchange, local, mining_ranks, dtype in RUNS if not (mining_ranks and world % mining_ranks)]
    # Steps outermost: every setting and method is timed in every round, so that a slow stretch of the
    # machine (or the first rounds' warm-up) does not land on one of them only.
    for step in range(1 + args.steps):
        for _, _, dtype, criterion, per_step in runs:
            cast = torch.bfloat16 if dtype == "bf16" else torch.float32
            feats = {k: v.to(cast).requires_grad_() for k, v in base.items()}
            if world > 1:
                dist.barrier()
            tx0 = loopback_tx()
            with count_traffic() as counter:
                w0, t0 = process_written(), time.perf_counter()
                loss, _ = criterion(feats, pids, pids)
                loss.backward()
                loss_s, sent = time.perf_counter() - t0, process_written() - w0
            if world > 1:
                dist.barrier()
            if step:
                per_step.append({"loss_s": loss_s, "dp_s": criterion.last_timing["dp_s"],
                                 "counter": counter.bytes, "sent": sent, "lo": loopback_tx() - tx0})
    rows = [{"setting": name, "method": METHOD[exchange], "dtype": dtype, "steps": per_step}
            for name, exchange, dtype, _, per_step in runs]
    results.put((rank, rows))
    if world > 1:
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> list:
    return [rows for _, rows in run_ranks(worker, world, args, args.timeout)]


def summarise(world: int, per_rank: list) -> list[dict]:
    """One row per setting and method: bytes per rank per step and the slowest rank's median times."""
    out = []
    for i, row in enumerate(per_rank[0]):
        steps = [rank_rows[i]["steps"] for rank_rows in per_rank]
        count = len(steps[0])
        slowest = {key: statistics.median(max(s[j][key] for s in steps) for j in range(count))
                   for key in ("loss_s", "dp_s")}
        lo = sum(s["lo"] for s in steps[0]) / count / world        # rank 0 saw the whole device
        counter = statistics.mean(s[j]["counter"] for s in steps for j in range(count))
        sent = statistics.mean(s[j]["sent"] for s in steps for j in range(count))
        out.append({"world": world, "setting": row["setting"], "method": row["method"], "dtype": row["dtype"],
                    "sent_mib": sent / MIB, "lo_mib": lo / MIB, "counter_mib": counter / MIB,
                    "loss_ms": slowest["loss_s"] * 1e3, "dp_ms": slowest["dp_s"] * 1e3})
    return out


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares bytes = c0 + c1 * (W - 1) over the points with W >= 2."""
    pts = [(w - 1, b) for w, b in points if w >= 2]
    if len(pts) == 1:
        return 0.0, pts[0][1] / pts[0][0]
    mx, my = statistics.mean(x for x, _ in pts), statistics.mean(y for _, y in pts)
    c1 = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return my - c1 * mx, c1


def link_seconds(nbytes: float, world: int, group: int | None = None) -> float:
    """The network model: bytes to peers on this node at NVLink speed, to other nodes at the NIC's."""
    peers = (group or world) - 1
    if peers <= 0:
        return 0.0
    same_node = min(GPUS_PER_NODE, group or world) - 1
    return nbytes * same_node / peers / NVLINK_BPS + nbytes * (peers - same_node) / peers / NIC_BPS


def main() -> None:
    args = parse()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    table = []
    for world in args.worlds:
        table += summarise(world, run_world(world, args))
    print(f"Loss traffic per rank per step: A = {args.p * args.k} ({args.p} x {args.k}) per rank, D = {args.dim}, "
          f"{args.stripes} stripes x {args.local_dim}; {args.steps} step(s) after 1 warm-up; gloo on the loopback")
    print("MiB sent per rank per step (old: the former exchange, new: the current one), lo and counter for "
          "the new one (see the docstring), times of the slowest rank")
    print(f"{'W':>3} {'setting':<10} {'dtype':<5} {'old sent':>9} {'new sent':>9} {'old/new':>7} {'new lo':>8} "
          f"{'counter':>8} {'old loss ms':>11} {'new loss ms':>11} {'new DP ms':>9}")
    rows = {(r["world"], r["setting"], r["method"]): r for r in table}
    for world in args.worlds:
        for setting in ("global", "full", "grouped", "full_bf16"):
            new = rows.get((world, setting, "new"))
            if new is None:
                continue
            old = rows.get((world, setting, "old")) or rows.get((world, "full", "old"))
            ratio = old["sent_mib"] / new["sent_mib"] if new["sent_mib"] > 0 else float("nan")
            flag = " (lo: other traffic)" if new["lo_mib"] > 1.1 * new["sent_mib"] + 0.01 else ""
            print(f"{world:>3} {setting:<10} {new['dtype']:<5} {old['sent_mib']:>9.3f} {new['sent_mib']:>9.3f} "
                  f"{ratio:>7.2f} {new['lo_mib']:>8.3f} {new['counter_mib']:>8.3f} {old['loss_ms']:>11.1f} "
                  f"{new['loss_ms']:>11.1f} {new['dp_ms']:>9.1f}{flag}")

    # Extrapolation with the stated network model.
    fits = {}
    for setting in ("global", "full", "full_bf16"):
        for method in ("old", "new"):
            pts = [(w, rows[(w, setting, method)]["sent_mib"] * MIB) for w in args.worlds
                   if (w, setting, method) in rows]
            if sum(w >= 2 for w, _ in pts):
                fits[f"{setting}/{method}"] = fit(pts)
    extrapolated = {}
    print(f"\nExtrapolated (bytes = c0 + c1 (W - 1) fitted to W >= 2; {GPUS_PER_NODE} GPUs/node, NVLink "
          f"{NVLINK_BPS / 1e9:.0f} GB/s, NIC {NIC_BPS / 1e9:.0f} GB/s per GPU; "
          f"share of an {STEP_S * 1e3:.0f} ms step):")
    for world in (64, 256):
        cases = {key: (c0 + c1 * (world - 1), None) for key, (c0, c1) in fits.items()}
        if "full/new" in fits:   # mining groups of one node: the traffic of a world of 8, all on NVLink
            c0, c1 = fits["full/new"]
            cases[f"full/new mining_ranks={GPUS_PER_NODE}"] = (c0 + c1 * (GPUS_PER_NODE - 1), GPUS_PER_NODE)
        for key, (nbytes, group) in cases.items():
            seconds = link_seconds(nbytes, world, group)
            extrapolated[f"{world}/{key}"] = {"mib": nbytes / MIB, "ms": seconds * 1e3, "share": seconds / STEP_S}
            print(f"  W={world:>3} {key:<28} {nbytes / MIB:9.1f} MiB  {seconds * 1e3:7.2f} ms  "
                  f"{100 * seconds / STEP_S:6.1f}% of the step")

    plot = out_dir / "scaling.png"
    draw(plot, rows, fits, args.worlds)
    summary = {"worlds": args.worlds, "sizes": {"A": args.p * args.k, "D": args.dim, "stripes": args.stripes,
                                                "local_dim": args.local_dim},
               "rows": table, "fits": {k: list(v) for k, v in fits.items()}, "extrapolated": extrapolated,
               "model": {"gpus_per_node": GPUS_PER_NODE, "nvlink_Bps": NVLINK_BPS, "nic_Bps": NIC_BPS,
                         "step_s": STEP_S},
               "plot": str(plot), "seconds": time.perf_counter() - started}
    (out_dir / "scaling.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


def draw(path: Path, rows: dict, fits: dict, worlds: list[int]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    span = [2, 4, 8, 16, 32, 64, 128, 256]
    colors = {"global": "tab:blue", "full": "tab:red", "full_bf16": "tab:purple", "grouped": "tab:green"}
    for (world, setting, method), row in sorted(rows.items()):
        if world >= 2:
            ax.plot(world, row["sent_mib"], "o" if method == "new" else "x", color=colors[setting])
    for key, (c0, c1) in fits.items():
        setting, method = key.split("/")
        ax.plot(span, [(c0 + c1 * (w - 1)) / MIB for w in span], "-" if method == "new" else "--",
                color=colors[setting], label=f"{setting}, {method} exchange")
    grouped = [(w, rows[(w, "grouped", "new")]["sent_mib"]) for w in worlds if (w, "grouped", "new") in rows]
    if grouped:
        ax.plot([w for w, _ in grouped], [b for _, b in grouped], "-o", color=colors["grouped"],
                label="grouped (mining_ranks=2), new")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("world size W (gloo ranks measured; lines: fit, extrapolated)")
    ax.set_ylabel("loss traffic per rank per step (MiB)")
    ax.set_title("AlignedReID loss exchange: measured (gloo, sockets) and extrapolated")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
