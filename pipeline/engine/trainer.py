"""The training loop: one loop, two engines (DDP or DeepSpeed), read top to bottom.

Per rank and step: a P×K batch from the shard stream → augmentation on the device → model → global,
local and class outputs → the criterion gathers embeddings from every rank (differentiable all_gather)
and computes batch-hard global/local triplet, ID and mutual terms over its own anchors against the
global batch → backward → optimiser step.

Fault tolerance:
- checkpoints every `checkpoint.every_steps` and at each epoch end (atomic, last K kept, `latest`);
- a restart with the same command resumes from `latest` at the exact step with the same batches
  (the stream replays from `start_step`, RNG states of every rank are restored);
- SIGTERM/SIGUSR1 (preemption): every rank agrees at the next step boundary, a checkpoint is written,
  `<output_dir>/preempted.json` is left for the job script, and the process exits with
  PREEMPTED_EXIT_CODE so the scheduler can requeue;
- a non-finite loss stops the run naming the step (or skips the step with `train.nan_policy=skip`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .. import distributed as D
from ..config import Config, dump_config, flatten
from ..data import TrainSets, epoch_steps, eval_source, load_manifests, shard_set_tags, train_batches
from ..data.transforms import TrainAugment
from ..fileio import atomic_write
from ..losses import AlignedReIDCriterion
from ..model import MutualPair, build_model
from ..model.backbone import fetch_pretrained_once_per_node
from ..tracking import Tracker
from .checkpoint import CheckpointError, CheckpointManager, checkpoint_name, load_checkpoint_file
from .schedule import build_optimizer, build_scheduler

from . import PREEMPTED_EXIT_CODE


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def deepspeed_config(cfg: Config, micro_batch: int) -> dict:
    """The `deepspeed:` section completed with what the trainer owns (batch size, clipping, precision)."""
    ds = json.loads(json.dumps(cfg.engine.deepspeed))  # deep copy of plain data
    ds.setdefault("gradient_accumulation_steps", 1)
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds.pop("train_batch_size", None)
    if cfg.train.grad_clip is not None:
        ds["gradient_clipping"] = cfg.train.grad_clip
    if cfg.train.amp == "bf16":
        # torch.autocast inside the engine's forward, not DeepSpeed's "bf16" mode: that mode casts the
        # parameters to bf16 but keeps BatchNorm's running statistics in fp32, a mix the CPU kernels
        # refuse, and BatchNorm is better computed in fp32 anyway. The module keeps fp32 weights;
        # convolutions and linear layers run in bf16 and their gradients are reduced in bf16.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif cfg.train.amp == "fp16":
        ds.setdefault("fp16", {})["enabled"] = True
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"engine.deepspeed.zero_optimization.stage is {stage}; supported: 0, 1, 2")
    return ds


class Trainer:
    def __init__(self, cfg: Config, dist_info: D.DistInfo):
        self.cfg = cfg
        self.dist = dist_info
        self.device = dist_info.device
        self.out = Path(cfg.output_dir)
        if dist_info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
        D.barrier()
        if cfg.engine.backend == "deepspeed" and cfg.train.nan_policy == "skip":
            raise ValueError("train.nan_policy=skip is supported with engine.backend=ddp only; "
                             "DeepSpeed owns the optimiser step (use nan_policy=stop)")

        self.train_sets = TrainSets(load_manifests(cfg.data.shards))   # one or several shard sets
        self.num_classes = self.train_sets.num_classes
        self.image_size = tuple(cfg.data.image_size)
        self.steps_per_epoch = epoch_steps(self.train_sets, cfg.data.p, cfg.data.k, dist_info.world_size,
                                           cfg.train.steps_per_epoch)

        if cfg.model.pretrained:  # local rank 0 downloads (once per node); a failure stops every rank
            fetch_pretrained_once_per_node(cfg.model.pretrained, dist_info.local_rank)
        # Model: identical initialisation on every rank (seeded), then per-rank RNG for augmentation.
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, self.num_classes)
        if cfg.mutual.enabled:
            torch.manual_seed(cfg.seed + 1)
            model = MutualPair(model, build_model(cfg.model, self.num_classes))
        if cfg.model.sync_bn and dist_info.world_size > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if cfg.train.channels_last and cfg.engine.backend != "deepspeed":
            # DeepSpeed keeps its parameters as views of flat contiguous buffers (and cannot broadcast
            # channels_last ones): there the inputs alone are channels_last, which convolutions follow.
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._seed_rank(epoch=0)

        self.criterion = AlignedReIDCriterion(cfg.loss, mutual=cfg.mutual.enabled)
        self.augment = TrainAugment(self.image_size, flip_prob=cfg.data.flip_prob, pad=cfg.data.pad,
                                    erasing_prob=cfg.data.erasing_prob).to(self.device)
        optimizer = build_optimizer(model.parameters(), cfg.train)
        scheduler = build_scheduler(optimizer, self.steps_per_epoch, cfg.train)
        self.scaler = None
        if cfg.engine.backend == "deepspeed":
            import deepspeed

            D.ensure_process_group(self.device)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler,
                config=deepspeed_config(cfg, cfg.data.p * cfg.data.k), dist_init_required=False)
            self.module = self.engine
        else:
            self.engine = None
            self.optimizer, self.scheduler = optimizer, scheduler
            if cfg.train.amp == "fp16" and self.device.type == "cuda":
                self.scaler = torch.amp.GradScaler("cuda")
            if dist_info.world_size > 1:
                unused = cfg.loss.id_weight == 0 or cfg.loss.local_weight == 0
                self.module = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    find_unused_parameters=unused)
            else:
                self.module = model

        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.checkpoint.keep_last)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.resumed_from: list[str] = []
        self.mlflow_run_id: str | None = None
        self.last_metrics: dict[str, float] = {}
        self._stop_signal: int | None = None
        self.skipped_steps = 0
        self.corrupt_images = 0
        self._forward_dtype: str | None = None
        if cfg.checkpoint.resume:
            self._resume()
        self._batches(self.epoch, self.step_in_epoch)  # data.decode_cache: allocated (or refused) before training

        self.tracker = Tracker(cfg.tracking, is_main=dist_info.is_main, output_dir=str(self.out))
        run_id = self.tracker.start(params=cfg.flat(), tags=self._tags(), run_id=self.mlflow_run_id)
        self.mlflow_run_id = D.broadcast_object(run_id)

    # ------------------------------------------------------------------------------------ helpers
    def _batches(self, epoch: int, start_step: int):
        d = self.cfg.data
        return train_batches(d.shards, p=d.p, k=d.k, rank=self.dist.rank, world_size=self.dist.world_size,
                             epoch=epoch, seed=self.cfg.seed, num_workers=d.num_workers,
                             image_size=self.image_size, start_step=start_step,
                             steps_per_epoch=self.cfg.train.steps_per_epoch, cache_dir=d.cache_dir,
                             decode_cache=d.decode_cache, device=self.device,
                             ranks_per_node=self.dist.local_world_size)

    def _seed_rank(self, epoch: int) -> None:
        seed = (self.cfg.seed * 1_000_003 + epoch * 7919 + self.dist.rank) % (2 ** 31)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    def _tags(self) -> dict[str, str]:
        return {
            "world_size": str(self.dist.world_size),
            "nodes": str(self.dist.num_nodes),
            "engine": self.cfg.engine.backend,
            "dist_backend": str(self.dist.backend or "none"),
            "device": self.device.type,
            **shard_set_tags(self.cfg.data.shards),   # locations, formats, manifest sha256
            # tracking.tags last: e.g. mlflow.parentRunId (launch/ablate.py nests its runs this way)
            **{key: str(value) for key, value in flatten(self.cfg.tracking.tags).items()},
        }

    def _run_id(self) -> str | None:
        """The MLflow run id as rank 0 best knows it (a run created in the background lands later)."""
        return getattr(self.tracker, "run_id", None) or self.mlflow_run_id

    def eval_model(self) -> torch.nn.Module:
        """The model used for evaluation and export: the first network of a mutual pair."""
        return self.model.nets[0] if isinstance(self.model, MutualPair) else self.model

    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective (every rank calls it). The training module's state in float32 on the CPU.

        Under DeepSpeed with bf16/fp16 the module computes with rounded copies; the weights that
        matter are the optimiser's fp32 master weights, partitioned across ranks by ZeRO. They are
        assembled here (one all_reduce per parameter, in state_dict order on every rank). Frozen
        parameters and buffers have no master copy and are taken from the module."""
        params = dict(self.model.named_parameters())
        full = None
        if self.engine is not None:
            from deepspeed.utils import safe_get_full_fp32_param

            full = safe_get_full_fp32_param
        out = {}
        for name, value in self.model.state_dict().items():
            master = full(params[name]) if full is not None and name in params else None
            value = value if master is None else master
            out[name] = value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype,
                                          copy=True)
        return out

    def eval_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Collective. fp32 weights of the evaluated network (the first of a mutual pair)."""
        state = self.fp32_state_dict() if state is None else state
        if isinstance(self.model, MutualPair):
            return {k.removeprefix("nets.0."): v for k, v in state.items() if k.startswith("nets.0.")}
        return state

    def _eval_network(self) -> torch.nn.Module:
        """Collective. The network evaluation runs: the training network itself under DDP (fp32
        weights; autocast only ever wraps the training forward), an fp32 copy rebuilt from the
        master weights under DeepSpeed (whose module holds bf16/fp16 copies)."""
        if self.engine is None:
            return self.eval_model()
        weights = self.eval_state_dict()
        if getattr(self, "_fp32_eval_net", None) is None:
            model_cfg = dataclasses.replace(self.cfg.model, pretrained=None)
            self._fp32_eval_net = build_model(model_cfg, self.num_classes)
        self._fp32_eval_net.load_state_dict(weights)
        return self._fp32_eval_net.to(self.device)

    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            tqdm.write(msg, file=sys.stderr)

    # ------------------------------------------------------------------------------- checkpoints
    def _resume(self) -> None:
        # Rank 0 picks the newest usable checkpoint (falling back past corrupt ones) so that every rank
        # resumes from the same one; the others then read that file.
        found = None
        if self.dist.is_main:
            try:
                found = self.ckpt.load_latest()
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}\nRemove the directory or set checkpoint.resume=false "
                                      "to start from scratch.") from None
        name = D.broadcast_object(found[1] if found else None)
        if name is None:
            return
        state = found[0] if found else load_checkpoint_file(self.ckpt.dir / name)
        if state.get("mutual") != self.cfg.mutual.enabled or state.get("num_classes") != self.num_classes:
            raise CheckpointError(f"{self.ckpt.dir / name} was written for mutual={state.get('mutual')}, "
                                  f"num_classes={state.get('num_classes')}; this run has "
                                  f"mutual={self.cfg.mutual.enabled}, num_classes={self.num_classes}. "
                                  "Use another output_dir to start a different training.")
        if self.engine is not None:
            tag = name.removesuffix(".pt")
            path, _ = self.engine.load_checkpoint(str(self.ckpt.ds_dir()), tag=tag,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
            if path is None:
                raise CheckpointError(f"DeepSpeed state for {name} missing under {self.ckpt.ds_dir() / tag}")
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.mlflow_run_id = state.get("mlflow_run_id")
        self.resumed_from = list(state.get("resumed_from", [])) + [name]
        self.skipped_steps = int(state.get("skipped_steps", 0))
        rng = state.get("rng") or []
        if int(state.get("world_size", -1)) == self.dist.world_size and len(rng) == self.dist.world_size:
            _set_rng_state(rng[self.dist.rank])
        else:
            warnings.warn(f"resuming {name} (world size {state.get('world_size')}) with world size "
                          f"{self.dist.world_size}: the data order and augmentation differ from an "
                          "uninterrupted run", stacklevel=2)
            self._seed_rank(self.epoch + 1000)
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self._log(f"resumed from {name}: epoch {self.epoch}, step {self.step_in_epoch}, "
                  f"global step {self.global_step}")

    def save_checkpoint(self) -> None:
        """Collective: every rank calls it at the same step."""
        name = checkpoint_name(self.epoch, self.global_step)
        rngs = D.all_gather_object(_rng_state())
        if self.engine is not None:
            self.engine.save_checkpoint(str(self.ckpt.ds_dir()), tag=name.removesuffix(".pt"),
                                        save_latest=False)
        weights = self.fp32_state_dict()
        error = None
        if self.dist.is_main:
            state = {
                "model": weights,
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "rng": rngs, "config": self.cfg.to_dict(), "num_classes": self.num_classes,
                "mutual": self.cfg.mutual.enabled, "mlflow_run_id": self._run_id(),
                "world_size": self.dist.world_size, "engine": self.cfg.engine.backend,
                "resumed_from": self.resumed_from, "skipped_steps": self.skipped_steps,
            }
            if self.engine is None:
                state["optimizer"] = self.optimizer.state_dict()
                state["scheduler"] = self.scheduler.state_dict()
                state["scaler"] = self.scaler.state_dict() if self.scaler is not None else None
            try:
                self.ckpt.save(state, name)
            except CheckpointError as exc:
                error = str(exc)
        error = D.broadcast_object(error)
        if error:
            raise CheckpointError(error)

    # ---------------------------------------------------------------------------------- signals
    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    @contextlib.contextmanager
    def _signal_handlers(self):
        wanted = [signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
        previous = {s: signal.signal(s, self._on_signal) for s in wanted}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # ------------------------------------------------------------------------------------- step
    def _autocast(self):
        amp = self.cfg.train.amp
        if amp == "none" or self.engine is not None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, float], bool, dict[str, float]]:
        """One optimisation step. Returns (loss terms averaged over ranks, stop requested, timings)."""
        t0 = time.perf_counter()
        images = batch["images"].to(self.device, non_blocking=True)
        pids = batch["pids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        with torch.no_grad():
            images = self.augment(images)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t_aug = time.perf_counter() - t0
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.engine is not None and self.cfg.train.amp == "fp16":
            images = images.half()
        with self._autocast():
            outputs = self.module(images)
        if self._forward_dtype is None:   # what the network really computed in (summary.json)
            first = outputs[0] if isinstance(outputs, list) else outputs
            self._forward_dtype = str(first["global"].dtype).removeprefix("torch.")
        outputs = _to_float(outputs)
        warmup = self.cfg.loss.local_warmup_epochs
        if warmup > 0:
            progress = (self.epoch * self.steps_per_epoch + self.step_in_epoch) / self.steps_per_epoch
            self.criterion.local_scale = min(1.0, progress / warmup)
        loss, terms = self.criterion(outputs, pids, labels)
        timing = dict(getattr(self.criterion, "last_timing", {}) or {}, augment_s=t_aug)

        # One small collective per step: agree on preemption and on a non-finite loss, average terms.
        names = sorted(terms)
        shared = torch.tensor([float(self._stop_signal is not None), float(not torch.isfinite(loss))]
                              + [float(terms[n]) for n in names], dtype=torch.float64, device=self.device)
        shared = D.all_reduce_sum(shared)
        stop, nonfinite = bool(shared[0] > 0), bool(shared[1] > 0)
        averaged = {n: float(v) / self.dist.world_size for n, v in zip(names, shared[2:].tolist())}
        if nonfinite and self.cfg.train.nan_policy == "stop":
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.epoch}, step {self.step_in_epoch} (global step "
                f"{self.global_step}) on at least one rank: {_fmt(averaged)}. Lower train.lr, set "
                "train.grad_clip, or set train.nan_policy=skip to skip such steps.")

        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            if nonfinite:  # nan_policy == skip: gradients are discarded on every rank alike
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_steps += 1
                self._log(f"skipped step {self.global_step}: non-finite loss ({_fmt(averaged)})")
            else:
                if self.cfg.train.grad_clip is not None:
                    if self.scaler is not None:
                        self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timing["step_s"] = time.perf_counter() - t0
        return averaged, stop, timing

    # -------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        status = "FAILED"
        try:
            with self._signal_handlers():
                self._loop()
            status = "FINISHED"
            return self._finish_summary()
        except Preempted:
            status = "KILLED"
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.tracker.finish(status)

    def _loop(self) -> None:
        cfg = self.cfg
        images_per_step = cfg.data.p * cfg.data.k * self.dist.world_size
        if cfg.eval.at_start and self.global_step == 0:
            initial = self.evaluate(tag="initial")
            self.tracker.log_metrics(initial, step=0)
            self._log("initial model: " + ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in initial.items()))
        # Line-buffered: each step's record is on disk before the next step starts (crash-safe, tailable).
        log = open(self.out / "train_log.jsonl", "a", buffering=1) if self.dist.is_main else None
        with log or contextlib.nullcontext():
            self._epochs(log, images_per_step)

    def _epochs(self, log, images_per_step: int) -> None:
        cfg = self.cfg
        while self.epoch < cfg.train.epochs:
            self.module.train()
            batches = self._batches(self.epoch, self.step_in_epoch)
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not self.dist.is_main,
                       desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}", unit="step", dynamic_ncols=True,
                       file=sys.stderr, mininterval=0.2 if sys.stderr.isatty() else 30.0)
            sums: dict[str, float] = {}
            n_steps, epoch_t0, data_wait_total = 0, time.perf_counter(), 0.0
            iterator = iter(batches)
            while True:
                t_wait = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                data_wait = time.perf_counter() - t_wait
                terms, stop, timing = self.train_step(batch)
                self.step_in_epoch += 1
                self.global_step += 1
                n_steps += 1
                data_wait_total += data_wait
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value
                step_time = timing["step_s"] + data_wait
                lr = self.optimizer.param_groups[0]["lr"]
                # "time": wall clock (Unix seconds) when the step ended, for rates over many steps.
                record = {"epoch": self.epoch, "step": self.step_in_epoch, "global_step": self.global_step,
                          "time": time.time(), "lr": lr, **{f"loss/{k}": v for k, v in terms.items()},
                          "throughput/images_per_s": images_per_step / max(step_time, 1e-9),
                          "time/data_wait_share": data_wait / max(step_time, 1e-9)}
                for key in ("comm_s", "loss_s"):
                    if key in timing:
                        record[f"time/{key.removesuffix('_s')}_share"] = timing[key] / max(step_time, 1e-9)
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    bar.update(1)
                    bar.set_postfix_str(f"loss {terms.get('total', float('nan')):.3f} "
                                        f"tri {terms.get('global_triplet', 0):.3f} "
                                        f"id {terms.get('id', 0):.3f} "
                                        f"{record['throughput/images_per_s']:.0f} img/s")
                if self.global_step % cfg.train.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                    self.tracker.log_metrics({k: v for k, v in record.items()
                                              if k not in ("epoch", "step", "global_step", "time")},
                                             step=self.global_step)
                if stop:
                    bar.close()
                    self._preempt()
                every = cfg.checkpoint.every_steps
                if every and self.global_step % every == 0 and self.step_in_epoch < self.steps_per_epoch:
                    self.save_checkpoint()
            bar.close()
            self.corrupt_images = int(batches.stats.get("corrupt_images", 0))
            elapsed = time.perf_counter() - epoch_t0
            means = {k: v / max(1, n_steps) for k, v in sums.items()}
            epoch_metrics = {f"epoch/loss_{k}": v for k, v in means.items()}
            epoch_metrics["epoch/images_per_s"] = n_steps * images_per_step / max(elapsed, 1e-9)
            epoch_metrics["epoch/data_wait_share"] = data_wait_total / max(elapsed, 1e-9)
            last_epoch = self.epoch + 1 == cfg.train.epochs
            ev = cfg.eval.every_epochs
            if (last_epoch and cfg.eval.final) or (ev and (self.epoch + 1) % ev == 0):
                epoch_metrics.update(self.evaluate())
            self.tracker.log_metrics(epoch_metrics, step=self.global_step)
            self._log(f"epoch {self.epoch + 1}/{cfg.train.epochs}: {n_steps} steps in {elapsed:.1f}s, "
                      f"{epoch_metrics['epoch/images_per_s']:.0f} img/s, loss {means.get('total', float('nan')):.4f}"
                      + "".join(f", {k.split('/')[-1]} {v:.4f}" for k, v in epoch_metrics.items()
                                if k.startswith("eval/") and k.split("/")[-1] in ("rank1", "mAP", "mINP")))
            self.save_checkpoint()  # epoch end: step_in_epoch == steps_per_epoch
            self.epoch += 1
            self.step_in_epoch = 0

    def evaluate(self, tag: str | None = None) -> dict[str, float]:
        """Collective: rank-1/5/10, mAP, mINP on the query/gallery shards; pictures logged by rank 0."""
        from ..evaluation import evaluate

        cfg = self.cfg
        # Each rank's BatchNorm running statistics moved with its own last batches; evaluate (like the
        # checkpoint, written by rank 0) with rank 0's so that in-training and offline numbers agree.
        if self.dist.world_size > 1:
            for buf in self.model.buffers():
                torch.distributed.broadcast(buf, src=0)
        out_dir = self.out / "eval" / (tag or f"epoch-{self.epoch + 1:04d}")
        shards = eval_source(cfg.data.shards, cfg.eval.shards, cache_dir=cfg.data.cache_dir)
        result = evaluate(self._eval_network(), shards, image_size=self.image_size, device=self.device,
                          distance=cfg.eval.distance, rerank=cfg.eval.rerank, batch_size=cfg.eval.batch_size,
                          max_rank=cfg.eval.max_rank, output_dir=str(out_dir) if self.dist.is_main else None,
                          plots=cfg.eval.plots)
        metrics = {f"eval/{k}": float(result[k]) for k in ("rank1", "rank5", "rank10", "mAP", "mINP")}
        if tag is None:
            self.last_metrics = {k.split("/")[1]: v for k, v in metrics.items()}
        if self.dist.is_main:
            for path in result.get("artifacts", []):
                self.tracker.log_artifact(path, artifact_path=f"eval/{out_dir.name}")
        return metrics

    def _preempt(self) -> None:
        self._log(f"preemption signal received: checkpointing at epoch {self.epoch}, step "
                  f"{self.step_in_epoch} (global step {self.global_step})")
        self.save_checkpoint()
        if self.dist.is_main:
            atomic_write(self.out / "preempted.json", json.dumps({
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "checkpoint": self.ckpt.latest_name(), "exit_code": PREEMPTED_EXIT_CODE}))
        raise Preempted()

    def precision(self) -> dict[str, str]:
        """What numeric precision this run actually uses (recorded in summary.json)."""
        amp = self.cfg.train.amp
        low = {"bf16": "bfloat16", "fp16": "float16"}.get(amp)
        if low is None:
            compute, how = "float32", "none"
        elif self.engine is not None and amp == "bf16":
            compute, how = low, f"DeepSpeed torch_autocast ({self.device.type}, {low}; fp32 module and master weights)"
        elif self.engine is not None:
            compute, how = low, f"DeepSpeed {amp} (module in {low}, fp32 master weights in the optimiser)"
        else:
            compute, how = low, f"torch.autocast({self.device.type}, {low})" + (
                " with a GradScaler" if self.scaler is not None else "")
        return {"amp": amp, "compute_dtype": compute, "mechanism": how, "master_weights": "float32",
                "losses": "float32", "device": self.device.type,
                "observed_forward_dtype": self._forward_dtype or "unknown (no step ran)"}

    def _finish_summary(self) -> dict[str, Any]:
        # Collective: under DeepSpeed the fp32 weights are assembled from every rank's partition.
        log_model = self.cfg.tracking.enabled and self.cfg.tracking.log_model
        weights = self.eval_state_dict() if log_model else None
        summary = {
            "world_size": self.dist.world_size, "nodes": self.dist.num_nodes,
            "engine": self.cfg.engine.backend, "global_step": self.global_step,
            "epochs_completed": self.epoch, "steps_per_epoch": self.steps_per_epoch,
            "final_metrics": self.last_metrics, "mlflow_run_id": self._run_id(),
            "resumed_from": self.resumed_from, "skipped_steps": self.skipped_steps,
            "corrupt_images": self.corrupt_images,
            "checkpoint": str(self.ckpt.dir / (self.ckpt.latest_name() or "")),
            "precision": self.precision(),
        }
        if self.dist.is_main:
            (self.out / "preempted.json").unlink(missing_ok=True)
            atomic_write(self.out / "summary.json", json.dumps(summary, indent=2))
            if weights is not None:
                self.tracker.log_model(weights, self.cfg.to_dict(), self.num_classes)
        return summary


def _to_float(outputs):
    if isinstance(outputs, list):
        return [_to_float(o) for o in outputs]
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in outputs.items()}


def _fmt(terms: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" if math.isfinite(v) else f"{k}={v}" for k, v in terms.items())


def train(cfg: Config) -> dict[str, Any] | None:
    """Initialise the process group from torchrun's environment (or run single-process) and train.

    Returns the run summary on rank 0 (None on the other ranks)."""
    info = D.init_distributed(cfg.engine.dist_backend, cfg.engine.timeout_s)
    try:
        summary = Trainer(cfg, info).run()
        return summary if info.is_main else None
    finally:
        D.cleanup()
