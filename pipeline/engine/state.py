"""The training state that is not the network or the optimiser: where the run is (epoch, step, and
how the current epoch was cut when the world size changed in it), its RNG streams, its MLflow run id and
its history (resumed from, world size changes, skipped steps).

`TrainState.state_dict(rngs)` / `load_state_dict(state, ...)` are the checkpoint's share of it; the
RNG helpers make a resumed run draw exactly the augmentation an uninterrupted one would have drawn.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """This process's torch / Python / NumPy (and CUDA) RNG states as plain types and tensors."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_rank(seed: int, epoch: int, rank: int) -> None:
    """Seed torch / Python / NumPy for this rank (augmentation differs per rank, reproducibly)."""
    value = (seed * 1_000_003 + epoch * 7919 + rank) % (2 ** 31)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)


@dataclass
class TrainState:
    epoch: int = 0                  # epochs completed
    step_in_epoch: int = 0          # steps done in the current epoch
    global_step: int = 0            # optimiser steps done (skipped ones included)
    mlflow_run_id: str | None = None
    resumed_from: list[str] = field(default_factory=list)
    skipped_steps: int = 0          # non-finite steps skipped (train.nan_policy=skip)
    epoch_cuts: list[dict] = field(default_factory=list)     # this epoch at earlier world sizes (plan.Cut)
    world_size_changes: list[dict] = field(default_factory=list)

    def state_dict(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint's training-state keys; `rngs`: every rank's rng_state(), in rank order."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "rng": rngs, "mlflow_run_id": self.mlflow_run_id, "resumed_from": list(self.resumed_from),
                "skipped_steps": self.skipped_steps, "epoch_cuts": [dict(c) for c in self.epoch_cuts],
                "world_size_changes": [dict(c) for c in self.world_size_changes]}

    def load_state_dict(self, state: dict[str, Any], *, name: str, rank: int, world_size: int) -> bool:
        """Continue from checkpoint `state` (called `name`). Restores this rank's RNG when the world size
        is the one that wrote it and returns True; False when it could not (the caller reseeds)."""
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.mlflow_run_id = state.get("mlflow_run_id")
        self.resumed_from = list(state.get("resumed_from", [])) + [name]
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.epoch_cuts = [dict(c) for c in state.get("epoch_cuts", [])]
        self.world_size_changes = [dict(c) for c in state.get("world_size_changes", [])]
        rng = state.get("rng") or []
        if int(state.get("world_size", -1)) == world_size and len(rng) == world_size:
            set_rng_state(rng[rank])
            return True
        return False
