"""The one place that knows the rank: process-group set-up from torchrun's environment, rank helpers,
and the loss's exchange: groups of consecutive ranks (loss.mining_ranks), a differentiable all_gather
whose backward is a reduce-scatter, `fetch_rows` (only the rows a rank needs, gradients routed back to
their owners), and a counter of the bytes they send.

Works as a plain single process too (no torchrun): then world size is 1 and every collective is a no-op.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
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


def launch_rank() -> int:
    """This process's global rank as the launcher (torchrun) set it; 0 for a plain process. Readable
    before any process group exists (entry points use it to report an error once)."""
    return env_int("RANK", 0)


def launch_world_size() -> int:
    """The number of processes as the launcher set it; 1 for a plain process."""
    return env_int("WORLD_SIZE", 1)


def launch_local_rank() -> int:
    """This process's rank on its node as the launcher set it; 0 for a plain process."""
    return env_int("LOCAL_RANK", 0)


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
    _GROUPS.clear()   # the subgroups died with the default group


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


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy `src`'s buffers (BatchNorm running statistics, ...) of `module` to every rank, in place."""
    if is_dist() and get_world_size() > 1:
        for buf in module.buffers():
            dist.broadcast(buf, src=src)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ---------------------------------------------------------------------------------------------------------
# Loss exchange: mining groups, a traffic counter, and the differentiable collectives the loss uses.


@dataclass(frozen=True)
class RankGroup:
    """A block of `size` consecutive ranks: `group` (None = every rank), this rank's position `rank` in
    it, and `first`, the global rank of its first member."""
    group: object = None
    rank: int = 0
    size: int = 1
    first: int = 0


_GROUPS: dict[int, RankGroup] = {}


def check_group_size(size: int, world_size: int, key: str = "loss.mining_ranks") -> None:
    """`size` ranks per group (0 = all) must be >= 0 and divide the world size; the error names `key`.
    reid-train checks it with the launcher's world size before any process group starts."""
    if size < 0:
        raise LaunchError(f"'{key}' is {size}; must be >= 0 (0 = all ranks)")
    if size and world_size % size:
        raise LaunchError(f"'{key}' is {size}, but the world size {world_size} is not divisible by it; use a "
                         f"divisor of {world_size} (e.g. the GPUs per node) or 0 for all ranks")


def rank_group(size: int, key: str = "loss.mining_ranks") -> RankGroup:
    """The group of `size` consecutive ranks (0 or the world size: every rank) this rank belongs to.

    The first call for a size is collective (torch's new_group must be called by every rank for every
    subgroup, in the same order): call it on every rank at the same point, e.g. at start-up. Later calls
    return the cached group."""
    world, rank = get_world_size(), get_rank()
    check_group_size(size, world, key)
    if size in (0, world) or not is_dist():
        return RankGroup(None, rank, world, 0)
    if size not in _GROUPS:
        mine = None
        for first in range(0, world, size):   # every rank creates every subgroup, in the same order
            group = dist.new_group(list(range(first, first + size)))
            if first <= rank < first + size:
                mine = RankGroup(group, rank - first, size, first)
        _GROUPS[size] = mine
    return _GROUPS[size]


class TrafficCounter:
    """Bytes this rank sends to other ranks in the loss's collectives below, as a bandwidth-optimal
    implementation moves them: all_gather (G - 1)·|x|, all_to_all the rows addressed to other ranks,
    all_reduce (ring) 2·(G - 1)/G·|t|. Counted from the tensors handed to each collective (not estimated
    from the model's sizes). gloo on one machine moves the same bytes over the loopback device, except
    its reduce_scatter, which costs an all_reduce there (hence all_to_all below);
    benchmarks/scaling.py prints both counts side by side."""

    def __init__(self):
        self.bytes, self.calls = 0, 0

    def add(self, nbytes: float) -> None:
        self.bytes += int(nbytes)
        self.calls += 1


_COUNTERS: list[TrafficCounter] = []


@contextmanager
def count_traffic():
    """`with count_traffic() as c: ...` -> c.bytes: what this rank sent in the loss's collectives."""
    counter = TrafficCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _count(nbytes: float) -> None:
    for counter in _COUNTERS:
        counter.add(nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# torch 2.13 renamed all_gather_into_tensor (the old name warns)
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather(x: torch.Tensor, group: RankGroup) -> torch.Tensor:
    out = x.new_empty((group.size * x.shape[0], *x.shape[1:]))
    _gather_into(out, x.contiguous(), group=group.group)
    _count((group.size - 1) * _nbytes(x))
    return out


def _all_to_all(x: torch.Tensor, send: list[int], receive: list[int], group: RankGroup) -> torch.Tensor:
    """Rows x[sum(send[:r]):sum(send[:r + 1])] go to group member r; returns the rows received, member
    by member (receive[r] from member r)."""
    out = x.new_empty((sum(receive), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=receive, input_split_sizes=send,
                           group=group.group)
    row = _nbytes(x[:1]) if x.shape[0] else 0
    _count(row * (sum(send) - send[group.rank]))
    return out


def _reduce_scatter_rows(grad: torch.Tensor, group: RankGroup, dtype: torch.dtype) -> torch.Tensor:
    """Sum over the group of grad [G·A, ...] and keep this rank's A rows: a reduce-scatter, done as an
    all_to_all of the slices (in `dtype`, the features' own) plus a local sum in the gradient's precision.
    Measured on gloo with 4 ranks on the loopback: 1.5 MiB per rank for 2 MiB of gradient, the same as a
    ring reduce-scatter; gloo's reduce_scatter_tensor moved 3.0 MiB (an all_reduce)."""
    count = grad.shape[0] // group.size
    pieces = _all_to_all(grad.to(dtype), [count] * group.size, [count] * group.size, group)
    return pieces.view(group.size, count, *grad.shape[1:]).to(grad.dtype).sum(0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 within a group; the output is in `out_dtype` (the loss's precision) while the
    exchange runs in the input's dtype (bf16 features travel as bf16). The backward hands each rank the
    SUM over the group of the gradient computed for its slice (a reduce-scatter). With each rank's loss
    taken over its own anchors against the gathered batch and DDP averaging gradients, this reproduces
    exactly the gradient of one process holding the group's batch (tests/test_distributed_equivalence.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: RankGroup, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.group, ctx.dtype = group, x.dtype
        return _all_gather(x, group).to(out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_rows(grad, ctx.group, ctx.dtype).to(ctx.dtype), None, None


class _GatherAllReduce(torch.autograd.Function):
    """The former exchange, kept as the baseline of benchmarks/scaling.py and the tests: all_gather of the
    tensor as given, backward = all_reduce of the whole gathered gradient (twice a reduce-scatter's bytes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: RankGroup) -> torch.Tensor:
        ctx.group, ctx.n = group, x.shape[0]
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group.group)
        _count(2 * (ctx.group.size - 1) / ctx.group.size * _nbytes(grad))
        rank = ctx.group.rank
        return grad[rank * ctx.n:(rank + 1) * ctx.n], None


def all_gather_with_grad(x: torch.Tensor, group: RankGroup | None = None, out_dtype: torch.dtype | None = None,
                         backward: str = "reduce_scatter") -> torch.Tensor:
    """Concatenate `x` from every rank of `group` (default: all) along dim 0 (rank order), differentiably,
    exchanged in x's dtype and returned in `out_dtype` (default x's).

    backward: 'reduce_scatter' (each rank receives the summed gradient of its own rows) or 'all_reduce'
    (the former exchange, for baselines). Every rank must pass the same shape (fixed P x K batches)."""
    group = group or rank_group(0)
    out_dtype = out_dtype or x.dtype
    if not is_dist() or group.size == 1:
        return x.to(out_dtype)
    if backward == "all_reduce":
        return _GatherAllReduce.apply(x, group).to(out_dtype)
    return _GatherWithGrad.apply(x, group, out_dtype)


class _FetchRows(torch.autograd.Function):
    """Rows `index` of the group's batch (the concatenation of every member's x), each fetched from its
    owner. Forward: every rank tells each owner which of its rows it wants (an all_to_all of counts, then
    one of indices) and the owners send those rows (an all_to_all of rows); a row asked for twice travels
    once. Backward: the same route in reverse, each gradient row back to its owner, summed there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, group: RankGroup, out_dtype: torch.dtype):
        count = x.shape[0]
        wanted, inverse = torch.unique(index, return_inverse=True)      # sorted: grouped by owner
        receive = torch.bincount(wanted // count, minlength=group.size)
        send = _all_to_all(receive, [1] * group.size, [1] * group.size, group)
        receive, send = receive.tolist(), send.tolist()
        # the rows of mine each member asked for (as int32 on the wire)
        asked = _all_to_all((wanted % count).to(torch.int32), receive, send, group).long()
        rows = _all_to_all(x[asked], send, receive, group)
        ctx.save_for_backward(asked, inverse)
        ctx.group, ctx.send, ctx.receive, ctx.count, ctx.dtype = group, send, receive, count, x.dtype
        return rows.to(out_dtype)[inverse]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        asked, inverse = ctx.saved_tensors
        per_row = grad.new_zeros((sum(ctx.receive), *grad.shape[1:]))
        per_row.index_add_(0, inverse, grad)                             # a row fetched for several anchors
        back = _all_to_all(per_row.to(ctx.dtype), ctx.receive, ctx.send, ctx.group)
        out = grad.new_zeros((ctx.count, *grad.shape[1:]))
        out.index_add_(0, asked, back.to(grad.dtype))                   # a row asked for by several ranks
        return out.to(ctx.dtype), None, None, None


def fetch_rows(x: torch.Tensor, index: torch.Tensor, group: RankGroup | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows `index` ([M] positions in the group's batch, i.e. rank r's row i is r·A + i) of the
    concatenation of every group member's x [A, ...], differentiably, moving only those rows (in x's
    dtype; returned in `out_dtype`). Collective: every member must call it (M may differ per rank)."""
    group = group or rank_group(0)
    out_dtype = out_dtype or x.dtype
    if not is_dist() or group.size == 1:
        return x.to(out_dtype)[index]
    return _FetchRows.apply(x, index, group, out_dtype)


def all_gather_no_grad(x: torch.Tensor, group: RankGroup | None = None) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) from every rank of `group` (default: all) along dim 0,
    without gradient."""
    group = group or rank_group(0)
    if not is_dist() or group.size == 1:
        return x
    return _all_gather(x.detach(), group)
