"""The dataset recipes' learning rate, step by step, is the strong baseline's published schedule, and
docs/recipes.md's table says what the recipes say. No training: the real optimizer and LR schedule of
pipeline/engine/schedule.py on one tiny parameter, against a reference computed here independently."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.engine.schedule import apply_lr, build_optimizer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("market1501", "dukemtmc", "msmt17", "cuhk03np", "deepspeed_zero2")
STEPS_PER_EPOCH = 7     # odd, so that epoch boundaries fall between whole steps of the warm-up line

# The strong baseline ("bag of tricks"), as published: references.md and its configs/softmax_triplet.yml.
BASE_LR, WARMUP_FROM, WARMUP_EPOCHS, MILESTONES, GAMMA, EPOCHS = 3.5e-4, 0.01, 10, (40, 70), 0.1, 120


def reference_lr(step: int, steps_per_epoch: int = STEPS_PER_EPOCH) -> float:
    """Linear warm-up from 0.01 x base to base over 10 epochs, then x0.1 at epochs 40 and 70."""
    epoch = step / steps_per_epoch
    if epoch < WARMUP_EPOCHS:
        return BASE_LR * (WARMUP_FROM + (1 - WARMUP_FROM) * epoch / WARMUP_EPOCHS)
    return BASE_LR * GAMMA ** sum(epoch >= m for m in MILESTONES)


def lr_trace(recipe: str, steps: int) -> list[float]:
    """The LR of every optimiser step 0..steps-1 as the trainer applies it: set from the training
    progress (step / steps per epoch at a constant world size) before each optimiser step."""
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml")
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([param], cfg.train)
    trace = []
    for step in range(steps):
        apply_lr(optimizer, step / STEPS_PER_EPOCH, cfg.train)
        trace.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.zeros_like(param)
        optimizer.step()
    return trace


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_lr_is_the_strong_baselines_schedule(recipe: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml")
    assert cfg.train.optimizer == "adam" and cfg.train.epochs == EPOCHS
    total = EPOCHS * STEPS_PER_EPOCH
    trace = lr_trace(recipe, total)
    e = STEPS_PER_EPOCH
    named = {
        "step 0": (0, 3.5e-6),
        "mid warm-up (epoch 5)": (5 * e, 3.5e-4 * (0.01 + 0.99 * 0.5)),
        "last warm-up step": (10 * e - 1, None),
        "end of warm-up": (10 * e, 3.5e-4),
        "just before epoch 40": (40 * e - 1, 3.5e-4),
        "epoch 40": (40 * e, 3.5e-5),
        "just before epoch 70": (70 * e - 1, 3.5e-5),
        "epoch 70": (70 * e, 3.5e-6),
        "last step": (total - 1, 3.5e-6),
    }
    for name, (step, published) in named.items():
        assert trace[step] == pytest.approx(reference_lr(step), rel=1e-9, abs=0), name
        if published is not None:
            assert trace[step] == pytest.approx(published, rel=1e-9), name
    # Every step, not only the named ones; and the warm-up rises strictly.
    assert trace == pytest.approx([reference_lr(s) for s in range(total)], rel=1e-9)
    assert all(a < b for a, b in zip(trace[:10 * e], trace[1:10 * e + 1]))
    assert optimizer_settings(recipe) == {"weight_decay": 5e-4, "betas": (0.9, 0.999)}


def optimizer_settings(recipe: str) -> dict:
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml")
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.train)
    assert isinstance(optimizer, torch.optim.Adam)
    group = optimizer.param_groups[0]
    return {"weight_decay": group["weight_decay"], "betas": tuple(group["betas"])}


def docs_table() -> dict[str, str]:
    """docs/recipes.md's settings table: config key -> the 'our recipes' cell (without backticks)."""
    text = (ROOT / "docs" / "recipes.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = next(line for line in lines if "config key" in line)
    columns = [c.strip() for c in header.strip("|").split("|")]
    key_col, ours_col = columns.index("config key"), columns.index("our recipes")
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(columns):
            continue
        key = re.fullmatch(r"`([a-z_]+\.[a-z_.]+)`", cells[key_col])
        value = re.fullmatch(r"`(.+)`", cells[ours_col])
        if key and value:
            rows[key.group(1)] = value.group(1)
    return rows


def parse_cell(text: str):
    try:
        return float(text) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", text) else yaml.safe_load(text)
    except yaml.YAMLError:
        return text


@pytest.mark.parametrize("recipe", RECIPES)
def test_docs_table_agrees_with_the_recipes(recipe: str) -> None:
    table = docs_table()
    assert {"train.lr", "train.weight_decay", "train.warmup_epochs", "train.warmup_factor", "train.milestones",
            "train.gamma", "train.epochs", "train.scheduler", "data.p", "data.k", "data.erasing_prob",
            "data.pad", "data.flip_prob", "model.last_stride", "model.neck", "loss.label_smoothing"} <= set(table)
    flat = load_config(ROOT / "configs" / f"{recipe}.yaml").flat()
    for key, cell in table.items():
        assert key in flat, f"docs/recipes.md names an unknown config key {key}"
        assert parse_cell(cell) == flat[key], f"{recipe}: {key} is {flat[key]!r}, docs/recipes.md says {cell}"


def test_docs_steps_per_epoch_is_the_plans() -> None:
    """The table of steps per epoch in docs/recipes.md is pipeline/data/plan.py's formula."""
    from pipeline.data.plan import epoch_steps

    for images, steps in ((12936, 202), (16522, 258), (32621, 509), (7365, 115)):
        manifest = {"splits": {"train": {"shards": [{"samples": images, "ids": [[0, images]]}]}},
                    "label_map": {"0": 0}, "num_classes": 1}
        for world, p in ((1, 16), (2, 8), (4, 4), (8, 2)):
            assert epoch_steps(manifest, p, 4, world) == steps
        assert epoch_steps(manifest, 16, 4, 2) == images // 128
        row = re.search(rf"\| {images:,} \| {steps} \| {120 * steps:,} \|", (ROOT / "docs/recipes.md").read_text())
        assert row, f"docs/recipes.md lacks the row for {images} images"
