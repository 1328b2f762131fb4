"""The whole pipeline end to end on the embedded synthetic dataset (what `make demo` runs):

1. draw a synthetic pedestrian dataset in Market-1501 layout      (reid-synth)
2. pack it into WebDataset shards                                  (reid-prepare)
3. train with 2 processes on CPU under torchrun                    (reid-train, the `demo` recipe)
4. evaluate the final checkpoint                                   (reid-evaluate)
5. print rank-1 / mAP / mINP and where the run is tracked

Everything goes under --out (relative to the current folder). Steps whose output already exists are
skipped, so re-running resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pipeline
from pipeline.logs import setup_logging

RECIPE = "demo"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reid-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="working folder (dataset, shards, run)")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (torchrun)")
    parser.add_argument("--train-ids", type=int, default=150)
    parser.add_argument("--test-ids", type=int, default=150)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("overrides", nargs="*", help="extra config overrides for training")
    args = parser.parse_args(argv)
    setup_logging()
    out = Path(args.out).resolve()
    py = sys.executable
    # The steps run this same package in child processes, installed or not.
    package_root = str(Path(pipeline.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    t0 = time.time()

    raw, shards, run_dir = out / "synthetic", out / "shards", out / "run"
    if not (raw / "bounding_box_train").is_dir():
        run([py, "-m", "pipeline.cli.synth", "--out", str(raw), "--train-ids", str(args.train_ids),
             "--test-ids", str(args.test_ids), "--seed", "0"], env=env)
    if not (shards / "manifest.json").is_file():
        run([py, "-m", "pipeline.cli.prepare", "--format", "market1501", "--root", str(raw), "--out", str(shards)],
            env=env)

    overrides = [f"data.shards={shards}", f"output_dir={run_dir}", f"tracking.uri={args.tracking_uri}",
                 "eval.at_start=true", *args.overrides]
    run([py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
         "-m", "pipeline.cli.train", "--config", RECIPE, *overrides], env=env)

    summary = json.loads((run_dir / "summary.json").read_text())
    checkpoint = summary["checkpoint"]
    result = run([py, "-m", "pipeline.cli.evaluate", "--config", RECIPE, "--checkpoint", checkpoint,
                  "--output-dir", str(run_dir / "final_eval"), f"data.shards={shards}"],
                 stdout=subprocess.PIPE, text=True, env=env)
    print(result.stdout, end="")
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    print()
    print(f"demo finished in {time.time() - t0:.0f}s")
    print(f"  rank-1 {metrics['rank1']:.1%}   mAP {metrics['mAP']:.1%}   mINP {metrics['mINP']:.1%}")
    print(f"  checkpoint: {checkpoint}")
    print(f"  plots:      {run_dir / 'final_eval'}")
    print(f"  tracked in: {args.tracking_uri} (experiment 'demo', run {summary.get('mlflow_run_id')})")
    if args.tracking_uri.startswith("sqlite:///"):
        print(f"  browse:     mlflow ui --backend-store-uri {args.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
