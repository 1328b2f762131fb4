"""Shared harness for tests that run real gloo process groups in spawned processes.

`run_ranks(worker, world, out_dir, *args)` starts `world` processes, each with the torchrun-style
environment (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT) and one thread, calls
`worker(rank, world, out_dir, *args)` (a module-level function; it saves `out_dir/rank{r}.pt`), and
returns the loaded results. A rank that fails writes its traceback, which the assertion shows; ranks
still alive after `timeout_s` are killed, so nothing hangs.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from pathlib import Path

import torch

PROCESS_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(worker, rank: int, world: int, port: int, out_dir: str, args: tuple) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        torch.set_num_threads(1)
        worker(rank, world, out_dir, *args)
    except BaseException:
        (Path(out_dir) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


def run_ranks(worker, world: int, out_dir: Path, *args, timeout_s: float = PROCESS_TIMEOUT_S,
              weights_only: bool = True) -> list[dict]:
    """`weights_only=False` only for results holding numpy arrays that the test itself wrote."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(worker, r, world, port, str(out_dir), args)) for r in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    errors = {p.name: p.read_text() for p in Path(out_dir).glob("error*.txt")}
    assert not hung, f"ranks {hung} still running after {timeout_s} s; errors: {errors}"
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}; errors: {errors}"
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=weights_only) for r in range(world)]
