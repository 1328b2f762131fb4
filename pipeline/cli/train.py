"""Train AlignedReID: single process, or under torchrun on one or many nodes.

    reid-train --config demo [--output-dir DIR] [key.sub=value ...]
    torchrun --nproc-per-node 8 -m pipeline.cli.train --config market1501
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
        --rdzv-id JOB launch/train.py --config configs/market1501.yaml

--config is a YAML file or a shipped recipe's name (demo, market1501, dukemtmc, msmt17, cuhk03np,
deepspeed_zero2). Restarting the same command resumes from <output_dir>/checkpoints/latest. On
SIGTERM/SIGUSR1 the run checkpoints and exits with status 75 (requeue me). Exit status 2: a config,
launch or pretrained-weights error, reported once (by local rank 0), before any training.
"""
from __future__ import annotations

import argparse
import sys
import time

from pipeline.config import ConfigError, check_machine, load_config
from pipeline.distributed import (LaunchError, check_elastic_restarts, check_group_size, launch_local_rank,
                                  launch_rank, launch_world_size)
from pipeline.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reid-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe: a path or a shipped recipe's name")
    parser.add_argument("--output-dir", help="where checkpoints, logs and plots go (overrides output_dir)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)
    setup_logging()
    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    try:   # every check that needs no process group, before one starts
        cfg = load_config(args.config, overrides)
        check_machine(cfg)
        check_elastic_restarts()
        check_group_size(cfg.loss.mining_ranks, launch_world_size())
    except (ConfigError, LaunchError) as exc:
        if launch_local_rank() == 0:   # once per node, not once per process
            kind = "config error" if isinstance(exc, ConfigError) else "launch error"
            print(f"{kind}: {exc}", file=sys.stderr)
        return 2
    from pipeline.engine import train
    from pipeline.model import PretrainedWeightsError

    try:
        summary = train(cfg)
    except PretrainedWeightsError as exc:  # no usable ImageNet weights: stop like a config error
        if exc.all_ranks and launch_rank() != 0:
            # Every rank has the same error and rank 0 reports it; exiting at once could let torchrun
            # kill rank 0 before it has printed.
            time.sleep(5)
            return 2
        print(f"pretrained weights error: {exc}", file=sys.stderr)
        return 2
    if summary and summary.get("final_metrics"):
        m = summary["final_metrics"]
        print(f"final: rank-1 {m.get('rank1', float('nan')):.2%}  mAP {m.get('mAP', float('nan')):.2%}  "
              f"mINP {m.get('mINP', float('nan')):.2%}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
