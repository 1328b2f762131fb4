"""The AlignedReID ablation: what each part of the method buys on a given data set (launch/ablate.py).

Training variants, every one with the same recipe, epochs, steps and data (only the loss changes):

    global    global triplet + ID loss only           loss.local_weight=0, mutual.enabled=false
    aligned   + the aligned local (stripe) loss       loss.local_weight=<recipe's, or 1.0 if it is 0>
    mutual    + deep mutual learning of two networks  as aligned, mutual.enabled=true

Each is trained once per seed (``seed=<s>``) as a real ``torchrun`` (or, with one process, ``python``)
subprocess of launch/train.py into ``<out>/[<level>/]<variant>/seed<s>/``, its output in ``train.log``
there. Each trained model's final checkpoint is then tested four ways, in this process, with
:func:`pipeline.evaluation.evaluate`: the global feature, global + aligned local distance, and both
with k-reciprocal re-ranking; each result is ``test_<key>.json`` in the run folder.

The outcome is a table of mean ± sample standard deviation over seeds (and min–max) per training ×
test variant, the gains between variants (per-seed paired differences), a grouped bar plot and one
JSON object with every per-seed value. With synthetic misalignment levels (``levels``) the whole
ablation runs on the embedded synthetic data set drawn at each level, and a curve of the aligned −
global gain against the level is drawn as well.

Why it is built the way it is:

* Re-running the same command must cost nothing that is already done, because one ablation is many
  hours of training. A run whose ``summary.json`` says it finished is not trained again; a run that
  crashed is re-launched with the same command and the trainer resumes from its own checkpoint;
  missing test results are recomputed. What makes "the same" checkable is ``ablation_run.json`` in
  each run folder (the resolved config the run was trained with) and ``<out>/ablation_state.json``
  (the recipe, overrides and data of the whole ablation): a command that would mix runs trained
  differently into one table is refused, naming the keys that differ.
* MLflow: one parent run per ablation (reused by a re-run of the same ``--out``), every training run
  nested under it through the ``tracking.tags`` config key (``mlflow.parentRunId``), test metrics on
  the child runs, means/spreads and the table, JSON and plots on the parent. The results on disk are
  the source of truth: a tracking store that fails after the start only costs a warning.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from pipeline.config import Config, ConfigError, flatten, load_config, parse_override
from pipeline.fileio import atomic_path, atomic_write

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "launch" / "train.py"

TRAIN_VARIANTS = ("global", "aligned", "mutual")
DEFAULT_VARIANTS = ("global", "aligned", "mutual")
DEFAULT_CURVE_VARIANTS = ("global", "aligned")
# key (file names, MLflow metric names: '+' is not allowed there) -> (label, distance, rerank)
TEST_VARIANTS: dict[str, tuple[str, str, bool]] = {
    "global": ("global", "global", False),
    "global_local": ("global+local", "global+local", False),
    "global_rerank": ("global re-ranked", "global", True),
    "global_local_rerank": ("global+local re-ranked", "global+local", True),
}
METRICS = ("rank1", "mAP", "mINP")
METRIC_LABELS = {"rank1": "rank-1", "mAP": "mAP", "mINP": "mINP"}
# Overrides the ablation sets itself; a user override of them would silently break the comparison.
RESERVED_OVERRIDES = {
    "seed": "the ablation sets seed=<s> per run; use --seeds N or --seed-list 0,1,2",
    "output_dir": "the ablation puts each run in <out>/<variant>/seed<s>; use --out",
    "mutual.enabled": "the training variant decides it (mutual = aligned + mutual learning); use --variants",
    "tracking.tags": "the ablation tags its runs (parent run, variant, seed)",
    "tracking.experiment": "use --experiment",
    "tracking.uri": "use --tracking-uri",
}
HEARTBEAT_S = 60.0        # a progress line this often while a training runs
FAILURE_TAIL_LINES = 40


class AblationError(Exception):
    """Wrong arguments, or a command that does not match what an earlier one trained (exit 2)."""


class TrainingFailed(Exception):
    """A training subprocess failed; the message names its log (exit 1)."""


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------
def parse_seeds(seeds: int | None, seed_list: str | None) -> list[int]:
    """--seeds N (0..N-1) or --seed-list 0,1,2 (not both); default 3 seeds."""
    if seeds is not None and seed_list is not None:
        raise AblationError("give --seeds N or --seed-list a,b,c, not both")
    if seed_list is not None:
        try:
            out = [int(s) for s in seed_list.split(",") if s.strip()]
        except ValueError:
            raise AblationError(f"--seed-list {seed_list!r}: expected integers separated by commas, "
                                "e.g. 0,1,2") from None
        if not out or len(set(out)) != len(out):
            raise AblationError(f"--seed-list {seed_list!r}: needs at least one seed and no repeats")
        return out
    n = 3 if seeds is None else seeds
    if n < 1:
        raise AblationError(f"--seeds {n}: at least 1 (2 or more for a spread)")
    return list(range(n))


def parse_variants(text: str | None, default: tuple[str, ...]) -> list[str]:
    """Comma-separated training variants, returned in the canonical order global, aligned, mutual."""
    if text is None:
        return list(default)
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in TRAIN_VARIANTS]
    if unknown or not names:
        raise AblationError(f"--variants {text!r}: unknown {unknown}; choose from {', '.join(TRAIN_VARIANTS)}")
    return [v for v in TRAIN_VARIANTS if v in names]


def parse_tests(text: str | None) -> list[str]:
    """Comma-separated test variants (keys or labels: global, global+local, global_rerank, ...)."""
    if text is None:
        return list(TEST_VARIANTS)
    by_label = {label: key for key, (label, _, _) in TEST_VARIANTS.items()}
    keys = []
    for name in (v.strip() for v in text.split(",") if v.strip()):
        key = name if name in TEST_VARIANTS else by_label.get(name)
        if key is None:
            raise AblationError(f"--test-variants: unknown {name!r}; choose from "
                                f"{', '.join(TEST_VARIANTS)} (or {', '.join(by_label)})")
        keys.append(key)
    if not keys:
        raise AblationError("--test-variants: name at least one")
    return [k for k in TEST_VARIANTS if k in keys]


def parse_levels(text: str) -> list[float]:
    """--synthetic-misalign 0,0.5,1: distinct levels in [0, 1], sorted."""
    try:
        levels = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AblationError(f"--synthetic-misalign {text!r}: expected numbers in [0, 1] separated by "
                            "commas, e.g. 0,0.5,1") from None
    bad = [v for v in levels if not 0.0 <= v <= 1.0]
    if not levels or bad:
        raise AblationError(f"--synthetic-misalign {text!r}: levels must lie in [0, 1] (0 aligned crops, "
                            f"1 the hardest misalignment); out of range: {bad}")
    if len(set(levels)) != len(levels):
        raise AblationError(f"--synthetic-misalign {text!r}: a level is repeated")
    return sorted(levels)


def parse_image_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise AblationError(f"--image-size {text!r}: expected HxW, e.g. 128x64") from None
    return h, w


def level_name(level: float) -> str:
    """The block / folder name of a misalignment level: misalign-0, misalign-0.25, misalign-1."""
    return f"misalign-{level:g}"


def check_user_overrides(overrides: list[str]) -> None:
    """Refuse malformed overrides and those that the ablation sets itself (naming the alternative)."""
    for text in overrides:
        try:
            key, _ = parse_override(text)
        except ConfigError as exc:
            raise AblationError(str(exc)) from None
        for reserved, why in RESERVED_OVERRIDES.items():
            if key == reserved or key.startswith(reserved + "."):
                raise AblationError(f"override '{text}': {why}")


def variant_overrides(variant: str, recipe_local_weight: float) -> list[str]:
    """The loss/mutual overrides that make `variant` out of the recipe. The aligned local loss keeps
    the recipe's weight; a recipe without it (weight 0) gets the paper's 1.0."""
    if variant not in TRAIN_VARIANTS:
        raise AblationError(f"unknown training variant {variant!r}; choose from {', '.join(TRAIN_VARIANTS)}")
    weight = recipe_local_weight if recipe_local_weight > 0 else 1.0
    if variant == "global":
        return ["loss.local_weight=0", "mutual.enabled=false"]
    return [f"loss.local_weight={weight!r}", f"mutual.enabled={'true' if variant == 'mutual' else 'false'}"]


def run_overrides(user: list[str], variant: str, seed: int, shards: str | Path,
                  recipe_local_weight: float) -> list[str]:
    """Every training override of one run except where it writes and how it is tracked.

    Order matters (the last one wins): final evaluation only and no logged model unless the user
    says otherwise, then the user's overrides, then what the ablation must control."""
    return ["eval.every_epochs=0", "tracking.log_model=false", *user, f"data.shards={shards}",
            *variant_overrides(variant, recipe_local_weight), f"seed={seed}"]


def comparable(cfg: Config) -> dict[str, Any]:
    """What decides the trained model: the resolved config without where it is written or tracked,
    JSON-normalised so that a stored copy compares equal."""
    flat = {k: v for k, v in cfg.flat().items() if not k.startswith("tracking.") and k != "output_dir"}
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every key whose value differs (or exists on one side only)."""
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            out.append(f"{key}: {'(unset)' if a is missing else json.dumps(a)} -> "
                       f"{'(unset)' if b is missing else json.dumps(b)}")
    return out


# --------------------------------------------------------------------------------------------------
# Statistics and the table (pure: no training, no files)
# --------------------------------------------------------------------------------------------------
def describe(values: list[float], seeds: list[int] | None = None) -> dict[str, Any]:
    """mean, sample standard deviation (None below 2 values), min, max, n and the values themselves."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("describe: no values")
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) >= 2 else None,
            "min": min(vals), "max": max(vals), "n": len(vals), "values": vals,
            "seeds": list(seeds) if seeds is not None else list(range(len(vals)))}


def aggregate(per_run: dict[str, dict[int, dict[str, dict[str, float]]]], variants: list[str],
              seeds: list[int], tests: list[str]) -> dict[str, dict[str, dict[str, dict]]]:
    """per_run[variant][seed][test][metric] (fractions) -> results[variant][test][metric] = describe()."""
    return {v: {t: {m: describe([per_run[v][s][t][m] for s in seeds], seeds) for m in METRICS}
                for t in tests} for v in variants}


def gain_specs(variants: list[str], tests: list[str]) -> list[dict[str, str]]:
    """Which differences the ablation reports, among those its variants allow:
    training gains tested on the global feature (aligned − global, mutual − aligned), and per
    training variant what the aligned local distance and re-ranking add at test time."""
    specs = []
    if "global" in tests:
        for better, base in (("aligned", "global"), ("mutual", "aligned")):
            if better in variants and base in variants:
                specs.append({"kind": "training", "key": f"{better}-{base}", "label": f"{better} − {base}",
                              "minuend": better, "subtrahend": base, "train": None, "test": "global"})
    for variant in variants:
        for better, base, what in (("global_local", "global", "+ local distance at test"),
                                   ("global_rerank", "global", "+ re-ranking at test")):
            if better in tests and base in tests:
                specs.append({"kind": "test", "key": f"{variant}/{better}-{base}",
                              "label": f"{what} (trained {variant})", "minuend": better,
                              "subtrahend": base, "train": variant, "test": None})
    return specs


def compute_gains(per_run: dict, variants: list[str], seeds: list[int], tests: list[str]) -> list[dict]:
    """Each gain of gain_specs as describe() of the per-seed paired differences (same seed, same data
    order), so its spread is the spread of the gain, not of the two results."""
    out = []
    for spec in gain_specs(variants, tests):
        entry = dict(spec)
        for m in METRICS:
            if spec["kind"] == "training":
                diffs = [per_run[spec["minuend"]][s][spec["test"]][m] - per_run[spec["subtrahend"]][s][spec["test"]][m]
                         for s in seeds]
            else:
                run = per_run[spec["train"]]
                diffs = [run[s][spec["minuend"]][m] - run[s][spec["subtrahend"]][m] for s in seeds]
            entry[m] = describe(diffs, seeds)
        out.append(entry)
    return out


def fmt_stat(stats: dict, signed: bool = False) -> str:
    """'71.3 ± 1.2 (70.1–72.5)' in percent (one decimal); a gain (`signed`): '+3.1 ± 0.8 (+2.5 to +3.7)';
    one seed: the value alone."""
    if not signed:
        text = f"{100 * stats['mean']:.1f}"
        low_high = f"{100 * stats['min']:.1f}–{100 * stats['max']:.1f}"
    else:
        text = f"{100 * stats['mean']:+.1f}"
        low_high = f"{100 * stats['min']:+.1f} to {100 * stats['max']:+.1f}"
    if stats.get("std") is None:
        return text
    return f"{text} ± {100 * stats['std']:.1f} ({low_high})"


def format_block(block: dict, title: str) -> str:
    """One data set's results and gains as markdown tables."""
    lines = [f"## {title}", "", "| training | test | " + " | ".join(f"{METRIC_LABELS[m]} (%)" for m in METRICS) + " |",
             "|---|---|" + "---:|" * len(METRICS)]
    for variant, tests in block["results"].items():
        for test, stats in tests.items():
            lines.append(f"| {variant} | {TEST_VARIANTS[test][0]} | "
                         + " | ".join(fmt_stat(stats[m]) for m in METRICS) + " |")
    if block["gains"]:
        lines += ["", "Gains (percentage points; mean ± std of the per-seed differences):", "",
                  "| gain | test | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |",
                  "|---|---|" + "---:|" * len(METRICS)]
        for gain in block["gains"]:
            test = TEST_VARIANTS[gain["test"]][0] if gain["test"] else (
                f"{TEST_VARIANTS[gain['minuend']][0]} vs {TEST_VARIANTS[gain['subtrahend']][0]}")
            lines.append(f"| {gain['label']} | {test} | "
                         + " | ".join(fmt_stat(gain[m], signed=True) for m in METRICS) + " |")
    return "\n".join(lines)


def format_curve(curve: dict) -> str:
    """The misalignment curve as a markdown table: gain and the absolute results per level."""
    variants = list(curve["absolute"])
    head = ["misalign", "rank-1 gain (pp)", "mAP gain (pp)"] + [f"{v} rank-1 / mAP (%)" for v in variants]
    lines = [f"## Misalignment curve: {curve['gain_label']} (test: global feature)", "",
             "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for i, level in enumerate(curve["levels"]):
        cells = [f"{level:g}"] + [fmt_stat(curve["gain"][m][i], signed=True) for m in ("rank1", "mAP")]
        cells += [f"{fmt_stat(curve['absolute'][v]['rank1'][i])} / {fmt_stat(curve['absolute'][v]['mAP'][i])}"
                  for v in variants]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """The whole ablation as markdown (what goes to stdout and <out>/ablation.md)."""
    seeds = report["seeds"]
    weight = report["aligned_local_weight"]
    lines = [f"# AlignedReID ablation: {report['recipe']}", "",
             f"Seeds {', '.join(map(str, seeds))} ({len(seeds)} per variant); {report['nproc']} process(es) "
             f"per run; overrides: {' '.join(report['overrides']) or '(none)'}.",
             "Training variants (same recipe, epochs, steps and data): "
             + "; ".join(f"**{v}** = {desc}" for v, desc in (
                 ("global", "global triplet + ID (loss.local_weight=0)"),
                 ("aligned", f"+ aligned local loss (loss.local_weight={weight:g})"),
                 ("mutual", "aligned + deep mutual learning (mutual.enabled=true)"))
                 if v in report["train_variants"]) + ".",
             "Cells: mean ± sample standard deviation over seeds (min–max), percent"
             + (" (one seed: the value alone; a spread needs 2 or more)." if len(seeds) < 2 else ".")]
    if "global" in report["train_variants"] and any(t.startswith("global_local") for t in report["test_variants"]):
        lines.append("The global variant does not train its local branch: its global+local rows use an "
                     "untrained stripe head.")
    for name, block in report["blocks"].items():
        title = (f"Synthetic data, misalignment {block['misalign']:g}" if block["misalign"] is not None
                 else f"Data: {block['shards']}")
        lines += ["", format_block(block, title)]
    if report.get("misalign_curve"):
        lines += ["", format_curve(report["misalign_curve"])]
    return "\n".join(lines) + "\n"


def misalign_curve(blocks: dict[str, dict], variants: list[str]) -> dict | None:
    """aligned − global on the global feature (mean and std of the per-seed differences) and each
    variant's absolute rank-1/mAP, against the misalignment level; None without levels or without
    both variants."""
    levelled = [b for b in blocks.values() if b["misalign"] is not None]
    if not levelled or not {"global", "aligned"} <= set(variants):
        return None
    levelled.sort(key=lambda b: b["misalign"])
    gain = {m: [] for m in METRICS}
    for block in levelled:
        spec = next(g for g in block["gains"] if g["kind"] == "training" and g["key"] == "aligned-global")
        for m in METRICS:
            gain[m].append(spec[m])
    absolute = {v: {m: [b["results"][v]["global"][m] for b in levelled] for m in METRICS} for v in variants}
    return {"levels": [b["misalign"] for b in levelled], "gain_label": "aligned − global",
            "gain": gain, "absolute": absolute}


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------
def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def _err(stats: dict) -> float:
    return 100 * stats["std"] if stats.get("std") is not None else 0.0


def plot_bars(report: dict, path: Path) -> Path:
    """Grouped bars (one group per test variant, one bar per training variant) of rank-1 and mAP,
    error bars = sample std over seeds, dots = the seeds; one row per data set / level."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    blocks = report["blocks"]
    variants, tests = report["train_variants"], report["test_variants"]
    fig = Figure(figsize=(7 * 2, 4 * len(blocks)), layout="constrained")
    axes = fig.subplots(len(blocks), 2, squeeze=False)
    width = 0.8 / len(variants)
    for row, (name, block) in zip(axes, blocks.items()):
        for ax, metric in zip(row, ("rank1", "mAP")):
            top = 0.0
            for i, variant in enumerate(variants):
                xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(tests))]
                stats = [block["results"][variant][t][metric] for t in tests]
                ax.bar(xs, [100 * s["mean"] for s in stats], width, yerr=[_err(s) for s in stats],
                       capsize=3, label=variant, color=f"C{i}", alpha=0.85)
                for x, s in zip(xs, stats):
                    ax.plot([x] * len(s["values"]), [100 * v for v in s["values"]], "k.", ms=3)
                    top = max(top, 100 * s["mean"] + _err(s), 100 * s["max"])
            ax.set_xticks(range(len(tests)), [TEST_VARIANTS[t][0].replace(" ", "\n") for t in tests],
                          fontsize="small")
            label = f"misalign {block['misalign']:g}" if block["misalign"] is not None else Path(block["shards"]).name
            ax.set(ylabel=f"{METRIC_LABELS[metric]} (%)", title=f"{METRIC_LABELS[metric]} — {label}")
            ax.set_ylim(0, 1.25 * top if top > 0 else 1)          # headroom for the legend
            ax.legend(title="training", fontsize="small", loc="upper left", ncol=len(variants))
    return _save(fig, path)


def plot_curve(curve: dict, path: Path) -> Path:
    """Top: aligned − global gain in rank-1 and mAP against the misalignment level (error bars: std
    of the per-seed gains). Bottom: each training variant's absolute rank-1 and mAP."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    levels = curve["levels"]
    for col, metric in enumerate(("rank1", "mAP")):
        gain = curve["gain"][metric]
        ax = axes[0][col]
        ax.errorbar(levels, [100 * s["mean"] for s in gain], yerr=[_err(s) for s in gain], marker="o", capsize=4)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(ylabel=f"{METRIC_LABELS[metric]} gain (pp)",
               title=f"{curve['gain_label']}: {METRIC_LABELS[metric]} (test: global feature)")
        ax = axes[1][col]
        for i, (variant, by_metric) in enumerate(curve["absolute"].items()):
            stats = by_metric[metric]
            ax.errorbar(levels, [100 * s["mean"] for s in stats], yerr=[_err(s) for s in stats],
                        marker="o", capsize=4, label=variant, color=f"C{i}")
        ax.set_xticks(levels, [f"{v:g}" for v in levels])
        ax.set(xlabel="misalignment level", ylabel=f"{METRIC_LABELS[metric]} (%)",
               title=f"{METRIC_LABELS[metric]} per training variant")
        ax.legend(fontsize="small")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Data, training and testing (side effects)
# --------------------------------------------------------------------------------------------------
def prepare_synthetic(folder: Path, level: float, *, train_ids: int, test_ids: int, seed: int,
                      image_size: tuple[int, int], log: Callable[[str], None]) -> Path:
    """Shards of the embedded synthetic data set at misalignment `level` in folder/shards, drawn once
    and reused (folder/data.json records how; a different request for the same folder is refused).
    Written under a temporary name first, so an interrupted draw is never mistaken for a finished one."""
    spec = {"misalign": level, "train_ids": train_ids, "test_ids": test_ids, "data_seed": seed,
            "image_size": list(image_size)}
    shards = folder / "shards"
    stored = folder / "data.json"
    if stored.is_file() and (shards / "manifest.json").is_file():
        old = json.loads(stored.read_text())
        diff = differences(old, spec)
        if diff:
            raise AblationError(f"{folder} holds synthetic data drawn differently ({'; '.join(diff)}); "
                                "use another --out, or the same --train-ids/--test-ids/--data-seed/--image-size")
        return shards
    from pipeline.data.datasets import parse_dataset
    from pipeline.data.shards import write_shards
    from pipeline.data.synthetic import make_synthetic

    t0 = time.monotonic()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        make_synthetic(tmp / "raw", train_ids=train_ids, test_ids=test_ids, seed=seed, image_size=image_size,
                       misalign=level, progress=False)
        write_shards(parse_dataset("market1501", tmp / "raw"), tmp / "shards", progress=False)
    except ValueError as exc:
        raise AblationError(f"synthetic data at misalignment {level:g}: {exc}") from None
    shutil.rmtree(tmp / "raw")           # the shards hold the original JPEG bytes
    atomic_write(tmp / "data.json", json.dumps(spec, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    log(f"drew synthetic data at misalignment {level:g} ({train_ids} train / {test_ids} test ids, "
        f"{image_size[0]}x{image_size[1]}) in {time.monotonic() - t0:.0f}s -> {shards}")
    return shards


def train_command(recipe: Path, nproc: int, overrides: list[str]) -> list[str]:
    """torchrun --standalone with `nproc` processes; one process runs launch/train.py directly."""
    if nproc == 1:
        return [sys.executable, str(TRAIN_SCRIPT), "--config", str(recipe), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(TRAIN_SCRIPT), "--config", str(recipe), *overrides]


def training_env() -> dict[str, str]:
    """The environment of a training subprocess: fresh rendezvous stores per restart round (see
    docs/multinode.md) and unbuffered output so that train.log is current."""
    return dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", PYTHONUNBUFFERED="1")


def finished_summary(run_dir: Path, epochs: int) -> dict | None:
    """summary.json of a training that ran all `epochs` and whose final checkpoint exists, else None."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if summary.get("epochs_completed", 0) < epochs or not Path(summary.get("checkpoint", "")).is_file():
        return None
    return summary


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _last_step(run_dir: Path) -> str:
    """'epoch 3/16, step 40' from the last line of train_log.jsonl (cheap: reads the tail only)."""
    path = run_dir / "train_log.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            rec = json.loads(f.read().decode(errors="replace").strip().splitlines()[-1])
        return f"epoch {rec['epoch'] + 1}, step {rec['step']}, loss {rec.get('loss/total', float('nan')):.3f}"
    except (OSError, IndexError, KeyError, ValueError):
        return "starting"


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def run_training(cmd: list[str], run_dir: Path, log: Callable[[str], None],
                 heartbeat_s: float = HEARTBEAT_S) -> float:
    """Run one training to its end, output appended to run_dir/train.log; a progress line every
    `heartbeat_s`. No time limit: a training takes as long as its recipe says. On Ctrl-C the
    training is asked to checkpoint and stop (SIGTERM), so the next run of the command resumes it.
    Returns the elapsed seconds; raises TrainingFailed with the log's tail."""
    log_path = run_dir / "train.log"
    t0 = time.monotonic()
    with open(log_path, "a", buffering=1) as out:
        out.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} $ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=training_env(),
                                stdin=subprocess.DEVNULL)
        try:
            while True:
                try:
                    code = proc.wait(timeout=heartbeat_s)
                    break
                except subprocess.TimeoutExpired:
                    log(f"    ... {_fmt_s(time.monotonic() - t0)}: {_last_step(run_dir)}")
        except KeyboardInterrupt:
            proc.terminate()
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    elapsed = time.monotonic() - t0
    if code != 0:
        hint = ("it was preempted (exit 75) after writing a checkpoint; re-run the same command to resume"
                if code == 75 else "fix the cause and re-run the same command: it resumes from the last checkpoint")
        raise TrainingFailed(f"training failed with exit status {code} after {_fmt_s(elapsed)}; {hint}.\n"
                             f"Last lines of {log_path}:\n{_tail(log_path, FAILURE_TAIL_LINES)}\n"
                             f"(full log: {log_path})")
    return elapsed


def cached_forward(net, with_local: bool):
    """`net` (eval forward: `net(x)`, and `net(x, return_local=True)` when `with_local`) with its
    outputs memoised per input batch, keyed by a hash of the batch's bytes.

    Why: the four test variants read the same query and gallery images and feature extraction is
    nearly all of their cost; this way the network runs once per image instead of four times while
    `evaluate` is used unchanged. A batch that differs in any byte is a miss and is simply computed.
    The wrapped network is the attribute `net`, not `module`, so that `evaluate` does not unwrap it."""
    import hashlib

    import torch
    from torch import nn

    class CachedForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.cache: dict = {}

        @torch.no_grad()
        def forward(self, images, return_local: bool = False):
            data = images.detach().contiguous().cpu().numpy().tobytes()
            key = (tuple(images.shape), str(images.dtype), hashlib.blake2b(data, digest_size=16).digest())
            hit = self.cache.get(key)
            if hit is None:
                out = self.net(images, return_local=True) if with_local else (self.net(images), None)
                hit = self.cache[key] = tuple(t.cpu() if t is not None else None for t in out)
            if not return_local:
                return hit[0].to(images.device)
            if hit[1] is None:
                raise RuntimeError("cached_forward(..., with_local=False) cannot return local features")
            return hit[0].to(images.device), hit[1].to(images.device)

    return CachedForward()


def evaluate_run(checkpoint: Path, cfg: Config, run_dir: Path, tests: list[str],
               log: Callable[[str], None]) -> dict[str, dict]:
    """The test variants of one trained model: test_<key>.json in run_dir, computed for the missing
    ones (or those of another checkpoint) with pipeline.evaluation.evaluate in this process."""
    results, todo = {}, []
    for key in tests:
        path = run_dir / f"test_{key}.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("checkpoint") == str(checkpoint):
                results[key] = stored
                continue
        todo.append(key)
    if not todo:
        return results
    import torch

    from pipeline.data import eval_source
    from pipeline.evaluation import evaluate
    from pipeline.model import model_from_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shards = eval_source(cfg.data.shards, cfg.eval.shards, cache_dir=cfg.data.cache_dir)
    model, _ = model_from_checkpoint(checkpoint)
    model = cached_forward(model.to(device).eval(),
                           with_local=any(TEST_VARIANTS[k][1] != "global" for k in todo))
    for key in todo:
        label, distance, rerank = TEST_VARIANTS[key]
        t0 = time.monotonic()
        result = evaluate(model, shards, image_size=tuple(cfg.data.image_size), device=device,
                          distance=distance, rerank=rerank, batch_size=cfg.eval.batch_size,
                          max_rank=cfg.eval.max_rank, output_dir=None, plots=False,
                          num_workers=cfg.data.num_workers, progress=False)
        record = {"test": key, "label": label, "distance": distance, "rerank": rerank,
                  "checkpoint": str(checkpoint),
                  **{k: float(result[k]) for k in ("rank1", "rank5", "rank10", "mAP", "mINP")},
                  "valid_queries": int(result["valid_queries"]),
                  "cmc": [round(float(x), 6) for x in result["cmc"]]}
        atomic_write(run_dir / f"test_{key}.json", json.dumps(record, indent=1) + "\n")
        results[key] = record
        log(f"    test {label:<22} rank-1 {100 * record['rank1']:5.1f}  mAP {100 * record['mAP']:5.1f}  "
            f"mINP {100 * record['mINP']:5.1f}  ({time.monotonic() - t0:.0f}s)")
    return results


# --------------------------------------------------------------------------------------------------
# MLflow: the parent run and what goes onto the runs
# --------------------------------------------------------------------------------------------------
class AblationTracking:
    """The ablation's MLflow side: parent run, child tags and test metrics, parent summary.

    Creating (or reopening) the parent must work, or the ablation stops before training (the user
    asked for tracking: pass tracking.enabled=false to do without). Afterwards every call is
    best-effort: a failure is reported once on stderr and the ablation goes on, its files complete."""

    def __init__(self, uri: str, experiment: str):
        from mlflow import MlflowClient

        self.uri, self.experiment = uri, experiment
        self.client = MlflowClient(tracking_uri=uri)
        self.parent_id: str | None = None
        self._warned = False

    def open_parent(self, run_name: str, previous: dict | None, params: dict[str, str],
                    tags: dict[str, str]) -> str:
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        try:
            run = None
            if previous and previous.get("tracking_uri") == self.uri and previous.get("experiment") == self.experiment \
                    and previous.get("parent_run_id"):
                try:
                    run = self.client.get_run(previous["parent_run_id"])
                    if run.info.lifecycle_stage != "active":
                        run = None
                except MlflowException:
                    run = None
            if run is None:
                exp = self.client.get_experiment_by_name(self.experiment)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
                run = self.client.create_run(exp_id, run_name=run_name)
            else:
                self.client.update_run(run.info.run_id, status="RUNNING")
            self.parent_id = run.info.run_id
            new = [Param(k, v) for k, v in params.items() if k not in run.data.params]
            self.client.log_batch(self.parent_id, params=new, tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as exc:  # noqa: BLE001 - any store failure at the start stops the ablation
            raise AblationError(f"MLflow at {self.uri} (experiment '{self.experiment}'): cannot open the "
                                f"ablation's parent run ({type(exc).__name__}: {str(exc)[:300]}). Start the "
                                "server, pass --tracking-uri, or add tracking.enabled=false") from None
        return self.parent_id

    def _safe(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - tracking never takes the results down
            if not self._warned:
                self._warned = True
                print(f"warning: MLflow at {self.uri}: {what} failed ({type(exc).__name__}: {str(exc)[:300]}); "
                      "the results are complete on disk", file=sys.stderr, flush=True)

    def log_child(self, run_id: str | None, tags: dict[str, str], tests: dict[str, dict]) -> None:
        """Tag a training run as a child (again: also when it was created before this parent) and
        log its test metrics as test/<test>/<metric> (only those not already there)."""
        if not run_id:
            return
        from mlflow.entities import Metric, RunTag

        def send():
            existing = self.client.get_run(run_id).data.metrics
            now = int(time.time() * 1000)
            metrics = [Metric(f"test/{key}/{m}", float(r[m]), now, 0) for key, r in tests.items()
                       for m in ("rank1", "rank5", "mAP", "mINP")
                       if existing.get(f"test/{key}/{m}") != float(r[m])]
            self.client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])

        self._safe(f"logging to run {run_id}", send)

    def log_parent(self, metrics: dict[str, float], files: list[Path]) -> None:
        from mlflow.entities import Metric

        def send():
            now = int(time.time() * 1000)
            entries = [Metric(k, v, now, 0) for k, v in metrics.items()]
            for i in range(0, len(entries), 1000):
                self.client.log_batch(self.parent_id, metrics=entries[i:i + 1000])
            for path in files:
                self.client.log_artifact(self.parent_id, str(path))

        self._safe("logging the summary to the parent run", send)

    def finish(self, status: str) -> None:
        if self.parent_id:
            self._safe("ending the parent run", lambda: self.client.set_terminated(self.parent_id, status))


def parent_metrics(report: dict) -> dict[str, float]:
    """The table as parent-run metrics: <variant>/<test>/<metric>_mean|_std and gain/<key>/<metric>_...,
    prefixed with misalign-<level>/ for the blocks of the misalignment curve."""
    out = {}
    for name, block in report["blocks"].items():
        prefix = f"{name}/" if block["misalign"] is not None else ""
        for variant, tests in block["results"].items():
            for test, by_metric in tests.items():
                for m, stats in by_metric.items():
                    out[f"{prefix}{variant}/{test}/{m}_mean"] = stats["mean"]
                    if stats["std"] is not None:
                        out[f"{prefix}{variant}/{test}/{m}_std"] = stats["std"]
        for gain in block["gains"]:
            key = gain["key"] if gain["kind"] == "test" else f"{gain['key']}/{gain['test']}"
            for m in METRICS:
                out[f"{prefix}gain/{key}/{m}_mean"] = gain[m]["mean"]
                if gain[m]["std"] is not None:
                    out[f"{prefix}gain/{key}/{m}_std"] = gain[m]["std"]
    return out


# --------------------------------------------------------------------------------------------------
# The ablation
# --------------------------------------------------------------------------------------------------
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
    atomic_write(state_path, json.dumps({"compare": settings, "overrides": opts.overrides, "tracking_uri": uri if tracking else None,
                                         "experiment": experiment if tracking else None,
                                         "parent_run_id": tracking.parent_id if tracking else
                                         previous.get("parent_run_id")}, indent=1) + "\n")

    status = "FAILED"
    try:
        for name, level, shards in blocks:
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
        if tracking is not None:
            run_id = summary.get("mlflow_run_id") or _tracked_run_id(run.dir)
            tracking.log_child(run_id, _child_tags(run, tracking), tests)
        per_run.setdefault(run.block, {}).setdefault(run.variant, {})[run.seed] = {"tests": tests, "summary": summary}
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
