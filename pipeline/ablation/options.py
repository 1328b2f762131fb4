"""Ablation arguments: variants, seeds, levels, and the overrides each training run gets."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, parse_override


ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "launch" / "train.py"

TRAIN_VARIANTS = ("global", "aligned", "mutual")
DEFAULT_VARIANTS = ("global", "aligned", "mutual")
DEFAULT_CURVE_VARIANTS = ("global", "aligned")
# key (file names, MLflow metric names: '+' is not allowed there) -> (label, distance, rerank)
TEST_VARIANTS: dict[str, tuple[str, str, bool]] = {
    "global": ("global", "global", False),
    "global_local": ("global+local", "global+local", False),
    "global_local_sum": ("global+local (plain sum)", "global+local-sum", False),
    "local": ("local", "local", False),
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
    if variant == "global":   # no local loss of any kind: the stripes' identity loss is off too
        return ["loss.local_weight=0", "loss.local_id_weight=0", "mutual.enabled=false"]
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
