"""Write the synthetic pedestrian dataset (Market-1501 layout), optionally packed into shards.

    reid-synth --out demo_out/synthetic
    reid-synth --out demo_out/synthetic --shards demo_out/shards --train-ids 150
    reid-synth --out hard/synthetic --misalign 1.0     # the hardest misalignment
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.data.datasets import parse_dataset
from pipeline.data.shards import format_summary, write_shards
from pipeline.data.synthetic import make_synthetic
from pipeline.logs import setup_logging


def image_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size {text!r}: expected HxW, e.g. 128x64") from None
    return h, w


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="reid-synth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="dataset folder to write (Market-1501 layout)")
    ap.add_argument("--train-ids", type=int, default=150)
    ap.add_argument("--test-ids", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=image_size, default=(128, 64), help="HxW (default 128x64)")
    ap.add_argument("--cameras", type=int, default=6)
    ap.add_argument("--images-per-id", type=int, default=18)
    ap.add_argument("--misalign", type=float, default=0.5,
                    help="0 aligned crops .. 1 the hardest misalignment: vertical shift and scale, "
                         "upper-body-only crops, occluders (default 0.5)")
    ap.add_argument("--shards", type=Path, help="also pack the dataset into shards here")
    ap.add_argument("--images-per-shard", type=int, default=1000)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        counts = make_synthetic(args.out, train_ids=args.train_ids, test_ids=args.test_ids, seed=args.seed,
                                image_size=args.image_size, cameras=args.cameras,
                                images_per_id=args.images_per_id, misalign=args.misalign,
                                progress=not args.no_progress)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.shards is not None:
        manifest = write_shards(parse_dataset("market1501", args.out), args.shards,
                                images_per_shard=args.images_per_shard, progress=not args.no_progress)
        print(f"packed {args.shards}:")
        print(format_summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
