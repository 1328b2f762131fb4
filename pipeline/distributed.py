"""The one place that knows the rank: process-group set-up from torchrun's environment, rank helpers,
and a differentiable all_gather.

Works as a plain single process too (no torchrun): then world size is 1 and every collective is a no-op.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


class LaunchError(RuntimeError):
    """The way the processes were launched cannot work; the message says how to launch instead."""


def check_elastic_restarts() -> None:
    """Refuse, before any work, a `torchrun --max-restarts N` launch that would fail at its first restart.

    With torch's default, the workers share the rendezvous' TCP store with the agent; after a fault, the
    restarted round can be handed the previous round's addresses (pytorch#135712): the restart dies with
    "Connection refused" in gloo/NCCL's connectFullMesh, or a replacement node waits forever. Setting
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for the agent makes every round build a fresh store. The
    workers inherit the agent's environment, so they can tell which one it runs with."""
    restarts = env_int("TORCHELASTIC_MAX_RESTARTS", 0)
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise LaunchError(
            f"torchrun --max-restarts {restarts} with torch's shared rendezvous store would fail at the first "
            "restart (pytorch#135712: the restarted round gets the previous round's addresses, 'Connection "
            "refused' in connectFullMesh, or a replacement node that waits forever). Start torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment, e.g.\n"
            "    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; torchrun --max-restarts "
            f"{restarts} ... launch/train.py ...\n"
            "(the SLURM scripts and the Docker image set it). Nothing was started.")


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Initialise from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR (torchrun), or run single-process.

    backend: 'auto' -> nccl when CUDA is available, else gloo.
    """
    world_size = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local_rank = env_int("LOCAL_RANK", 0)
    local_world = env_int("LOCAL_WORLD_SIZE", world_size)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError("engine.dist_backend=nccl needs CUDA GPUs; use gloo (or auto) on CPU")
    if world_size > 1 and not dist.is_initialized():
        kwargs = {}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        backend = None
    return DistInfo(rank, world_size, local_rank, local_world, backend, device)


def ensure_process_group(device: torch.device) -> None:
    """A process group even for one process: DeepSpeed's engine needs one. With torchrun's environment
    it already exists; a single process gets a private one-rank group (no network)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)   # DeepSpeed reads them from the environment


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank (identity when single-process)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each rank the SUM over all ranks of the gradient
    computed for its slice (a reduce-scatter). With each rank's loss taken over its own anchors against
    the gathered batch and DDP averaging gradients, this reproduces exactly the gradient of one process
    holding the whole global batch (see tests/test_distributed_equivalence.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        # Sum every rank's gradient w.r.t. the gathered tensor; keep our own slice.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (rank order), differentiably.

    Every rank must pass the same shape (fixed P x K batches make this hold)."""
    if not is_dist() or get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) from every rank along dim 0, without gradient."""
    if not is_dist() or get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
