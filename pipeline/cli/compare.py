"""Compare the MLflow runs of one experiment: a table of the params that differ and the results,
best first, plus PNG plots of the chosen metric and of the loss curves.

    reid-compare --experiment alignedreid --metric mAP \
        --filter "params.model.backbone = 'resnet50'" --out compare_out

The store is --tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (as for training).
"""
from __future__ import annotations

import argparse
import sys

from pipeline.logs import setup_logging
from pipeline.tracking.compare import compare_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reid-compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment)")
    parser.add_argument("--metric", default="mAP", help="metric to sort and plot by (default: mAP)")
    parser.add_argument("--filter", default=None, help="MLflow search filter, e.g. \"params.data.p = '16'\"")
    parser.add_argument("--out", default=None, help="directory for runs.csv and the PNG plots")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store or server URI")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        result = compare_runs(args.experiment, metric=args.metric, filter_string=args.filter,
                              out_dir=args.out, tracking_uri=args.tracking_uri)
    except ValueError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    print(f"{len(result.runs)} run(s) of '{result.experiment}' at {result.tracking_uri}, "
          f"sorted by {result.metric_key}")
    print(result.table())
    for path in result.files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
