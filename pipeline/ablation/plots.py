"""The ablation's pictures: grouped bars per training x test variant, and the misalignment curve."""
from __future__ import annotations

from pathlib import Path

from pipeline.fileio import atomic_path

from .options import METRIC_LABELS, TEST_VARIANTS


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
    for row, block in zip(axes, blocks.values()):
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
