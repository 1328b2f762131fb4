"""The AlignedReID ablation in one command: what the aligned local loss, mutual learning, the local
distance at test and re-ranking each buy on your data (pipeline/ablation/ has the details).

    reid-ablate --config configs/demo.yaml --shards DIR --seeds 3 --out ablation/ \\
        [--variants global,aligned,mutual] [--nproc 2] [--tracking-uri URI] [--experiment NAME] \\
        [key.sub=value ...]
    reid-ablate --config configs/demo.yaml --synthetic-misalign 0,0.25,0.5,0.75,1 \\
        --seeds 2 --out misalign/ train.epochs=8            # the gain against crop misalignment

Trains every training variant (global: loss.local_weight=0; aligned: + the aligned local loss;
mutual: + deep mutual learning) once per seed with the same recipe and budget, each as its own
torchrun job (--nproc 1: one plain process) into <out>/[misalign-<level>/]<variant>/seed<s>/ (its
output in train.log there), then tests each final checkpoint four ways (global, global+local, both
re-ranked). Extra key.sub=value overrides go to every training. Writes <out>/ablation.md (mean ± std
over seeds, min–max, and the gains), <out>/ablation.json, <out>/ablation.png (and, with
--synthetic-misalign, <out>/misalign_gain.png); prints the table and, as the last stdout line, the
JSON. Everything is tracked in one MLflow experiment (default ablation-<recipe>) under a parent run.

Re-running the same command trains nothing that finished, resumes what crashed and tests what is
untested; a command whose settings differ from what <out> was trained with is refused (exit 2).
A failed training stops the ablation with exit status 1 and the tail of its log.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from pipeline.ablation import (DEFAULT_CURVE_VARIANTS, DEFAULT_VARIANTS, AblationError, AblationOptions,
                               TrainingFailed, format_report, parse_image_size, parse_levels, parse_seeds,
                               parse_tests, parse_variants, run_ablation)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, type=Path, help="YAML recipe (configs/*.yaml)")
    ap.add_argument("--out", required=True, type=Path, help="ablation folder (re-use it to resume)")
    data = ap.add_argument_group("data (default: the recipe's data.shards)")
    data.add_argument("--shards", type=Path, help="shard folder (launch/prepare_data.py)")
    data.add_argument("--synthetic-misalign", metavar="LEVELS",
                      help="comma-separated misalignment levels in [0, 1]: draw the synthetic data set at "
                           "each (cached in <out>/data/) and ablate on each; draws misalign_gain.png")
    data.add_argument("--train-ids", type=int, default=150, help="synthetic train identities (default 150)")
    data.add_argument("--test-ids", type=int, default=150, help="synthetic test identities (default 150)")
    data.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    data.add_argument("--image-size", help="HxW of the synthetic images (default: the recipe's data.image_size)")
    ap.add_argument("--seeds", type=int, help="train seeds 0..N-1 (default 3)")
    ap.add_argument("--seed-list", help="explicit seeds, e.g. 0,1,2 (instead of --seeds)")
    ap.add_argument("--variants", help=f"training variants (default {','.join(DEFAULT_VARIANTS)}; "
                                       f"with --synthetic-misalign {','.join(DEFAULT_CURVE_VARIANTS)})")
    ap.add_argument("--test-variants", help="test variants (default all: global,global+local,"
                                            "global_local_sum,local,global_rerank,global_local_rerank)")
    ap.add_argument("--alignment-pairs", type=int, default=200,
                    help="synthetic data: same-person pairs on which the stripe alignment is measured "
                         "(default 200; 0 skips it)")
    ap.add_argument("--nproc", type=int, default=1, help="processes per training (torchrun; default 1)")
    ap.add_argument("--tracking-uri", help="MLflow store (default: tracking.uri, $MLFLOW_TRACKING_URI, "
                                           "sqlite:///mlflow.db)")
    ap.add_argument("--experiment", help="MLflow experiment (default ablation-<recipe name>)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every training")
    args = ap.parse_intermixed_args(argv)

    # SIGTERM (a scheduler, `kill`) stops like Ctrl-C: the running training is asked to checkpoint
    # and the parent MLflow run is marked KILLED, so the same command resumes later.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Bounded MLflow calls in this process (training processes bound their own: pipeline/tracking/).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    try:
        levels = parse_levels(args.synthetic_misalign) if args.synthetic_misalign is not None else None
        opts = AblationOptions(
            recipe=args.config, out=args.out, seeds=parse_seeds(args.seeds, args.seed_list),
            variants=parse_variants(args.variants, DEFAULT_CURVE_VARIANTS if levels else DEFAULT_VARIANTS),
            tests=parse_tests(args.test_variants), overrides=list(args.overrides), nproc=args.nproc,
            shards=args.shards, levels=levels, train_ids=args.train_ids, test_ids=args.test_ids,
            data_seed=args.data_seed, image_size=parse_image_size(args.image_size) if args.image_size else None,
            tracking_uri=args.tracking_uri, experiment=args.experiment, alignment_pairs=args.alignment_pairs)
        report = run_ablation(opts, log=lambda msg: print(msg, flush=True))
    except AblationError as exc:
        print(f"ablation error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:
        print(f"ablation stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ablation interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    print()
    print(format_report(report))
    print("wrote " + ", ".join(report["files"].values()))
    if report["parent_run_id"]:
        print(f"MLflow: experiment '{report['experiment']}' at {report['tracking_uri']}, parent run "
              f"{report['parent_run_id']}")
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
