"""Learning-rate schedules as pure functions of the training progress in epochs (so resuming needs no
hidden state, and a run resumed on another number of GPUs, whose epochs have another number of steps,
continues the same curve).

The trainer sets the LR before every optimiser step with `apply_lr(optimizer, progress, cfg)`, where
`progress` = epochs done + the fraction of the current epoch done (Trainer.progress; with a constant
world size that is global_step / steps_per_epoch).

All schedules start with an optional linear warm-up from ``warmup_factor * lr`` at epoch 0 to ``lr`` at
epoch ``warmup_epochs``, rising every step (the strong baseline's code raises it once per epoch along
the same line).
- ``exp``: the reproductions' recipe: constant until ``decay_start_epoch``, then exponential decay
  reaching ``lr * final_lr_factor`` at the end.
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


def lr_factor(epoch: float, cfg: TrainConfig) -> float:
    """Multiplier of the base LR at training progress `epoch` (epochs done, fractional)."""
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        alpha = epoch / cfg.warmup_epochs
        return cfg.warmup_factor * (1 - alpha) + alpha
    if cfg.scheduler == "constant":
        return 1.0
    if cfg.scheduler == "step":
        return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    if cfg.scheduler == "cosine":
        span = cfg.epochs - cfg.warmup_epochs
        progress = 1.0 if span <= 0 else min(1.0, (epoch - cfg.warmup_epochs) / span)
        low = cfg.final_lr_factor
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
    # exp
    start = cfg.decay_start_epoch
    if epoch < start or cfg.epochs <= start:
        return 1.0
    progress = min(1.0, (epoch - start) / (cfg.epochs - start))
    return cfg.final_lr_factor ** progress


def apply_lr(optimizer, epoch: float, cfg: TrainConfig) -> float:
    """Set every parameter group's LR for training progress `epoch`; returns it. `optimizer`: a torch
    optimizer or anything with torch's `param_groups` (DeepSpeed's ZeRO optimizer forwards them)."""
    lr = cfg.lr * lr_factor(epoch, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
