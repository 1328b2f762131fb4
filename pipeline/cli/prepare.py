"""Pack a re-ID dataset into WebDataset shards + manifest.json.

    reid-prepare --format market1501 --root data/Market-1501-v15.09.15 --out shards/market
    reid-prepare --format cuhk03np --root data/cuhk03-np --cuhk03-variant labeled --out ...
    reid-prepare --format csv --root data/mine/list.csv --out shards/mine
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.data.datasets import CUHK03_VARIANTS, FORMATS, DatasetError, parse_dataset
from pipeline.data.shards import DEFAULT_IMAGES_PER_SHARD, ShardError, format_summary, write_shards
from pipeline.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="reid-prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", required=True, choices=FORMATS,
                    help="dataset layout (dukemtmc uses the Market-1501 parser)")
    ap.add_argument("--root", required=True, type=Path, help="dataset folder (csv: the .csv file or its folder)")
    ap.add_argument("--out", required=True, type=Path, help="output folder for the shards and manifest.json")
    ap.add_argument("--images-per-shard", type=int, default=DEFAULT_IMAGES_PER_SHARD)
    ap.add_argument("--cuhk03-variant", choices=CUHK03_VARIANTS, default="detected")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        dataset = parse_dataset(args.format, args.root, cuhk03_variant=args.cuhk03_variant)
        manifest = write_shards(dataset, args.out, images_per_shard=args.images_per_shard,
                                progress=not args.no_progress)
    except (DatasetError, ShardError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.format}):")
    print(format_summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
