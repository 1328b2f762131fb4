"""The training loop, read top to bottom: build, then per epoch per step, then finish.

Per rank and step: a P×K batch from the shard stream → augmentation on the device → model → global,
local and class outputs → the criterion gathers embeddings from every rank (differentiable all_gather)
and computes batch-hard global/local triplet, ID and mutual terms over its own anchors against the
global batch → backward → optimiser step (both inside the backend: DDP or DeepSpeed, backend.py).

Components: backend.py (the engines), state.py (counters, RNG, run id), reporting.py (JSONL, progress
bar, tracker cadence, summary), preemption.py (signals, requeue exit code), pipeline/checkpoint.py.

Fault tolerance:
- checkpoints every `checkpoint.every_steps` and at each epoch end (atomic, last K kept, `latest`);
- a restart with the same command resumes from `latest` at the exact step with the same batches
  (the stream replays from `start_step`, RNG states of every rank are restored);
- a restart on another number of ranks (a SLURM requeue onto fewer nodes, an elastic job that lost or
  gained a node) resumes too, under DDP and DeepSpeed ZeRO-1/2 (backend.py re-partitions the optimiser
  state): the rest of the current epoch is re-cut for the new ranks (data/plan.py, `Cut`), the LR
  continues from the training progress in epochs, the same MLflow run goes on, and the change is
  recorded (`world_size_changes` in the checkpoints and summary.json, `world_size` in every step record,
  a line on stderr);
- SIGTERM/SIGUSR1 (preemption): every rank agrees at the next step boundary, a checkpoint is written,
  `<output_dir>/preempted.json` is left for the job script, and the process exits with
  PREEMPTED_EXIT_CODE so the scheduler can requeue;
- a non-finite loss stops the run naming the step (or skips the step with `train.nan_policy=skip`).
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import distributed as D
from ..checkpoint import (CheckpointError, CheckpointManager, checkpoint_name, evaluated_network,
                          evaluated_state_dict, load_checkpoint_file)
from ..config import Config, dump_config, flatten
from ..data import (TrainSets, epoch_steps, eval_source, load_manifests, shard_set_inputs, shard_set_tags,
                    train_batches)
from ..data.plan import Cut, cut_steps, epoch_fraction
from ..data.transforms import TrainAugment
from ..losses import AlignedReIDCriterion
from ..model import MutualPair, build_model, fetch_pretrained_once_per_node
from ..tracking import Tracker, default_run_name
from .backend import build_backend
from .preemption import Preempted, PreemptionSignals, clear_marker, write_marker
from .reporting import Reporter
from .state import TrainState, rng_state, seed_rank


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    """`Trainer(cfg, dist_info).run()`. Public step API (benchmarks use it): `batches(epoch, start_step)`,
    `train_step(batch)`, `backend` (`.forward`, `.autocast()`, `.network`, `.wrapped`)."""

    def __init__(self, cfg: Config, dist_info: D.DistInfo):
        self.cfg, self.dist, self.device = cfg, dist_info, dist_info.device
        self.out = Path(cfg.output_dir)
        if dist_info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
        D.barrier()

        self.train_sets = TrainSets(load_manifests(cfg.data.shards))   # one or several shard sets
        self.num_classes = self.train_sets.num_classes
        self.image_size = tuple(cfg.data.image_size)
        self.steps_per_epoch = epoch_steps(self.train_sets, cfg.data.p, cfg.data.k, dist_info.world_size,
                                           cfg.train.steps_per_epoch)

        network = self._build_network()
        seed_rank(cfg.seed, epoch=0, rank=dist_info.rank)   # after the (identical) initialisation
        self.criterion = AlignedReIDCriterion(cfg.loss, mutual=cfg.mutual.enabled)
        self.augment = TrainAugment(self.image_size, flip_prob=cfg.data.flip_prob, pad=cfg.data.pad,
                                    erasing_prob=cfg.data.erasing_prob).to(self.device)
        self.backend = build_backend(cfg, network, self.device, dist_info.world_size)
        self.state = TrainState()

        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.checkpoint.keep_last)
        self.signals = PreemptionSignals()
        self.last_metrics: dict[str, float] = {}
        self.last_metrics_step: int | None = None      # the global step last_metrics measured
        self.corrupt_images = 0
        self._forward_dtype: str | None = None
        self._fp32_eval_net: torch.nn.Module | None = None
        self.tracker = Tracker(cfg.tracking, is_main=dist_info.is_main, output_dir=str(self.out))
        self.report = Reporter(self.out, self.tracker, is_main=dist_info.is_main, log_every=cfg.train.log_every,
                               epochs=cfg.train.epochs, steps_per_epoch=self.steps_per_epoch,
                               images_per_step=cfg.data.p * cfg.data.k * dist_info.world_size,
                               world_size=dist_info.world_size)
        if cfg.checkpoint.resume:
            self._resume()
        self.batches(self.state.epoch, self.state.step_in_epoch)  # data.decode_cache: allocated (or refused) now
        # Unset tracking.run_name: "<experiment>-<engine>-w<world>-<time>-<hex>", not MLflow's generated
        # name, which comes from the `random` this process seeds (every run would be named alike).
        run_id = self.tracker.start(params=cfg.flat(), tags=self._tags(), run_id=self.state.mlflow_run_id,
                                    run_name=default_run_name(cfg.tracking.experiment, self.backend.name,
                                                              f"w{dist_info.world_size}"))
        if self.tracker.active:    # rank 0: the data as MLflow dataset inputs (one per shard set)
            self.tracker.log_datasets(shard_set_inputs(cfg.data.shards, cfg.eval.shards))
        self.state.mlflow_run_id = D.broadcast_object(run_id)

    def _build_network(self) -> torch.nn.Module:
        """Identical initialisation on every rank (seeded); SyncBatchNorm across GPUs if asked."""
        cfg = self.cfg
        if cfg.model.pretrained:  # local rank 0 downloads (once per node); a failure stops every rank
            fetch_pretrained_once_per_node(cfg.model.pretrained, self.dist.local_rank)
        torch.manual_seed(cfg.seed)
        network = build_model(cfg.model, self.num_classes)
        if cfg.mutual.enabled:
            torch.manual_seed(cfg.seed + 1)
            network = MutualPair(network, build_model(cfg.model, self.num_classes))
        if cfg.model.sync_bn and self.dist.world_size > 1:
            network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
        return network.to(self.device)

    def _tags(self) -> dict[str, str]:
        changes = {"world_size_changes": ", ".join(
            f"{c['from_world_size']}->{c['to_world_size']} at step {c['global_step']}"
            for c in self.state.world_size_changes)} if self.state.world_size_changes else {}
        return {"world_size": str(self.dist.world_size), "nodes": str(self.dist.num_nodes), **changes,
                "engine": self.backend.name, "dist_backend": str(self.dist.backend or "none"),
                "device": self.device.type,
                **shard_set_tags(self.cfg.data.shards),   # locations, formats, manifest sha256
                # tracking.tags last: e.g. mlflow.parentRunId (launch/ablate.py nests its runs this way)
                **{key: str(value) for key, value in flatten(self.cfg.tracking.tags).items()}}

    def _run_id(self) -> str | None:
        """The MLflow run id as rank 0 best knows it (a run created in the background lands later)."""
        return getattr(self.tracker, "run_id", None) or self.state.mlflow_run_id

    # ------------------------------------------------------------------------------------- step
    def epoch_length(self) -> int:
        """Steps of the current epoch: steps_per_epoch, or fewer or more when the epoch was begun at
        another world size and re-cut for this one (data/plan.py)."""
        cuts = self.state.epoch_cuts
        return cut_steps(cuts, self.dist.world_size) if cuts else self.steps_per_epoch

    def progress(self) -> float:
        """Training progress in epochs (fractional): what the LR schedule and the local warm-up follow,
        continuous across a change of world size."""
        s = self.state
        return s.epoch + epoch_fraction(s.epoch_cuts, s.step_in_epoch, self.epoch_length())

    def batches(self, epoch: int, start_step: int = 0):
        """This rank's P×K batches of `epoch` from `start_step` on (uint8: augmented in train_step); for
        the current epoch, re-cut as the state says."""
        d = self.cfg.data
        return train_batches(d.shards, p=d.p, k=d.k, rank=self.dist.rank, world_size=self.dist.world_size,
                             epoch=epoch, seed=self.cfg.seed, num_workers=d.num_workers,
                             image_size=self.image_size, start_step=start_step,
                             steps_per_epoch=self.cfg.train.steps_per_epoch, cache_dir=d.cache_dir,
                             decode_cache=d.decode_cache, device=self.device,
                             ranks_per_node=self.dist.local_world_size,
                             cuts=self.state.epoch_cuts if epoch == self.state.epoch else None)

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, float], bool, dict[str, float]]:
        """One optimisation step. Returns (loss terms averaged over ranks, stop requested, timings)."""
        t0 = time.perf_counter()
        images = batch["images"].to(self.device, non_blocking=True)
        pids = batch["pids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        with torch.no_grad():
            images = self.augment(images)
        self._sync()
        t_aug = time.perf_counter() - t0
        outputs = self.backend.forward(images)
        if self._forward_dtype is None:   # what the network really computed in (summary.json)
            first = outputs[0] if isinstance(outputs, list) else outputs
            self._forward_dtype = str(first["global"].dtype).removeprefix("torch.")
        # No cast here: the criterion exchanges the features in the dtype they were computed in (bf16 under
        # autocast: half the bytes) and computes the loss in float32.
        progress = self.progress()
        self.backend.set_progress(progress)        # the LR of this step
        if self.cfg.loss.local_warmup_epochs > 0:
            self.criterion.local_scale = min(1.0, progress / self.cfg.loss.local_warmup_epochs)
        loss, terms = self.criterion(outputs, pids, labels)
        timing = dict(getattr(self.criterion, "last_timing", {}) or {}, augment_s=t_aug)

        # One small collective per step: agree on preemption and on a non-finite loss, average terms.
        names = sorted(terms)
        shared = torch.tensor([float(self.signals.received is not None), float(not torch.isfinite(loss))]
                              + [float(terms[n]) for n in names], dtype=torch.float64, device=self.device)
        shared = D.all_reduce_sum(shared)
        stop, nonfinite = bool(shared[0] > 0), bool(shared[1] > 0)
        averaged = {n: float(v) / self.dist.world_size for n, v in zip(names, shared[2:].tolist())}
        s = self.state
        if nonfinite and self.cfg.train.nan_policy == "stop":
            raise NonFiniteLossError(
                f"non-finite loss at epoch {s.epoch}, step {s.step_in_epoch} (global step {s.global_step}) "
                f"on at least one rank: {_fmt(averaged)}. Lower train.lr, set train.grad_clip, or set "
                "train.nan_policy=skip to skip such steps.")
        self.backend.step(loss, skip=nonfinite)   # nan_policy == skip: gradients discarded on every rank
        if nonfinite:
            s.skipped_steps += 1
            self.report.message(f"skipped step {s.global_step}: non-finite loss ({_fmt(averaged)})")
        self._sync()
        timing["step_s"] = time.perf_counter() - t0
        return averaged, stop, timing

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        status = "FAILED"
        try:
            with self.signals.installed(), self.report.open():
                if self.cfg.eval.at_start and self.state.global_step == 0:
                    initial = self.evaluate(tag="initial")
                    self.tracker.log_metrics(initial, step=0)
                    self.report.message("initial model: " + ", ".join(
                        f"{k.split('/')[-1]} {v:.4f}" for k, v in initial.items()))
                while self.state.epoch < self.cfg.train.epochs:
                    self._train_epoch()
            status = "FINISHED"
            return self._finish()
        except (Preempted, KeyboardInterrupt):
            status = "KILLED"
            raise
        finally:
            self.tracker.finish(status)

    def _train_epoch(self) -> None:
        cfg, s = self.cfg, self.state
        self.backend.train()
        batches = self.batches(s.epoch, s.step_in_epoch)
        length = self.epoch_length()
        self.report.start_epoch(s, length)
        iterator = iter(batches)
        while True:
            t_wait = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            data_wait = time.perf_counter() - t_wait
            terms, stop, timing = self.train_step(batch)
            s.step_in_epoch += 1
            s.global_step += 1
            self.report.step(s, terms, timing, data_wait, self.backend.lr)
            if stop:
                self.report.close_bar()
                self._preempt()
            every = cfg.checkpoint.every_steps
            if every and s.global_step % every == 0 and s.step_in_epoch < length:
                self.save_checkpoint()
        self.corrupt_images = int(batches.stats.get("corrupt_images", 0))
        metrics = self.report.epoch_metrics()
        last_epoch = s.epoch + 1 == cfg.train.epochs
        every = cfg.eval.every_epochs
        if (last_epoch and cfg.eval.final) or (every and (s.epoch + 1) % every == 0):
            metrics.update(self.evaluate())
        self.report.end_epoch(s, metrics)
        self.report.check_branch(s.epoch + 1, cfg.loss.local_warmup_epochs)
        self.save_checkpoint()  # epoch end: step_in_epoch == epoch_length()
        s.epoch, s.step_in_epoch, s.epoch_cuts = s.epoch + 1, 0, []

    def _preempt(self) -> None:
        s = self.state
        self.report.message(f"preemption signal received: checkpointing at epoch {s.epoch}, step "
                            f"{s.step_in_epoch} (global step {s.global_step})")
        self.save_checkpoint()
        if self.dist.is_main:
            write_marker(self.out, epoch=s.epoch, step_in_epoch=s.step_in_epoch, global_step=s.global_step,
                         checkpoint=self.ckpt.latest_name())
        raise Preempted()

    # ------------------------------------------------------------------------------- evaluation
    def eval_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective. fp32 CPU weights of the evaluated network (the master weights; nets.0 of a pair)."""
        return evaluated_state_dict(self.backend.fp32_state_dict())[0]

    def eval_network(self) -> torch.nn.Module:
        """Collective. The network evaluation runs: the training network itself when its weights are the
        fp32 master weights (DDP; autocast only ever wraps the training forward), else an fp32 copy
        rebuilt from the master weights (DeepSpeed, whose module may hold bf16/fp16 copies)."""
        if self.backend.module_is_master:
            return evaluated_network(self.backend.network)
        weights = self.eval_state_dict()
        if self._fp32_eval_net is None:
            self._fp32_eval_net = build_model(dataclasses.replace(self.cfg.model, pretrained=None),
                                              self.num_classes)
        self._fp32_eval_net.load_state_dict(weights)
        return self._fp32_eval_net.to(self.device)

    def evaluate(self, tag: str | None = None) -> dict[str, float]:
        """Collective: rank-1/5/10, mAP, mINP on the query/gallery shards; pictures logged by rank 0."""
        from ..evaluation import evaluate
        from ..evaluation.alignment_view import alignment_picture

        cfg = self.cfg
        # Each rank's BatchNorm running statistics moved with its own last batches; evaluate (like the
        # checkpoint, written by rank 0) with rank 0's so that in-training and offline numbers agree.
        D.broadcast_buffers(self.backend.network, src=0)
        out_dir = self.out / "eval" / (tag or f"epoch-{self.state.epoch + 1:04d}")
        shards = eval_source(cfg.data.shards, cfg.eval.shards, cache_dir=cfg.data.cache_dir)
        network = self.eval_network()
        result = evaluate(network, shards, image_size=self.image_size, device=self.device,
                          distance=cfg.eval.distance, rerank=cfg.eval.rerank, batch_size=cfg.eval.batch_size,
                          max_rank=cfg.eval.max_rank, output_dir=str(out_dir) if self.dist.is_main else None,
                          plots=cfg.eval.plots)
        metrics = {f"eval/{k}": float(result[k]) for k in ("rank1", "rank5", "rank10", "mAP", "mINP")}
        if tag is None:
            self.last_metrics = {k.split("/")[1]: v for k, v in metrics.items()}
            self.last_metrics_step = self.state.global_step
        if self.dist.is_main:
            if cfg.eval.plots:   # rank 0 alone, after the collective evaluation
                picture = alignment_picture(network, shards, out_dir / "alignment.png", image_size=self.image_size,
                                            device=self.device, distance=cfg.eval.distance)
                result["artifacts"] = [*result.get("artifacts", []), *([picture] if picture else [])]
            for path in result.get("artifacts", []):
                self.tracker.log_artifact(path, artifact_path=f"eval/{out_dir.name}")
        return metrics

    # ------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Collective: every rank calls it at the same step."""
        s, cfg = self.state, self.cfg
        name = checkpoint_name(s.epoch, s.global_step)
        rngs = D.all_gather_object(rng_state())
        self.backend.save(self.ckpt.ds_dir(), name.removesuffix(".pt"))
        weights = self.backend.fp32_state_dict()
        engine_state = self.backend.state_dict()     # collective under DeepSpeed ZeRO (the full state)
        error = None
        if self.dist.is_main:
            state = {"model": weights, **engine_state, **s.state_dict(rngs),
                     "mlflow_run_id": self._run_id(), "config": cfg.to_dict(), "num_classes": self.num_classes,
                     "mutual": cfg.mutual.enabled, "world_size": self.dist.world_size,
                     "epoch_steps": self.epoch_length(), "engine": self.backend.name}
            try:
                self.ckpt.save(state, name)
            except CheckpointError as exc:
                error = str(exc)
        error = D.broadcast_object(error)
        if error:
            raise CheckpointError(error)

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
        restored = self.backend.load(state, self.ckpt.ds_dir(), name.removesuffix(".pt"))
        s = self.state
        written_by = int(state.get("world_size", self.dist.world_size))
        if not s.load_state_dict(state, name=name, rank=self.dist.rank, world_size=self.dist.world_size):
            if written_by == self.dist.world_size:
                warnings.warn(f"resuming {name}: it holds no RNG state for {self.dist.world_size} ranks, so "
                              "the augmentation differs from an uninterrupted run", stacklevel=2)
            seed_rank(self.cfg.seed, epoch=s.epoch + 1000 + len(s.world_size_changes), rank=self.dist.rank)
        if written_by != self.dist.world_size:
            self._change_world(state, name, written_by, restored)
        if s.step_in_epoch >= self.epoch_length():
            s.epoch, s.step_in_epoch, s.epoch_cuts = s.epoch + 1, 0, []
        self.report.message(f"resumed from {name}: epoch {s.epoch}, step {s.step_in_epoch} of "
                            f"{self.epoch_length()}, global step {s.global_step}; optimiser state: {restored}")

    def _change_world(self, state: dict[str, Any], name: str, written_by: int, restored: str) -> None:
        """The checkpoint was written by `written_by` ranks: re-cut the rest of its epoch for this world
        size (data/plan.py), keep the LR curve (progress in epochs) and record the change."""
        s, world, d = self.state, self.dist.world_size, self.cfg.data
        planned = int(state.get("epoch_steps") or (
            cut_steps(s.epoch_cuts, written_by) if s.epoch_cuts else
            epoch_steps(self.train_sets, d.p, d.k, written_by, self.cfg.train.steps_per_epoch)))
        done = s.step_in_epoch
        change = {"global_step": s.global_step, "epoch": s.epoch, "from_world_size": written_by,
                  "to_world_size": world, "checkpoint": name, "optimizer_state": restored,
                  "epoch_steps_before": planned, "steps_done_before": done}
        if done >= planned:                       # the epoch was complete: the next starts as usual
            s.epoch, s.step_in_epoch, s.epoch_cuts = s.epoch + 1, 0, []
            what = "at an epoch boundary"
        else:
            if done > 0:        # (done == 0: the previous world had not begun its share; re-deal it)
                s.epoch_cuts.append(Cut(written_by, planned, done).as_dict())
                s.step_in_epoch = 0
            left = Cut(**s.epoch_cuts[-1]).remaining if s.epoch_cuts else None
            if left is not None and left < world:   # less than one step left: the epoch is done
                s.epoch, s.step_in_epoch, s.epoch_cuts = s.epoch + 1, 0, []
                change["dropped_batches"] = left
                what = f"with {left} batches of epoch {s.epoch} left, fewer than one step: it ends there"
            else:
                length = self.epoch_length()
                change["epoch_steps_after"] = length
                if left is not None:
                    change["dropped_batches"] = left % world
                what = (f"in epoch {s.epoch + 1} after step {done} of {planned}: the rest of the epoch "
                        f"({'all of it' if left is None else _count(left, 'batch')}) is re-cut into "
                        f"{_count(length, 'step')} per rank"
                        + (f" ({_count(left % world, 'batch')} dropped)" if left and left % world else ""))
        progress = self.progress()
        change["progress_epochs"] = round(progress, 6)
        s.world_size_changes.append(change)
        self.report.message(
            f"world size changed from {written_by} to {world} ranks {what}; learning rate continues at epoch "
            f"{progress:.3f} of the schedule; optimiser state: {restored}; the RNG streams are "
            "re-seeded (augmentation differs from a run at one size)")

    # ----------------------------------------------------------------------------------- finish
    def precision(self) -> dict[str, str]:
        """What numeric precision this run actually uses (recorded in summary.json)."""
        return {"amp": self.cfg.train.amp, **self.backend.precision(), "master_weights": "float32",
                "losses": "float32", "device": self.device.type,
                "observed_forward_dtype": self._forward_dtype or "unknown (no step ran)"}

    def _finish(self) -> dict[str, Any]:
        # Collective: under DeepSpeed the fp32 weights are assembled from every rank's partition.
        log_model = self.cfg.tracking.enabled and self.cfg.tracking.log_model
        weights = self.eval_state_dict() if log_model else None
        s = self.state
        summary = {
            "world_size": self.dist.world_size, "nodes": self.dist.num_nodes, "engine": self.backend.name,
            "global_step": s.global_step, "epochs_completed": s.epoch, "steps_per_epoch": self.steps_per_epoch,
            "final_metrics": self.last_metrics, "mlflow_run_id": self._run_id(),
            "resumed_from": s.resumed_from, "world_size_changes": s.world_size_changes,
            "skipped_steps": s.skipped_steps,
            "corrupt_images": self.corrupt_images,
            "checkpoint": str(self.ckpt.dir / (self.ckpt.latest_name() or "")),
            "precision": self.precision(),
        }
        health = {k.removeprefix("local/"): v for k, v in self.report.epoch_means.items() if k.startswith("local/")}
        if health:   # the aligned branch's diagnostics over the last epoch trained in this process
            summary["local_branch"] = {**health, "warning": self.report.health_warning}
        if self.dist.is_main:
            clear_marker(self.out)
            self.report.write_summary(summary)
            if weights is not None:
                # The final evaluation measured these weights: its metrics are linked to the model.
                final = self.last_metrics if self.last_metrics_step == s.global_step else {}
                self.tracker.log_model(weights, self.cfg.to_dict(), self.num_classes,
                                       metrics={f"eval/{k}": final[k] for k in LINKED_METRICS if k in final})
        return summary


LINKED_METRICS = ("rank1", "mAP", "mINP")    # the final evaluation's metrics linked to the logged model


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("ch") else "s")


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
