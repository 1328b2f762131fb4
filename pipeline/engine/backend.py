"""Where the two engines differ, behind one small interface: DDP (torch's DistributedDataParallel, or
the bare network in one process) and DeepSpeed (ZeRO stages 0-2).

    backend = build_backend(cfg, network, device, world_size)
    outputs = backend.forward(images)          # input layout, precision and the wrapper inside
    backend.set_progress(epochs)               # the LR of the schedule at this training progress
    backend.step(loss, skip=False)             # backward + optimiser step (skip: discard)
    backend.lr                                 # the current learning rate
    backend.state_dict()                       # collective: the full optimiser state (checkpoint file)
    backend.save(...) / backend.load(...)      # engine state outside the file / resume from both
    backend.fp32_state_dict()                  # collective: the fp32 master weights, on the CPU
    backend.precision()                        # what precision really runs, in words

`backend.network` is the bare training network (an AlignedReID or a MutualPair); `backend.wrapped` is
what the forward runs (the DDP wrapper, the DeepSpeed engine, or the network itself). Adding a
backend (FSDP) means one more class here and one more name in config.CHOICES["engine.backend"].

Design decisions kept here:
- bf16 under DeepSpeed uses its `torch_autocast` section, not its "bf16" mode: that mode casts the
  parameters to bf16 but keeps BatchNorm's running statistics in fp32, a mix the CPU kernels refuse.
- channels_last is applied to the module only under DDP: DeepSpeed keeps parameters as views of flat
  contiguous buffers (and cannot broadcast channels_last ones). Inputs are channels_last in both.
- DeepSpeed in one plain process gets a private one-rank process group (D.ensure_process_group).
- Checkpoints, evaluation and the logged model take the fp32 master weights; under DeepSpeed they are
  assembled from the ZeRO partitions with deepspeed.utils.safe_get_full_fp32_param.
- The LR is set by the trainer from the training progress in epochs (schedule.apply_lr), not by an LR
  scheduler counting steps: a run resumed on another number of GPUs has another number of steps per
  epoch and must continue the same curve.
- Resuming on another world size. The checkpoint file holds the full optimiser state under both engines
  (torch's optimizer state-dict layout, one entry per trainable parameter in `parameters()` order): DDP
  has it anyway; DeepSpeed ZeRO-1/2 assembles it from the partitions when saving
  (safe_get_full_optimizer_state). DeepSpeed resumes from its own directory when the world size is the
  one that wrote it (exact, loss scaler included) and otherwise re-partitions the fp32 master weights and
  the optimiser state from the file onto the new ranks (safe_set_full_fp32_param /
  safe_set_full_optimizer_state) instead of failing in DeepSpeed's "used a DP world size of 2".
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed as D
from ..checkpoint import CheckpointError, cpu_fp32
from ..config import Config
from .schedule import apply_lr, build_optimizer

DEEPSPEED_INSTALL = "pip install --no-build-isolation deepspeed"
_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(cfg: Config, micro_batch: int) -> dict:
    """The `engine.deepspeed` section completed with what the trainer owns (batch size, clipping,
    precision). The ZeRO stage was checked by config.validate."""
    ds = json.loads(json.dumps(cfg.engine.deepspeed))  # deep copy of plain data
    ds.setdefault("gradient_accumulation_steps", 1)
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds.pop("train_batch_size", None)
    if cfg.train.grad_clip is not None:
        ds["gradient_clipping"] = cfg.train.grad_clip
    if cfg.train.amp == "bf16":
        # torch.autocast inside the engine's forward (see the module docstring): the module keeps fp32
        # weights; convolutions and linear layers run in bf16 and their gradients are reduced in bf16.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif cfg.train.amp == "fp16":
        ds.setdefault("fp16", {})["enabled"] = True
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class Backend:
    """The interface; see the module docstring."""

    name = ""
    module_is_master = True   # the network's own weights are the fp32 master weights

    def __init__(self, cfg: Config, network: nn.Module, device: torch.device):
        self.amp, self.device, self.train_cfg = cfg.train.amp, device, cfg.train
        self.channels_last = cfg.train.channels_last
        self.network = network
        self.wrapped: nn.Module = network
        self.optimizer: Any = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context of the training forward (a no-op where the engine does it)."""
        return contextlib.nullcontext()

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The input batch in the layout (and dtype) the wrapped network expects."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def forward(self, images: torch.Tensor):
        with self.autocast():
            return self.wrapped(self.prepare(images))

    def train(self) -> None:
        self.wrapped.train()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_progress(self, epochs: float) -> float:
        """Before a step: the schedule's LR at training progress `epochs` (fractional); returns it."""
        return apply_lr(self.optimizer, epochs, self.train_cfg)

    def step(self, loss: torch.Tensor, skip: bool = False) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Collective. What the checkpoint file holds besides the weights: `optimizer`, the full
        optimiser state in torch's layout (what lets a run resume on another world size)."""
        return {}

    def save(self, directory: Path, tag: str) -> None:
        """Collective. State kept outside the checkpoint file (DeepSpeed's own directory)."""

    def load(self, state: dict[str, Any], directory: Path, tag: str) -> str:
        """Resume from checkpoint `state` (and the engine's own state under `directory/tag`); returns
        how the optimiser state was restored, in words."""
        raise NotImplementedError

    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective. The training network's state in float32 on the CPU."""
        return cpu_fp32(self.network.state_dict())

    def precision(self) -> dict[str, str]:
        """{"compute_dtype", "mechanism"}: what the forward computes in, and how."""
        raise NotImplementedError


class DDPBackend(Backend):
    """torch's DistributedDataParallel over the ranks (the bare network in one process); torch.autocast
    for bf16/fp16, with a GradScaler for fp16 on CUDA; train.nan_policy=skip discards a step's
    gradients on every rank alike."""

    name = "ddp"

    def __init__(self, cfg: Config, network: nn.Module, device: torch.device, world_size: int):
        if cfg.train.channels_last:
            network = network.to(memory_format=torch.channels_last)
        super().__init__(cfg, network, device)
        self.grad_clip = cfg.train.grad_clip
        self.optimizer = build_optimizer(network.parameters(), cfg.train)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" and device.type == "cuda" else None
        if world_size > 1:
            # Terms with weight 0 leave parameters without gradient, which DDP must be told.
            unused = (cfg.loss.id_weight == 0 or cfg.loss.local_weight == 0
                      or (cfg.model.local_id and cfg.loss.local_id_weight == 0))
            self.wrapped = nn.parallel.DistributedDataParallel(
                network, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=unused)

    def autocast(self):
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_LOW[self.amp])

    def step(self, loss: torch.Tensor, skip: bool = False) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        # Backward even when skipping: every rank must join DDP's gradient all-reduce.
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            return
        if self.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load(self, state: dict[str, Any], directory: Path, tag: str) -> str:
        # Every rank holds the whole optimiser state: any world size resumes it as it is. (The LR is
        # set from the training progress before each step; a checkpoint's "scheduler" is not needed.)
        self.network.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return "the checkpoint file's optimiser state (every rank holds all of it)"

    def precision(self) -> dict[str, str]:
        if self.amp == "none":
            return {"compute_dtype": "float32", "mechanism": "none"}
        low = str(_LOW[self.amp]).removeprefix("torch.")
        how = f"torch.autocast({self.device.type}, {low})" + (" with a GradScaler" if self.scaler else "")
        return {"compute_dtype": low, "mechanism": how}


class DeepSpeedBackend(Backend):
    """A DeepSpeed engine (the `engine.deepspeed` config section): it owns backward, clipping, the
    optimiser and LR steps, and its own checkpoint directory."""

    name = "deepspeed"
    module_is_master = False

    def __init__(self, cfg: Config, network: nn.Module, device: torch.device, world_size: int):
        try:
            import deepspeed
        except ImportError as exc:
            raise ImportError(f"engine.backend=deepspeed needs DeepSpeed, which is not installed here "
                              f"({exc}); install it with `{DEEPSPEED_INSTALL}` (after torch), or use "
                              f"engine.backend=ddp") from None
        super().__init__(cfg, network, device)
        D.ensure_process_group(device)
        self.world_size = world_size
        optimizer = build_optimizer(network.parameters(), cfg.train)
        # No LR scheduler for DeepSpeed to step: the trainer sets the LR from the progress (set_progress).
        self.wrapped, self.optimizer, _, _ = deepspeed.initialize(
            model=network, optimizer=optimizer,
            config=deepspeed_config(cfg, cfg.data.p * cfg.data.k), dist_init_required=False)
        self.zero_stage = int(self.wrapped.zero_optimization_stage())

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = super().prepare(images)
        return images.half() if self.amp == "fp16" else images   # the module computes in fp16

    def step(self, loss: torch.Tensor, skip: bool = False) -> None:
        if skip:   # config.validate refuses nan_policy=skip with DeepSpeed: it owns the step
            raise RuntimeError("DeepSpeed cannot skip a step")
        self.wrapped.backward(loss)
        self.wrapped.step()

    def save(self, directory: Path, tag: str) -> None:
        self.wrapped.save_checkpoint(str(directory), tag=tag, save_latest=False)

    # ------------------------------------------------------------------ the full optimiser state
    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters the optimiser holds, in its order (build_optimizer: parameters() order)."""
        return [(name, p) for name, p in self.network.named_parameters() if p.requires_grad]

    def _partitioned(self) -> bool:
        """ZeRO-1/2: each rank holds a slice of the master weights and optimiser state."""
        return self.zero_stage >= 1

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimiser over this rank's flat fp32 partitions (under ZeRO's wrapper)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        """Collective. The full optimiser state, assembled from every rank's ZeRO partition (one
        all_reduce per parameter and state tensor), in the layout of torch's Optimizer.state_dict."""
        if not self._partitioned():
            return {"optimizer": self._base_optimizer().state_dict()}
        from deepspeed.utils import safe_get_full_optimizer_state

        base = self._base_optimizer()
        # Every flat partition has state from the first step on (none before it); the first stands for all.
        flat = base.param_groups[0]["params"][0]
        flat_state = base.state.get(flat, {})
        keys = sorted(k for k, v in flat_state.items() if torch.is_tensor(v) and v.shape == flat.shape)
        scalars = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                   for k, v in flat_state.items() if k not in keys}      # "step"
        trainable = self._trainable()
        full = {}
        if keys:   # ZeRO links each parameter to its slice of the state after the first step
            self.optimizer._lazy_init_hp_params_optimizer_state()
            full = {i: {**scalars, **{k: safe_get_full_optimizer_state(param, k).detach().float().cpu()
                                      for k in keys}}
                    for i, (_, param) in enumerate(trainable)}
        group = {k: v for k, v in base.param_groups[0].items() if k != "params"}
        return {"optimizer": {"state": full, "param_groups": [dict(group, params=list(range(len(trainable))))]}}

    def load(self, state: dict[str, Any], directory: Path, tag: str) -> str:
        written_by = int(state.get("world_size", self.world_size))
        if written_by == self.world_size or not self._partitioned():
            path, _ = self.wrapped.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"DeepSpeed state for {tag}.pt missing under {directory / tag}")
            return "DeepSpeed's own checkpoint"
        return self._repartition(state, tag, written_by)

    def _repartition(self, state: dict[str, Any], tag: str, written_by: int) -> str:
        """Resume a ZeRO-1/2 checkpoint written by `written_by` ranks: the module's weights, then this
        rank's slice of the fp32 master weights and of the optimiser state, cut from the full tensors
        of the checkpoint file."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        saved = state.get("optimizer")
        if not isinstance(saved, dict) or "state" not in saved:
            raise CheckpointError(
                f"{tag}.pt was written by {written_by} DeepSpeed ranks before checkpoints held the full "
                f"optimiser state, so it resumes only on {written_by} ranks (this run has "
                f"{self.world_size}); resume it at that size once to write a portable checkpoint")
        weights = state["model"]
        self.network.load_state_dict(weights)
        trainable = self._trainable()
        for name, param in trainable:
            safe_set_full_fp32_param(param, weights[name].to(param.device, torch.float32))
        entries = saved["state"]
        if not entries:          # written before the first optimiser step: nothing more to restore
            return f"re-partitioned from {written_by} to {self.world_size} ranks (no optimiser state yet)"
        if len(entries) != len(trainable):
            raise CheckpointError(f"{tag}.pt holds optimiser state for {len(entries)} parameters; this "
                                  f"network trains {len(trainable)}")
        first = next(iter(entries.values()))
        keys = sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0)
        base = self._base_optimizer()
        for group in base.param_groups:       # the state tensors ZeRO will link the parameters to
            for flat in group["params"]:
                base.state[flat] = {**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in first.items()
                                       if k not in keys},
                                    **{k: torch.zeros_like(flat) for k in keys}}
        self.optimizer._hp_optimizer_states_linked = False
        self.optimizer._lazy_init_hp_params_optimizer_state()
        for i, (_, param) in enumerate(trainable):
            for key in keys:
                safe_set_full_optimizer_state(param, entries[i][key].to(param.device, torch.float32), key)
        return f"re-partitioned from {written_by} to {self.world_size} ranks (fp32 master weights and " \
               f"optimiser state from the checkpoint file)"

    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """The module computes with rounded copies under bf16/fp16; the weights that matter are the
        optimiser's fp32 master weights, partitioned across ranks by ZeRO. They are assembled here (one
        all_reduce per parameter, in state_dict order on every rank). Frozen parameters and buffers have
        no master copy and are taken from the module."""
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(self.network.named_parameters())
        out = {}
        for name, value in self.network.state_dict().items():
            master = safe_get_full_fp32_param(params[name]) if name in params else None
            out[name] = value if master is None else master
        return cpu_fp32(out)

    def precision(self) -> dict[str, str]:
        if self.amp == "none":
            return {"compute_dtype": "float32", "mechanism": "none"}
        low = str(_LOW[self.amp]).removeprefix("torch.")
        if self.amp == "bf16":
            how = f"DeepSpeed torch_autocast ({self.device.type}, {low}; fp32 module and master weights)"
        else:
            how = f"DeepSpeed {self.amp} (module in {low}, fp32 master weights in the optimiser)"
        return {"compute_dtype": low, "mechanism": how}


BACKENDS = {"ddp": DDPBackend, "deepspeed": DeepSpeedBackend}


def build_backend(cfg: Config, network: nn.Module, device: torch.device, world_size: int) -> Backend:
    """The engine.backend for `network` (already on `device`), with its optimiser."""
    return BACKENDS[cfg.engine.backend](cfg, network, device, world_size)
