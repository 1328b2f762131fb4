"""What a training says, where and when (the main rank speaks; the other ranks stay quiet):

- every step: one JSON line in `<output_dir>/train_log.jsonl` (line-buffered, so each step's record
  is on disk before the next step starts: crash-safe and tailable) and the progress bar;
- every `train.log_every` steps and at each epoch's last step: the step record to the tracker;
- every epoch: the epoch's means, throughput and evaluation to the tracker and one line on stderr;
- at the end: `<output_dir>/summary.json`.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..fileio import atomic_write
from ..tracking import Tracker
from .state import TrainState

_NOT_SENT = ("epoch", "step", "global_step", "time")   # in the JSONL record, not tracker metrics


def _metric_name(term: str) -> str:
    """A loss term's name in the records: `loss/<term>`; the branch diagnostics (`local/pos_match`, ...)
    keep their own group."""
    return term if "/" in term else f"loss/{term}"


# Mean cosine of matched negative stripes above which the branch counts as collapsed. Measured on the
# make-ablation data: a collapsed branch (local-only rank-1 at chance) sits at 0.97-0.99 from its third
# epoch on; the shipped head peaks at 0.955 during its warm-up and ends near 0.89.
COLLAPSED_COSINE = 0.97


def branch_health(means: dict[str, float]) -> str | None:
    """None when the aligned branch looks alive over an epoch (means of the `local/...` diagnostics,
    see pipeline.losses.local_diagnostics), else what is wrong and the fix."""
    if "local/pos_match" not in means:
        return None
    pos, neg = means["local/pos_match"], means["local/neg_match"]
    sat, cos = means["local/saturated"], means["local/neg_cosine"]
    if pos > 0.95:
        return (f"the aligned branch is saturated: the same person's best-matching stripes are {pos:.3f} "
                f"apart (tanh flat above 0.95), {sat:.0%} of element distances are above 0.99, so the "
                "local loss has no gradient. Fix: model.local_bn_init=unit-distance (stripes start 1 "
                "apart, on tanh's slope), as the shipped recipes do")
    if cos > COLLAPSED_COSINE:
        return (f"the aligned branch has collapsed: different people's matched stripes point the same way "
                f"(cosine {cos:.3f}, {neg:.3f} apart), so the local distance cannot tell people apart. Fix: "
                "model.local_id=true (an identity loss on every stripe) and loss.local_warmup_epochs (the "
                "local triplet ramps in while the stripes learn who is who), as the shipped recipes do")
    return None


class Reporter:
    def __init__(self, out: Path, tracker: Tracker, *, is_main: bool, log_every: int, epochs: int,
                 steps_per_epoch: int, images_per_step: int, world_size: int = 1):
        self.out, self.tracker, self.is_main = Path(out), tracker, is_main
        self.log_every, self.epochs, self.steps_per_epoch = log_every, epochs, steps_per_epoch
        self.images_per_step, self.world_size = images_per_step, world_size
        self._jsonl = None
        self._bar = None
        self.epoch_means: dict[str, float] = {}
        self.health_warning: str | None = None

    def message(self, text: str) -> None:
        """One line on stderr from the main rank (above the progress bar)."""
        if self.is_main:
            tqdm.write(text, file=sys.stderr)

    @contextlib.contextmanager
    def open(self):
        """Keep train_log.jsonl open (appending: a resumed run continues it) for the block."""
        self._jsonl = open(self.out / "train_log.jsonl", "a", buffering=1) if self.is_main else None
        try:
            with self._jsonl or contextlib.nullcontext():
                yield self
        finally:
            self._jsonl = None

    # ------------------------------------------------------------------------------------- epoch
    def start_epoch(self, state: TrainState, steps: int | None = None) -> None:
        """`steps`: this epoch's length (another one than steps_per_epoch when it was re-cut)."""
        self._epoch_steps = self.steps_per_epoch if steps is None else steps
        self._bar = tqdm(total=self._epoch_steps, initial=state.step_in_epoch, disable=not self.is_main,
                         desc=f"epoch {state.epoch + 1}/{self.epochs}", unit="step", dynamic_ncols=True,
                         file=sys.stderr, mininterval=0.2 if sys.stderr.isatty() else 30.0)
        self._sums: dict[str, float] = {}
        self._steps, self._t0, self._data_wait = 0, time.perf_counter(), 0.0

    def step(self, state: TrainState, terms: dict[str, float], timing: dict[str, float], data_wait: float,
             lr: float) -> None:
        """After a step (state already counts it): the JSONL record, the bar, the tracker's cadence."""
        self._steps += 1
        self._data_wait += data_wait
        for key, value in terms.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        step_time = max(timing["step_s"] + data_wait, 1e-9)
        # "time": wall clock (Unix seconds) when the step ended, for rates over many steps.
        record = {"epoch": state.epoch, "step": state.step_in_epoch, "global_step": state.global_step,
                  "time": time.time(), "lr": lr, "world_size": self.world_size,
                  **{_metric_name(k): v for k, v in terms.items()},
                  "throughput/images_per_s": self.images_per_step / step_time,
                  "time/data_wait_share": data_wait / step_time}
        for key in ("comm_s", "loss_s"):
            if key in timing:
                record[f"time/{key.removesuffix('_s')}_share"] = timing[key] / step_time
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._bar.update(1)
            local = (f"local {terms['local_triplet']:.3f} (pos {terms['local/pos_match']:.2f} "
                     f"neg {terms['local/neg_match']:.2f} sat {terms['local/saturated']:.0%} "
                     f"prec {terms['local/precision']:.2f}) " if "local/pos_match" in terms else "")
            self._bar.set_postfix_str(f"loss {terms.get('total', float('nan')):.3f} "
                                      f"tri {terms.get('global_triplet', 0):.3f} id {terms.get('id', 0):.3f} "
                                      f"{local}{record['throughput/images_per_s']:.0f} img/s")
        if state.global_step % self.log_every == 0 or state.step_in_epoch == self._epoch_steps:
            self.tracker.log_metrics({k: v for k, v in record.items() if k not in _NOT_SENT},
                                     step=state.global_step)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def epoch_metrics(self) -> dict[str, float]:
        """The finished epoch's mean losses, images/s and data-wait share (closes the bar)."""
        self.close_bar()
        self._elapsed = elapsed = max(time.perf_counter() - self._t0, 1e-9)   # before any evaluation
        means = {k: v / max(1, self._steps) for k, v in self._sums.items()}
        self.epoch_means = means
        metrics = {(f"epoch/{k}" if "/" in k else f"epoch/loss_{k}"): v for k, v in means.items()}
        metrics["epoch/images_per_s"] = self._steps * self.images_per_step / elapsed
        metrics["epoch/data_wait_share"] = self._data_wait / elapsed
        return metrics

    def end_epoch(self, state: TrainState, metrics: dict[str, float]) -> None:
        """Send the epoch's metrics (evaluation included) and say how the epoch went."""
        self.tracker.log_metrics(metrics, step=state.global_step)
        evals = "".join(f", {k.split('/')[-1]} {v:.4f}" for k, v in metrics.items()
                        if k.startswith("eval/") and k.split("/")[-1] in ("rank1", "mAP", "mINP"))
        self.message(f"epoch {state.epoch + 1}/{self.epochs}: {self._steps} steps in {self._elapsed:.1f}s, "
                     f"{metrics['epoch/images_per_s']:.0f} img/s, "
                     f"loss {metrics.get('epoch/loss_total', float('nan')):.4f}{evals}")

    def check_branch(self, epochs_done: int, local_warmup_epochs: float = 0.0) -> str | None:
        """After an epoch: warn once (the first epoch that shows it, from the first epoch on and once the
        local triplet has ramped up) when the aligned branch is saturated or collapsed. Returns the
        warning, or None."""
        if epochs_done < max(1.0, local_warmup_epochs):
            return None
        problem = None if self.health_warning else branch_health(self.epoch_means)
        if problem:
            self.health_warning = problem
            self.message(f"WARNING: {problem}")
        return problem

    # --------------------------------------------------------------------------------------- end
    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            atomic_write(self.out / "summary.json", json.dumps(summary, indent=2))
