"""Evaluate a trained checkpoint on the query/gallery shards: single process, or under torchrun (every
rank extracts features for its share of query and gallery and scores its share of the queries).

    reid-evaluate --config configs/market1501.yaml \\
        --checkpoint outputs/market1501/checkpoints [--rerank] [--distance global|local|global+local] \\
        [--output-dir DIR] [key.sub=value ...]
    torchrun --standalone --nproc-per-node 4 -m pipeline.cli.evaluate --config ... --checkpoint ...

--checkpoint takes a ckpt-*.pt file, a checkpoints directory or a run directory (their `latest`). The
network is rebuilt from the checkpoint; the config gives the shards, image size and eval settings
(--rerank / --distance override eval.rerank / eval.distance). Rank 0 prints a table and, as the last
line of stdout, one JSON object: rank1, rank5, rank10, mAP, mINP (fractions), cmc, valid_queries,
artifacts, checkpoint, distance, rerank. Pictures (cmc.png, ranked_lists.png, and alignment.png: a few
queries with their stripes and the aligned path's stripe pairs) and metrics.json go to --output-dir; by default
they land beside the checkpoint evaluated: <run>/eval/<checkpoint name>/ for a checkpoint in
<run>/checkpoints/, else <checkpoint folder>/eval-<checkpoint name>/ (never into the recipe's
output_dir relative to the current directory). Progress bars go to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import CHOICES, ConfigError, load_config
from pipeline.logs import setup_logging


def table(result: dict, checkpoint: Path, info: dict, distance: str, rerank: bool) -> str:
    trained = ", ".join(f"{k.replace('_', ' ')} {info[k]}" for k in ("epoch", "global_step") if k in info)
    lines = [f"checkpoint  {checkpoint}" + (f" ({trained})" if trained else ""),
             f"distance    {distance}{', re-ranked (k1=20, k2=6, lambda=0.3)' if rerank else ''}",
             f"queries     {result['valid_queries']} with a correct match in the gallery",
             "", f"{'metric':<8}{'value':>8}"]
    for key, name in (("rank1", "rank-1"), ("rank5", "rank-5"), ("rank10", "rank-10"),
                      ("mAP", "mAP"), ("mINP", "mINP")):
        lines.append(f"{name:<8}{100 * result[key]:>7.2f}%")
    lines += [""] + [f"wrote       {path}" for path in result["artifacts"]]
    return "\n".join(lines)


def default_output_dir(checkpoint: Path) -> Path:
    """Beside the checkpoint: the run's eval/ folder when it sits in <run>/checkpoints/."""
    checkpoint = checkpoint.resolve()
    stem = checkpoint.name.removesuffix(".pt")
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "eval" / stem
    return checkpoint.parent / f"eval-{stem}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reid-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--checkpoint", required=True,
                        help="ckpt-*.pt file, checkpoints directory or run directory")
    parser.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=None,
                        help="k-reciprocal re-ranking (default: eval.rerank)")
    parser.add_argument("--distance", choices=CHOICES["eval.distance"],
                        help="global, local (aligned stripes), global+local (both on a common scale: each over "
                             "its largest possible value) or global+local-sum (the reproductions' plain sum); "
                             "default: eval.distance")
    parser.add_argument("--output-dir", help="where pictures and metrics.json go")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    from pipeline import distributed as D
    from pipeline.model import model_from_checkpoint
    from pipeline.data import eval_source
    from pipeline.evaluation import evaluate

    try:   # read once: a file, or a directory's newest usable checkpoint
        model, info = model_from_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        print(f"checkpoint error: {exc}", file=sys.stderr)
        return 2
    checkpoint = Path(info["path"])
    image_size = tuple(cfg.data.image_size)
    trained_size = tuple(info["image_size"]) if info["image_size"] else None
    if trained_size is not None and trained_size != image_size:
        print(f"warning: {checkpoint} was trained at {list(trained_size)} but data.image_size is "
              f"{list(image_size)}; evaluating at {list(image_size)}", file=sys.stderr)
    dist = D.init_distributed(cfg.engine.dist_backend, cfg.engine.timeout_s)
    distance = args.distance or cfg.eval.distance
    rerank = cfg.eval.rerank if args.rerank is None else args.rerank
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(checkpoint)
    try:
        shards = eval_source(cfg.data.shards, cfg.eval.shards, cache_dir=cfg.data.cache_dir)
        result = evaluate(model.to(dist.device), shards, image_size=image_size,
                          device=dist.device, distance=distance, rerank=rerank,
                          batch_size=cfg.eval.batch_size, max_rank=cfg.eval.max_rank,
                          output_dir=output_dir if dist.is_main else None, plots=cfg.eval.plots,
                          num_workers=cfg.data.num_workers)
    finally:
        D.cleanup()
    if dist.is_main and cfg.eval.plots:
        from pipeline.evaluation.alignment_view import alignment_picture

        picture = alignment_picture(model, shards, output_dir / "alignment.png", image_size=image_size,
                                    device=dist.device, distance=distance)
        if picture is not None:
            result["artifacts"].append(picture)
    if dist.is_main:
        print(table(result, checkpoint, info, distance, rerank))
        summary = {**{k: v for k, v in result.items() if k != "cmc"},
                   "cmc": [round(float(x), 6) for x in result["cmc"]],
                   "checkpoint": str(checkpoint), "distance": distance, "rerank": rerank}
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
