"""Throughput of a full training step and where its time goes.

Ours: the real `Trainer.train_step` (shard stream → device augmentation → model → cross-rank gather →
global N×N mining → global/local/ID losses → backward → optimiser step), fed by `train_batches`.
Baseline, same run, same model and batch size: "compute only" — forward + backward + step of the model
(DDP gradient all-reduce included) with a plain per-rank cross-entropy on a batch already in memory
(no data loading, no gather, no triplet/DP). The ratio ours/baseline is the share of pure compute the whole
pipeline keeps.

Also printed: the share of step time spent waiting for data, in the loss's communication (gathers),
and in the loss itself.

    python benchmarks/train_step.py                        # 2 gloo processes, ResNet-18 at 128x64 (CPU)
    python benchmarks/train_step.py --nproc 1 --backbone resnet50 --image-size 256 128 --p 16 --k 4 \
        --amp bf16 --channels-last                         # the GPU figure (one GPU per process)
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="processes (re-launches itself under torchrun)")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, nargs=2, default=[128, 64])
    ap.add_argument("--p", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--shards", help="existing shards (default: a synthetic set made in a temp dir)")
    ap.add_argument("--json", help="also write the figures to this file")
    return ap.parse_args()


def make_shards(tmp: Path, image_size: list[int]) -> Path:
    from pipeline.data.synthetic import make_synthetic
    from pipeline.data.datasets import parse_dataset
    from pipeline.data.shards import write_shards

    raw, shards = tmp / "raw", tmp / "shards"
    make_synthetic(raw, train_ids=48, test_ids=4, seed=0, image_size=tuple(image_size), progress=False)
    write_shards(parse_dataset("market1501", raw), shards, progress=False)
    return shards


def worker(args: argparse.Namespace, shards: str, out_dir: str) -> None:
    import torch

    from pipeline import distributed as D
    from pipeline.config import load_config
    from pipeline.engine.trainer import Trainer

    cfg = load_config(None, [
        f"data.shards={shards}", f"output_dir={out_dir}", f"data.p={args.p}", f"data.k={args.k}",
        f"data.num_workers={args.num_workers}", f"data.image_size={list(args.image_size)}",
        f"model.backbone={args.backbone}", f"train.amp={args.amp}",
        f"train.channels_last={str(args.channels_last).lower()}", "train.epochs=1",
        f"train.steps_per_epoch={args.warmup + args.steps + 1}", "tracking.enabled=false",
        "checkpoint.resume=false", "eval.every_epochs=0", "train.lr=1e-4"])
    info = D.init_distributed("auto")
    trainer = Trainer(cfg, info)
    trainer.criterion.synchronize = True
    device = info.device

    # --- ours: the real step fed by the shard stream
    rows = []
    iterator = iter(trainer.batches(epoch=0, start_step=0))
    batch = None
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next(iterator)
        wait = time.perf_counter() - t0
        _, _, timing = trainer.train_step(batch)
        if i >= args.warmup:
            rows.append({"wait": wait, **timing})
    del iterator

    # --- baseline: compute only (batch in memory, per-rank CE, no gather/triplet/DP)
    backend = trainer.backend
    images = backend.prepare(trainer.augment(batch["images"].to(device)).detach())
    labels = batch["labels"].to(device)
    opt = torch.optim.Adam(backend.network.parameters(), lr=1e-6)
    base = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with backend.autocast():
            out = backend.wrapped(images)
        out = out[0] if isinstance(out, list) else out
        # Every output joins the graph (DDP needs all parameters used); only CE carries a gradient.
        loss = torch.nn.functional.cross_entropy(out["logits"].float(), labels) \
            + 0.0 * (out["global"].float().sum() + out["local"].float().sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            base.append(time.perf_counter() - t0)

    stats = D.all_gather_object({"rows": rows, "base": base})
    if info.is_main:
        report(args, info.world_size, device, stats)
    D.cleanup()


def report(args, world, device, stats) -> None:
    def med(key):
        return statistics.median(max(r[key] for r in step) for step in zip(*(s["rows"] for s in stats)))

    step = med("step_s") + med("wait")
    base = statistics.median(max(b) for b in zip(*(s["base"] for s in stats)))
    images = args.p * args.k * world
    ours_ips, base_ips = images / step, images / base
    figures = {
        "device": str(device), "world_size": world, "backbone": args.backbone,
        "image_size": args.image_size, "batch_per_rank": args.p * args.k, "amp": args.amp,
        "channels_last": args.channels_last,
        "ours_images_per_s": ours_ips, "ours_images_per_s_per_process": ours_ips / world,
        "baseline_compute_only_images_per_s": base_ips, "ratio_ours_over_baseline": ours_ips / base_ips,
        "share_data_wait": med("wait") / step, "share_loss_comm": med("comm_s") / step,
        "share_loss_total": med("loss_s") / step, "share_augment": med("augment_s") / step,
    }
    print(f"train step — {args.backbone} {args.image_size[0]}x{args.image_size[1]}, P×K {args.p}×{args.k} "
          f"per rank, {world} process(es) on {device}, amp={args.amp}, channels_last={args.channels_last}")
    print(f"  ours (full pipeline step)        {ours_ips:9.1f} images/s  ({ours_ips / world:.1f} per process)")
    print(f"  baseline (compute only, CE)      {base_ips:9.1f} images/s")
    print(f"  ratio ours / baseline            {ours_ips / base_ips:9.2f}")
    print(f"  share of step: data wait {figures['share_data_wait']:.1%}, loss communication "
          f"{figures['share_loss_comm']:.1%}, loss forward (incl. communication) {figures['share_loss_total']:.1%}, "
          f"augmentation {figures['share_augment']:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


def main() -> int:
    args = parse()
    if "RANK" in os.environ:
        worker(args, os.environ["BENCH_SHARDS"], os.environ["BENCH_OUT"])
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(args.shards) if args.shards else make_shards(Path(tmp), args.image_size)
        env = dict(os.environ, BENCH_SHARDS=str(shards), BENCH_OUT=str(Path(tmp) / "run"))
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(args.nproc), __file__, *sys.argv[1:]]
        return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
