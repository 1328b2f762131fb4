"""The ablation itself: every (level, variant, seed) run trained once, tested, summarised and tracked."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from collections.abc import Callable

from pipeline.config import Config, ConfigError, flatten, load_config, parse_override
from pipeline.fileio import atomic_write

from .options import (HEARTBEAT_S, METRICS, TEST_VARIANTS, AblationError, TrainingFailed, check_user_overrides,
                      comparable, differences, level_name, run_overrides)
from .plots import plot_bars, plot_curve
from .runs import (_fmt_s, evaluate_run, finished_summary, measure_alignment, prepare_synthetic, run_training,
                   synthetic_level, train_command)
from .stats import aggregate, branch_table, compute_gains, format_report, misalign_curve
from .tracking import AblationTracking, parent_metrics


@dataclass
class AblationOptions:
    """What launch/ablate.py passes; see its --help."""
    recipe: Path
    out: Path
    seeds: list[int]
    variants: list[str]
    tests: list[str] = field(default_factory=lambda: list(TEST_VARIANTS))
    overrides: list[str] = field(default_factory=list)
    nproc: int = 1
    shards: Path | None = None
    levels: list[float] | None = None
    train_ids: int = 150
    test_ids: int = 150
    data_seed: int = 0
    image_size: tuple[int, int] | None = None      # of the synthetic data; None: the recipe's
    tracking_uri: str | None = None
    experiment: str | None = None
    heartbeat_s: float = HEARTBEAT_S
    alignment_pairs: int = 200                     # synthetic data: pairs for the alignment accuracy (0: none)


@dataclass
class _Run:
    block: str
    misalign: float | None
    variant: str
    seed: int
    dir: Path
    cfg: Config
    overrides: list[str]


def _load(recipe: Path, overrides: list[str], what: str) -> Config:
    try:
        return load_config(recipe, overrides)
    except ConfigError as exc:
        raise AblationError(f"{what}: {exc}") from None


def _check_stored(path: Path, expected: dict, overrides: list[str], what: str, hint: str) -> None:
    """Refuse when `path` (written when the training started) records other settings than `expected`,
    listing the differing keys and both commands' overrides."""
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text())
    except ValueError:
        raise AblationError(f"{path} is not valid JSON; it records how {what} was trained. Restore it, "
                            "or use another --out") from None
    diff = differences(flatten(stored.get("compare", {})), flatten(expected))
    if diff:
        raise AblationError(f"{what} was trained with other settings than this command asks for "
                            f"({path}):\n  " + "\n  ".join(diff[:20])
                            + (f"\n  ... {len(diff) - 20} more" if len(diff) > 20 else "")
                            + f"\nits overrides: {' '.join(stored.get('overrides', [])) or '(none)'}"
                            + f"\nthis command:  {' '.join(overrides) or '(none)'}"
                            + f"\n{hint}")


def run_ablation(opts: AblationOptions, log: Callable[[str], None] = print) -> dict:
    """Train what is missing, test what is untested, and return the report (also written to
    <out>/ablation.md, ablation.json, ablation.png and, with levels, misalign_gain.png)."""
    if opts.nproc < 1:
        raise AblationError(f"--nproc {opts.nproc}: at least 1")
    if opts.shards is not None and opts.levels:
        raise AblationError("give --shards or --synthetic-misalign, not both")
    if opts.levels and not {"global", "aligned"} <= set(opts.variants):
        raise AblationError(f"--synthetic-misalign draws the aligned − global gain: --variants must include "
                            f"global and aligned (got {','.join(opts.variants)})")
    check_user_overrides(opts.overrides)
    recipe = opts.recipe.resolve()
    if not recipe.is_file():
        raise AblationError(f"recipe {opts.recipe} not found")
    if any(parse_override(o)[0] == "data.shards" for o in opts.overrides):
        if opts.shards is not None:
            raise AblationError("give the data as --shards DIR or as the override data.shards=DIR, not both")
        if opts.levels:
            raise AblationError("--synthetic-misalign draws its own data: drop the data.shards override")
    base = _load(recipe, opts.overrides, "the recipe with your overrides")
    out = opts.out.resolve()
    local_weight = base.loss.local_weight

    # The data sets (blocks): one shard set, or the synthetic data at each misalignment level.
    blocks: list[tuple[str, float | None, Path]] = []
    if opts.levels:
        image_size = tuple(opts.image_size or base.data.image_size)
        for level in opts.levels:
            blocks.append((level_name(level), level, out / "data" / level_name(level) / "shards"))
        data_spec = {"mode": "synthetic", "train_ids": opts.train_ids, "test_ids": opts.test_ids,
                     "data_seed": opts.data_seed, "image_size": list(image_size)}
    else:
        shards = Path(opts.shards if opts.shards is not None else base.data.shards).resolve()
        if not (shards / "manifest.json").is_file():
            raise AblationError(f"no shards at {shards} (no manifest.json): pass --shards DIR (made by "
                                "launch/prepare_data.py) or --synthetic-misalign LEVELS")
        blocks.append(("shards", None, shards))
        data_spec = {"mode": "shards", "shards": str(shards)}

    # Every run's resolved config, checked against what an earlier command trained there.
    state_path = out / "ablation_state.json"
    base_config = comparable(base)
    base_config.pop("data.shards")                     # the data are data_spec's business
    settings = {"recipe": str(recipe), "nproc": opts.nproc, "data": data_spec, "config": base_config}
    _check_stored(state_path, settings, opts.overrides, f"the ablation in {out}",
                  "Re-run with the same recipe, overrides, --nproc and data to resume it, or use another --out.")
    runs: list[_Run] = []
    for name, level, shards in blocks:
        for seed in opts.seeds:
            for variant in opts.variants:
                overrides = run_overrides(opts.overrides, variant, seed, shards, local_weight)
                cfg = _load(recipe, overrides, f"run {variant} seed {seed}")
                run_dir = out / (name if level is not None else "") / variant / f"seed{seed}"
                runs.append(_Run(name, level, variant, seed, run_dir, cfg, overrides))
                _check_stored(run_dir / "ablation_run.json", {"nproc": opts.nproc, **comparable(cfg)},
                              overrides, f"run {run_dir}",
                              "Re-run with the same overrides and --nproc to resume it, or use another --out.")

    tracking = None
    previous = json.loads(state_path.read_text()) if state_path.is_file() else {}
    from pipeline.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(opts.tracking_uri or base.tracking.uri)
    experiment = opts.experiment or f"ablation-{recipe.stem}"
    if base.tracking.enabled:
        tracking = AblationTracking(uri, experiment)
        run_name = (f"ablation {recipe.stem}{' misalign' if opts.levels else ''} "
                    f"{datetime.now().strftime('%Y-%m-%d %H:%M')}")
        params = {"recipe": str(recipe), "nproc": str(opts.nproc), "overrides": " ".join(opts.overrides)[:6000],
                  **{f"data.{k}": str(v) for k, v in data_spec.items()}}
        tags = {"ablation": "parent", "ablation.seeds": ",".join(map(str, opts.seeds)),
                "ablation.variants": ",".join(opts.variants),
                **({"ablation.levels": ",".join(f"{v:g}" for v in opts.levels)} if opts.levels else {})}
        tracking.open_parent(run_name, previous, params, tags)
        log(f"MLflow: experiment '{experiment}' at {uri}, parent run {tracking.parent_id}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(state_path, json.dumps({"compare": settings, "overrides": opts.overrides,
                                         "tracking_uri": uri if tracking else None,
                                         "experiment": experiment if tracking else None,
                                         "parent_run_id": tracking.parent_id if tracking else
                                         previous.get("parent_run_id")}, indent=1) + "\n")

    status = "FAILED"
    try:
        for _name, level, shards in blocks:
            if level is not None:
                prepare_synthetic(shards.parent, level, train_ids=opts.train_ids, test_ids=opts.test_ids,
                                  seed=opts.data_seed, image_size=image_size, log=log)
        per_run = _train_and_test(runs, opts, recipe, tracking, log)
        report = _report(opts, recipe, out, blocks, per_run, runs, local_weight, tracking, uri, experiment)
        status = "FINISHED"
        return report
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracking is not None:
            tracking.finish(status)


def _train_and_test(runs: list[_Run], opts: AblationOptions, recipe: Path, tracking: AblationTracking | None,
                    log: Callable[[str], None]) -> dict:
    """Each run in turn: train it unless it finished, then test it. Returns
    per_run[block][variant][seed] = {"tests": {...}, "summary": {...}}."""
    per_run: dict = {}
    t_all = time.monotonic()
    for k, run in enumerate(runs, 1):
        where = f"{run.block} " if run.misalign is not None else ""
        head = f"[{k}/{len(runs)}] {where}{run.variant} seed {run.seed}"
        summary = finished_summary(run.dir, run.cfg.train.epochs)
        if summary is not None:
            log(f"{head}: already trained ({run.dir / 'summary.json'})")
        else:
            tracked = [f"tracking.uri={tracking.uri}", f"tracking.experiment={tracking.experiment}",
                       f"tracking.run_name={where}{run.variant} seed{run.seed}",
                       f"tracking.tags={json.dumps(_child_tags(run, tracking))}"] if tracking else []
            cmd = train_command(recipe, opts.nproc, [*run.overrides, f"output_dir={run.dir}", *tracked])
            run.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(run.dir / "ablation_run.json", json.dumps({
                "variant": run.variant, "seed": run.seed, "misalign": run.misalign, "recipe": str(recipe),
                "overrides": run.overrides, "command": cmd,
                "compare": {"nproc": opts.nproc, **comparable(run.cfg)}}, indent=1) + "\n")
            resumed = " (resuming)" if (run.dir / "checkpoints" / "latest").is_file() else ""
            log(f"{head}: training{resumed} -> {run.dir / 'train.log'}")
            elapsed = run_training(cmd, run.dir, log, opts.heartbeat_s)
            summary = finished_summary(run.dir, run.cfg.train.epochs)
            if summary is None:
                raise TrainingFailed(f"training ended without a finished summary.json in {run.dir}; "
                                     f"see {run.dir / 'train.log'}")
            log(f"{head}: trained in {_fmt_s(elapsed)} (ablation so far {_fmt_s(time.monotonic() - t_all)})")
        tests = evaluate_run(Path(summary["checkpoint"]), run.cfg, run.dir, opts.tests, log)
        # Synthetic data: the generator knows each stripe's body part, so the alignment is measurable.
        level = run.misalign if run.misalign is not None else synthetic_level(Path(run.cfg.data.shards))
        alignment = (measure_alignment(Path(summary["checkpoint"]), run.cfg, run.dir, level, run.seed, log,
                                       pairs=opts.alignment_pairs)
                     if level is not None and opts.alignment_pairs > 0 else None)
        if tracking is not None:
            run_id = summary.get("mlflow_run_id") or _tracked_run_id(run.dir)
            tracking.log_child(run_id, _child_tags(run, tracking), tests)
        per_run.setdefault(run.block, {}).setdefault(run.variant, {})[run.seed] = {
            "tests": tests, "summary": summary, "alignment": alignment}
    return per_run


def _child_tags(run: _Run, tracking: AblationTracking) -> dict[str, str]:
    """mlflow.parentRunId nests the training under the parent in `mlflow ui`; the rest filters."""
    tags = {"mlflow.parentRunId": tracking.parent_id, "ablation.variant": run.variant,
            "ablation.seed": str(run.seed)}
    if run.misalign is not None:
        tags["ablation.misalign"] = f"{run.misalign:g}"
    return tags


def _tracked_run_id(run_dir: Path) -> str | None:
    path = run_dir / "tracking" / "run.json"
    try:
        return json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def _report(opts: AblationOptions, recipe: Path, out: Path, blocks, per_run: dict, runs: list[_Run],
            local_weight: float, tracking: AblationTracking | None, uri: str, experiment: str) -> dict:
    report: dict[str, Any] = {
        "recipe": str(opts.recipe), "nproc": opts.nproc, "overrides": list(opts.overrides),
        "seeds": list(opts.seeds), "train_variants": list(opts.variants), "test_variants": list(opts.tests),
        "test_labels": {k: TEST_VARIANTS[k][0] for k in opts.tests}, "metrics": list(METRICS),
        "units": "fractions (the table shows percent)",
        "aligned_local_weight": local_weight if local_weight > 0 else 1.0,
        "tracking_uri": uri if tracking else None, "experiment": experiment if tracking else None,
        "parent_run_id": tracking.parent_id if tracking else None, "blocks": {},
    }
    for name, level, shards in blocks:
        values = {v: {s: {t: {m: per_run[name][v][s]["tests"][t][m] for m in METRICS} for t in opts.tests}
                      for s in opts.seeds} for v in opts.variants}
        report["blocks"][name] = {
            "misalign": level, "shards": str(shards),
            "results": aggregate(values, opts.variants, opts.seeds, opts.tests),
            "gains": compute_gains(values, opts.variants, opts.seeds, opts.tests),
            "branch": branch_table({v: [per_run[name][v][s] for s in opts.seeds] for v in opts.variants}),
            "runs": {},
        }
        for run in (r for r in runs if r.block == name):
            summary = per_run[name][run.variant][run.seed]["summary"]
            report["blocks"][name]["runs"].setdefault(run.variant, {})[str(run.seed)] = {
                "dir": str(run.dir), "mlflow_run_id": summary.get("mlflow_run_id"),
                "checkpoint": summary["checkpoint"]}
    if opts.levels:
        report["misalign_curve"] = misalign_curve(report["blocks"], opts.variants)
    files = {"table": out / "ablation.md", "json": out / "ablation.json", "plot": out / "ablation.png"}
    if report.get("misalign_curve"):
        files["curve_plot"] = out / "misalign_gain.png"
    report["files"] = {k: str(v) for k, v in files.items()}
    atomic_write(files["table"], format_report(report))
    atomic_write(files["json"], json.dumps(report, indent=1) + "\n")
    plot_bars(report, files["plot"])
    if "curve_plot" in files:
        plot_curve(report["misalign_curve"], files["curve_plot"])
    if tracking is not None:
        tracking.log_parent(parent_metrics(report), list(files.values()))
    return report
