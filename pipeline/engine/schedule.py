"""Learning-rate schedules as pure functions of the global step (so resuming needs no hidden state).

All schedules start with an optional linear warm-up from ``warmup_factor * lr`` at step 0 to ``lr`` at
epoch ``warmup_epochs``, rising every step (the strong baseline's code raises it once per epoch along
the same line). Epochs are counted in steps: epoch = step / steps_per_epoch.
- ``exp``: the reproductions' recipe: constant until ``decay_start_epoch``, then exponential decay
  reaching ``lr * final_lr_factor`` at the last step.
- ``step``: after the warm-up, multiply by ``gamma`` at each epoch in ``milestones`` (the strong
  baseline, and the shipped dataset recipes: 0.01x -> 1x over 10 epochs, x0.1 at 40 and 70;
  tests/test_recipe_schedule.py).
- ``cosine``: cosine from ``lr`` to ``lr * final_lr_factor`` after warm-up.
- ``constant``.
"""
from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of the base LR at `step` (0-based global optimiser step)."""
    total = cfg.epochs * steps_per_epoch
    epoch = step / steps_per_epoch
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if warmup_steps > 0 and step < warmup_steps:
        alpha = step / warmup_steps
        return cfg.warmup_factor * (1 - alpha) + alpha
    if cfg.scheduler == "constant":
        return 1.0
    if cfg.scheduler == "step":
        return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    if cfg.scheduler == "cosine":
        span = max(1.0, total - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        low = cfg.final_lr_factor
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
    # exp
    start = cfg.decay_start_epoch * steps_per_epoch
    if step < start or total <= start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, total - start))
    return cfg.final_lr_factor ** progress


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
