"""Preemption: SIGTERM / SIGUSR1 (a scheduler's warning before it kills the job) become a request to
stop at the next step boundary; the trainer checkpoints, leaves `<output_dir>/preempted.json` for the
job script and exits with PREEMPTED_EXIT_CODE so that the scheduler requeues the job.

The handler only records the signal: the ranks agree on stopping inside the step's one collective
(pipeline.engine.trainer), so that every rank checkpoints at the same step.
"""
from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path

from ..fileio import atomic_write

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" - the job script requeues on this status
MARKER = "preempted.json"


class Preempted(SystemExit):
    """Raised after the preemption checkpoint: the process exits with PREEMPTED_EXIT_CODE."""

    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


class PreemptionSignals:
    """`with signals.installed(): ...` routes SIGTERM/SIGUSR1 to `signals.received` (the signal number,
    None until one arrives); the previous handlers come back afterwards."""

    def __init__(self):
        self.received: int | None = None

    def _on_signal(self, signum, _frame) -> None:
        self.received = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[PreemptionSignals]:
        wanted = [signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
        previous = {s: signal.signal(s, self._on_signal) for s in wanted}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def write_marker(output_dir: Path, *, epoch: int, step_in_epoch: int, global_step: int,
                 checkpoint: str | None) -> None:
    """`<output_dir>/preempted.json`: where the run stopped and with which checkpoint (main rank)."""
    atomic_write(Path(output_dir) / MARKER, json.dumps({
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
        "checkpoint": checkpoint, "exit_code": PREEMPTED_EXIT_CODE}))


def clear_marker(output_dir: Path) -> None:
    """A run that finished is no longer preempted."""
    (Path(output_dir) / MARKER).unlink(missing_ok=True)
