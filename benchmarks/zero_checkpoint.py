"""What resuming DeepSpeed ZeRO on another world size costs: the full optimiser state that checkpoints
now carry, against DeepSpeed's own checkpoint measured in the same run.

W gloo ranks build the recipe's network (default: configs/deepspeed_zero2.yaml, ResNet-50 with the
aligned branch and its stripe classifier, no pretrained download) under its DeepSpeed engine, take one
optimiser step on a small random batch (so that Adam has state), then time, on the slowest rank:

  deepspeed_save   DeepSpeed's own save_checkpoint (every rank writes its partition; the baseline)
  full_state       backend.state_dict(): the full optimiser state assembled from the partitions
                   (one all_reduce per parameter and state tensor), which the checkpoint file now holds
  fp32_weights     backend.fp32_state_dict(): the master weights, which the file held before too

Rank 0 also reports the checkpoint file's size with and without the full state. Then one process
resumes the W-rank state on 1 rank through the re-partitioning path and reports its time, against
DeepSpeed's own load at W ranks (same run). Prints a table, the ratios and one JSON line.

    python benchmarks/zero_checkpoint.py                         # 2 ranks, ResNet-50, ZeRO-2
    python benchmarks/zero_checkpoint.py --backbone resnet18     # quicker
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rank_processes import run_ranks  # noqa: E402  (benchmarks/, the script's own folder)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/deepspeed_zero2.yaml"))
    ap.add_argument("--nproc", type=int, default=2, help="ranks that write the checkpoint (default 2)")
    ap.add_argument("--stage", type=int, default=None, help="ZeRO stage (default: the recipe's)")
    ap.add_argument("--backbone", default=None, help="override model.backbone (e.g. resnet18)")
    ap.add_argument("--classes", type=int, default=751, help="identities (Market-1501: 751)")
    ap.add_argument("--timeout", type=float, default=900)
    return ap.parse_args()


def _backend(args, world: int):
    from pipeline.config import load_config
    from pipeline.distributed import ensure_process_group, init_distributed
    from pipeline.engine.backend import build_backend
    from pipeline.model import build_model

    init_distributed("gloo", 600)
    ensure_process_group(torch.device("cpu"))
    overrides = ["data.shards=unused", "model.pretrained=null", "engine.backend=deepspeed",
                 "data.p=2", "data.k=2", "train.amp=none"]
    if args.stage is not None:
        overrides.append(f"engine.deepspeed.zero_optimization.stage={args.stage}")
    if args.backbone:
        overrides.append(f"model.backbone={args.backbone}")
    cfg = load_config(args.config, overrides)
    torch.manual_seed(0)
    return build_backend(cfg, build_model(cfg.model, args.classes), torch.device("cpu"), world)


def _timed(fn):
    from pipeline.distributed import barrier

    barrier()
    t0 = time.perf_counter()
    out = fn()
    barrier()
    return out, time.perf_counter() - t0


def _write_worker(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    backend = _backend(args, world)
    out = backend.forward(torch.rand(4, 3, 64, 32))
    loss = out["logits"].logsumexp(1).mean() + out["global"].square().mean()
    backend.step(loss)
    directory = Path(args.dir)
    _, t_ds = _timed(lambda: backend.save(directory / "ds", "bench"))
    weights, t_w = _timed(backend.fp32_state_dict)
    full, t_full = _timed(backend.state_dict)
    sizes = {}
    if rank == 0:
        for name, state in (("without", {"model": weights}), ("with", {"model": weights, **full})):
            buf = io.BytesIO()
            torch.save(state, buf)
            sizes[name] = buf.tell()
        torch.save({"model": weights, **full, "world_size": world}, directory / "ckpt.pt")
    _, t_load = _timed(lambda: backend.load({"world_size": world}, directory / "ds", "bench"))
    results.put((rank, {"deepspeed_save": t_ds, "fp32_weights": t_w, "full_state": t_full,
                        "deepspeed_load": t_load, "sizes": sizes}))


def _resume_worker(rank: int, world: int, port: int, args, results) -> None:
    torch.set_num_threads(os.cpu_count() or 2)
    backend = _backend(args, 1)
    state = torch.load(Path(args.dir) / "ckpt.pt", weights_only=True)
    t0 = time.perf_counter()
    how = backend.load(state, Path(args.dir) / "ds", "bench")
    results.put((rank, {"repartition_load": time.perf_counter() - t0, "how": how}))


def main() -> None:
    args = parse()
    with tempfile.TemporaryDirectory() as tmp:
        args.dir = tmp
        wrote = run_ranks(_write_worker, args.nproc, args, args.timeout)
        slowest = {k: max(r[1][k] for r in wrote) for k in ("deepspeed_save", "fp32_weights", "full_state",
                                                            "deepspeed_load")}
        sizes = wrote[0][1]["sizes"]
        resumed = run_ranks(_resume_worker, 1, args, args.timeout)[0][1]
    mib = 2 ** 20
    print(f"{args.nproc} ranks, {Path(args.config).name}" + (f", {args.backbone}" if args.backbone else "")
          + f"; resumed on 1 rank: {resumed['how']}")
    print(f"{'phase':<44}{'seconds':>10}")
    rows = [("DeepSpeed save_checkpoint (baseline)", slowest["deepspeed_save"]),
            ("fp32 master weights (written before too)", slowest["fp32_weights"]),
            ("full optimiser state, assembled (new)", slowest["full_state"]),
            (f"DeepSpeed load_checkpoint at {args.nproc} ranks (baseline)", slowest["deepspeed_load"]),
            ("re-partitioned load on 1 rank (new)", resumed["repartition_load"])]
    for name, value in rows:
        print(f"{name:<44}{value:>10.3f}")
    print(f"checkpoint file: {sizes['without'] / mib:.1f} MiB -> {sizes['with'] / mib:.1f} MiB with the full state")
    save_ratio = slowest["full_state"] / slowest["deepspeed_save"]
    load_ratio = resumed["repartition_load"] / slowest["deepspeed_load"]
    print(f"full state / DeepSpeed save: {save_ratio:.2f}x; re-partitioned load / DeepSpeed load: {load_ratio:.2f}x")
    print(json.dumps({"bench": "zero_checkpoint", "ranks": args.nproc, "config": Path(args.config).name,
                      "backbone": args.backbone, **{k: round(v, 4) for k, v in slowest.items()},
                      "repartition_load": round(resumed["repartition_load"], 4),
                      "file_mib_without": round(sizes["without"] / mib, 2),
                      "file_mib_with": round(sizes["with"] / mib, 2),
                      "full_state_over_deepspeed_save": round(save_ratio, 3),
                      "repartition_over_deepspeed_load": round(load_ratio, 3)}))


if __name__ == "__main__":
    main()
