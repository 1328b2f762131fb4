"""Statistics over seeds and the ablation table (pure: no training, no files)."""
from __future__ import annotations

import statistics
from typing import Any

from .options import METRIC_LABELS, METRICS, TEST_VARIANTS


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
    if block.get("branch"):
        lines += ["", format_branch(block["branch"])]
    return "\n".join(lines)


BRANCH_FIGURES = {   # key in a run's record -> label (fractions, shown in percent)
    "alignment/path": "path on the true stripe ±1", "alignment/untrained": "same, untrained network",
    "alignment/diagonal": "diagonal on the true stripe ±1", "local_branch/saturated": "element distances > 0.99",
    "local_branch/pos_match": "best-match distance, positive",
    "local_branch/neg_match": "best-match distance, negative",
    "local_branch/neg_cosine": "cosine of matched negative stripes", "local_branch/precision": "local precision"}


def branch_table(records: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """Per training variant, describe() over seeds of the aligned branch's figures: the alignment
    accuracy (`alignment` of each run, when measured) and the last epoch's branch diagnostics
    (`summary["local_branch"]`, when the variant trains the local loss). records[variant] = the
    runs' {"summary", "alignment"} dicts."""
    out: dict[str, dict[str, dict]] = {}
    for variant, runs in records.items():
        values: dict[str, list[float]] = {}
        for run in runs:
            align = run.get("alignment") or {}
            figures = {}
            if align:
                figures = {"alignment/path": align["trained"]["path"],
                           "alignment/untrained": align["untrained"]["path"],
                           "alignment/diagonal": align["trained"]["diagonal"]}
            branch = (run.get("summary") or {}).get("local_branch") or {}
            figures.update({f"local_branch/{k}": v for k, v in branch.items() if isinstance(v, (int, float))})
            for key, value in figures.items():
                values.setdefault(key, []).append(float(value))
        figures_n = {k: v for k, v in values.items() if len(v) == len(runs) and k in BRANCH_FIGURES}
        if figures_n:
            out[variant] = {k: describe(v) for k, v in figures_n.items()}
    return out


def format_branch(branch: dict[str, dict[str, dict]]) -> str:
    """The aligned branch's figures as a markdown table (variants as columns)."""
    variants = list(branch)
    keys = [k for k in BRANCH_FIGURES if any(k in branch[v] for v in variants)]
    lines = ["Aligned branch (percent; diagnostics over the last epoch; alignment on synthetic same-person "
             "pairs whose body geometry is known):", "", "| figure | " + " | ".join(variants) + " |",
             "|---|" + "---:|" * len(variants)]
    for key in keys:
        lines.append(f"| {BRANCH_FIGURES[key]} | "
                     + " | ".join(fmt_stat(branch[v][key]) if key in branch[v] else "–" for v in variants) + " |")
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
    for block in report["blocks"].values():
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
