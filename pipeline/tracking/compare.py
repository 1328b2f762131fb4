"""Compare the runs of one MLflow experiment: which settings differ, and what they achieved.

    cmp = compare_runs("alignedreid", metric="mAP", filter_string="params.model.backbone = 'resnet50'",
                       out_dir="compare_out")
    print(cmp.table())

The table has one row per run, best first by the chosen metric, and shows only the params whose
values differ between the runs (the rest is the same everywhere and would hide the signal), the
training data's digest (column `data`: the first 12 hex digits of each training dataset input's
digest, '+' between shard sets; see pipeline.tracking.datasets), then the final rank1 / rank5 / mAP /
mINP and the mean training throughput. With `out_dir`, it also writes
runs.csv, <metric>.png (the metric over training per run, and its final value per run) and loss.png
(every loss/* curve per run). Works on any MLflow store: the embedded sqlite one or a server.

Runs on the same data share the digest: `--filter "dataset.digest LIKE '<12 digits>%'"` selects them.

Metric names are matched exactly first, then by their last path part: `--metric mAP` finds
'final/mAP', 'eval/mAP' or 'mAP', whichever the engine logged.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from pipeline.fileio import atomic_path, atomic_write
from .datasets import input_context
from .names import resolve_tracking_uri

SUMMARY_METRICS = ("rank1", "rank5", "mAP", "mINP")
DIGEST_SHOWN = 12                  # hex digits of a dataset digest in the table
THROUGHPUT_METRIC = "throughput/images_per_s"
# Among several metrics sharing a last path part, the first of these prefixes wins.
_PREFERRED_PREFIXES = ("", "final/", "eval/")


@dataclass
class Comparison:
    """The comparison of `runs` (best first); `columns` and `rows` are the table's text cells."""
    experiment: str
    tracking_uri: str
    metric_key: str
    runs: list[Run]
    differing_params: list[str]
    columns: list[str]
    rows: list[list[str]]
    files: list[Path] = field(default_factory=list)

    def table(self) -> str:
        """The table as aligned text columns."""
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) for i, c in enumerate(self.columns)]
        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(self.columns), rule, *(line(r) for r in self.rows)])


def resolve_metric(name: str, available: set[str]) -> str | None:
    """The logged metric key meant by `name` (exact, else final/NAME, eval/NAME, any */NAME)."""
    candidates = sorted(k for k in available if k == name or k.endswith("/" + name))
    for prefix in _PREFERRED_PREFIXES:
        if prefix + name in candidates:
            return prefix + name
    return candidates[0] if candidates else None


def _search(client: MlflowClient, experiment_id: str, filter_string: str | None) -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string or "", max_results=1000,
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _label(run: Run) -> str:
    return run.info.run_name or run.info.run_id[:8]


def data_digest(run: Run) -> str:
    """The run's training data: its training dataset inputs' digests (shortened), '+' between sets;
    '-' for a run that logged none."""
    inputs = run.inputs.dataset_inputs if run.inputs else []
    digests = [i.dataset.digest[:DIGEST_SHOWN] for i in inputs if input_context(i) == "training"]
    return "+".join(digests) or "-"


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def compare_runs(experiment: str, *, metric: str = "mAP", filter_string: str | None = None,
                 out_dir: str | Path | None = None, tracking_uri: str | None = None) -> Comparison:
    """Build the comparison (and write its files under `out_dir` when given).

    Raises ValueError naming the experiment, filter or metric that is wrong and what exists."""
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"experiment '{experiment}' not found in {uri}; experiments there: {known}. "
                         "Pass --experiment with one of them, or --tracking-uri for another store.")
    try:
        runs = _search(client, exp.experiment_id, filter_string)
    except MlflowException as exc:
        raise ValueError(f"--filter {filter_string!r} is not a valid MLflow search filter: {exc.message} "
                         "(example: \"params.model.backbone = 'resnet50'\")") from None
    if not runs:
        raise ValueError(f"no runs in experiment '{experiment}' at {uri}"
                         + (f" match --filter {filter_string!r}" if filter_string else ""))

    available = {k for r in runs for k in r.data.metrics}
    metric_key = resolve_metric(metric, available)
    if metric_key is None:
        raise ValueError(f"no run in '{experiment}' logged a metric '{metric}' (or '*/{metric}'); "
                         f"logged metrics: {sorted(available)}")
    runs.sort(key=lambda r: (metric_key not in r.data.metrics, -r.data.metrics.get(metric_key, 0.0)))

    all_params = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in all_params if len({r.data.params.get(k) for r in runs}) > 1]
    summary = [(m, resolve_metric(m, available)) for m in SUMMARY_METRICS]
    summary = [(m, key) for m, key in summary if key is not None]
    if metric_key not in (key for _, key in summary):
        summary.insert(0, (metric, metric_key))
    has_throughput = THROUGHPUT_METRIC in available

    data = [data_digest(run) for run in runs]
    has_data = any(d != "-" for d in data)
    columns = ["run", "run_id", "status", *(["data"] if has_data else []), *differing, *(m for m, _ in summary)]
    rows = []
    for run, digest in zip(runs, data):
        row = [_label(run), run.info.run_id[:8], run.info.status, *([digest] if has_data else [])]
        row += [run.data.params.get(k, "-") for k in differing]
        row += [_fmt(run.data.metrics.get(key)) for _, key in summary]
        if has_throughput:
            history = client.get_metric_history(run.info.run_id, THROUGHPUT_METRIC)
            row.append(_fmt(sum(m.value for m in history) / len(history), 1) if history else "-")
        rows.append(row)
    if has_throughput:
        columns.append("images/s")

    result = Comparison(experiment, uri, metric_key, runs, differing, columns, rows)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.files.append(_write_csv(out / "runs.csv", columns, rows))
        result.files.append(_plot_metric(client, runs, metric_key, out / f"{metric_key.replace('/', '_')}.png"))
        loss_keys = sorted(k for k in available if k.startswith("loss/"))
        if loss_keys:
            result.files.append(_plot_curves(client, runs, loss_keys, out / "loss.png"))
    return result


def _write_csv(path: Path, columns: list[str], rows: list[list[str]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())
    return path


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def _plot_metric(client: MlflowClient, runs: list[Run], key: str, path: Path) -> Path:
    # Figure without pyplot: no global backend state, works headless.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    curve_ax, bar_ax = fig.subplots(1, 2)
    for run in runs:
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        if history:
            curve_ax.plot([m.step for m in history], [m.value for m in history], marker="o", label=_label(run))
    curve_ax.set(xlabel="step", ylabel=key, title=f"{key} during training")
    curve_ax.legend(fontsize="small")
    scored = [r for r in runs if key in r.data.metrics]
    bar_ax.barh([_label(r) for r in scored][::-1], [r.data.metrics[key] for r in scored][::-1])
    bar_ax.set(xlabel=key, title=f"final {key} per run")
    return _save(fig, path)


def _plot_curves(client: MlflowClient, runs: list[Run], keys: list[str], path: Path) -> Path:
    from matplotlib.figure import Figure

    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(5 * cols, 3.5 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for run in runs:
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], label=_label(run))
        ax.set(xlabel="step", title=key)
        ax.legend(fontsize="small")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    return _save(fig, path)
