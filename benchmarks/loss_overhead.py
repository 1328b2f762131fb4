"""Overhead of the distributed AlignedReID loss against the model's forward + backward, in one run.

Per rank and iteration, timed separately on the same step:
  model: forward of the (DDP-wrapped) network, then backward through it from the feature gradients
         (DDP's gradient all-reduce included), i.e. the ResNet step itself;
  loss:  the criterion's forward (differentiable all_gather of global + local features and of the pids,
         the N x N global distances of own anchors against the gathered batch, batch-hard mining, the
         local DP on the mined pairs, ID and, with --mutual, the mutual terms) and its backward down to
         the features (the gather's gradient all-reduce included).
The features are detached into leaf tensors between the two, so the arithmetic is exactly that of one
loss.backward(). A barrier before the loss keeps the ranks' forward skew out of its gathers (the skew
shows up in the model's all-reduce instead). Figures are medians over iterations of the slowest rank.
The goal: loss < 5% of the model's step.

    python benchmarks/loss_overhead.py                      # 2 gloo ranks, ResNet-50, 256x128, 16x4 per rank
    python benchmarks/loss_overhead.py --backbone resnet18 --image-size 128 64 --iters 3   # quicker on a CPU
    python benchmarks/loss_overhead.py --nproc 1 --device cuda --amp bf16                  # one GPU
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import LossConfig, ModelConfig  # noqa: E402
from pipeline.losses import AlignedReIDCriterion  # noqa: E402
from rank_processes import run_ranks  # noqa: E402  (benchmarks/, the script's own folder)
from pipeline.model import MutualPair, build_model  # noqa: E402


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="ranks (gloo on CPU; nccl when each has a GPU)")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--image-size", type=int, nargs=2, default=[256, 128])
    ap.add_argument("--p", type=int, default=16, help="identities per rank")
    ap.add_argument("--k", type=int, default=4, help="images per identity")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mutual", action="store_true", help="two networks and the mutual terms")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast for the model (GPU)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per rank (0: cores / ranks)")
    ap.add_argument("--timeout", type=int, default=3000, help="seconds before the ranks are killed")
    return ap.parse_args()


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        backend = "nccl" if use_cuda and torch.cuda.device_count() >= world else "gloo"
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=datetime.timedelta(seconds=600))
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=args.backbone, last_stride=1)
    model = build_model(cfg, num_classes=751)
    if args.mutual:
        model = MutualPair(model, build_model(cfg, num_classes=751))
    model = model.to(device).train()
    module = model
    if world > 1:
        module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = AlignedReIDCriterion(LossConfig(), mutual=args.mutual, synchronize=True)
    batch = args.p * args.k
    gen = torch.Generator().manual_seed(rank)
    images = torch.randn(batch, 3, *args.image_size, generator=gen).to(device)
    pids = (rank * args.p + torch.arange(args.p)).repeat_interleave(args.k).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    rows = []
    for it in range(args.warmup + args.iters):
        module.zero_grad(set_to_none=True)
        t0 = _sync(device)
        with autocast:
            outputs = module(images)
        _sync(device)
        if world > 1:  # start the loss together: its gathers should not absorb the ranks' forward skew
            torch.distributed.barrier()
        t1 = _sync(device)
        nets = outputs if isinstance(outputs, list) else [outputs]
        tensors = [net[key] for net in nets for key in ("global", "local", "logits")]
        leaves = [t.detach().float().requires_grad_() for t in tensors]
        views = [dict(zip(("global", "local", "logits"), leaves[i:i + 3])) for i in range(0, len(leaves), 3)]
        loss, _ = criterion(views if args.mutual else views[0], pids, pids)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        t2 = _sync(device)
        grads = [torch.zeros_like(t) if g is None else g.to(t.dtype) for g, t in zip(grads, tensors)]
        torch.autograd.backward(tensors, grads)
        t3 = _sync(device)
        if it >= args.warmup:
            rows.append({"model_s": (t1 - t0) + (t3 - t2), "loss_s": t2 - t1,
                         "comm_s": criterion.last_timing["comm_s"]})
    results.put((rank, rows, str(device), torch.get_num_threads()))
    if world > 1:
        torch.distributed.destroy_process_group()


def run(args: argparse.Namespace) -> list:
    return run_ranks(worker, args.nproc, args, args.timeout)


def main() -> None:
    args = parse()
    collected = run(args)
    per_rank = [rows for _, rows, _, _ in sorted(collected)]
    device, threads = collected[0][2], collected[0][3]

    def slowest(key: str) -> float:
        return statistics.median(max(rows[i][key] for rows in per_rank) for i in range(args.iters))

    model_s, loss_s, comm_s = slowest("model_s"), slowest("loss_s"), slowest("comm_s")
    print(f"{args.backbone} at {args.image_size[0]}x{args.image_size[1]}, P x K = {args.p} x {args.k} "
          f"per rank, {args.nproc} rank(s) on {device} ({threads} threads each), mutual={args.mutual}, amp={args.amp}; "
          f"median of {args.iters} iterations after {args.warmup} warm-up")
    print(f"  model forward + backward (baseline):     {model_s * 1e3:10.1f} ms")
    print(f"  loss forward + backward (ours):          {loss_s * 1e3:10.1f} ms   "
          f"(gathers: {comm_s * 1e3:.1f} ms)")
    print(f"  overhead: loss / model = {100 * loss_s / model_s:.2f}%  (goal < 5%); "
          f"share of the whole step = {100 * loss_s / (model_s + loss_s):.2f}%")


if __name__ == "__main__":
    main()
