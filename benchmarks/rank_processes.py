"""Run a benchmark's worker on W spawned gloo ranks and collect what each puts on the result queue.

Shared by benchmarks/loss_overhead.py and benchmarks/scaling.py. `worker(rank, world, port, args,
results)` must put one tuple starting with its rank on `results`; W = 1 runs it in this process (no
process group, one start less).
"""
from __future__ import annotations

import multiprocessing as mp
import socket
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker: Callable, world: int, args, timeout: float) -> list[tuple]:
    """The ranks' result tuples in rank order. Ranks still alive after `timeout` seconds are killed,
    and a rank that failed raises RuntimeError naming the exit codes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    if world == 1:
        worker(0, 1, 0, args, results)
        return [results.get(timeout=60)]
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, results)) for r in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    collected = []
    try:
        while len(collected) < world:
            collected.append(results.get(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
    if any(proc.exitcode != 0 for proc in procs):
        raise RuntimeError(f"W={world}: rank exit codes {[p.exitcode for p in procs]}")
    return sorted(collected, key=lambda c: c[0])
