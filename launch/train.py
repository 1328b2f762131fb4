"""Train AlignedReID: single process, or under torchrun on one or many nodes.

    python launch/train.py --config configs/demo.yaml [--output-dir DIR] [key.sub=value ...]
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
        --rdzv-id JOB launch/train.py --config configs/market1501.yaml

Restarting the same command resumes from <output_dir>/checkpoints/latest. On SIGTERM/SIGUSR1 the run
checkpoints and exits with status 75 (requeue me).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ConfigError, check_machine, load_config  # noqa: E402
from pipeline.distributed import LaunchError, check_elastic_restarts, env_int  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--output-dir", help="where checkpoints, logs and plots go (overrides output_dir)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    try:
        cfg = load_config(args.config, overrides)
        check_machine(cfg)
        check_elastic_restarts()
    except (ConfigError, LaunchError) as exc:
        if env_int("LOCAL_RANK", 0) == 0:   # once per node, not once per process
            kind = "config error" if isinstance(exc, ConfigError) else "launch error"
            print(f"{kind}: {exc}", file=sys.stderr)
        return 2
    from pipeline.engine import train
    from pipeline.model import PretrainedWeightsError

    try:
        summary = train(cfg)
    except PretrainedWeightsError as exc:  # no usable ImageNet weights: stop like a config error
        if exc.all_ranks and os.environ.get("RANK", "0") != "0":
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
