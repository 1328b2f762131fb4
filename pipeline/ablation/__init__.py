"""The AlignedReID ablation: what each part of the method buys on a given data set (launch/ablate.py).

Modules: options (arguments, variants, overrides), runs (data, training subprocess, tests of a
model), stats (means, spreads, gains, the table), plots, tracking (MLflow parent run), runner (the
whole ablation).

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
from .options import (DEFAULT_CURVE_VARIANTS, DEFAULT_VARIANTS, METRICS, TEST_VARIANTS, TRAIN_VARIANTS,
                      AblationError, TrainingFailed, check_user_overrides, comparable, differences, level_name,
                      parse_image_size, parse_levels, parse_seeds, parse_tests, parse_variants, run_overrides,
                      variant_overrides)
from .plots import plot_bars, plot_curve
from .runner import AblationOptions, run_ablation
from .runs import cached_forward, evaluate_run, prepare_synthetic
from .stats import aggregate, compute_gains, describe, fmt_stat, format_block, format_report, misalign_curve

__all__ = ["DEFAULT_CURVE_VARIANTS", "DEFAULT_VARIANTS", "METRICS", "TEST_VARIANTS", "TRAIN_VARIANTS",
           "AblationError", "AblationOptions", "TrainingFailed", "aggregate", "cached_forward",
           "check_user_overrides", "comparable", "compute_gains", "describe", "differences", "evaluate_run",
           "fmt_stat", "format_block", "format_report", "level_name", "misalign_curve", "parse_image_size",
           "parse_levels", "parse_seeds", "parse_tests", "parse_variants", "plot_bars", "plot_curve",
           "prepare_synthetic", "run_ablation", "run_overrides", "variant_overrides"]
