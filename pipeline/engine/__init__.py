"""Training engine: the loop (trainer.py), the DDP | DeepSpeed backends (backend.py), the training
state (state.py), what the run reports (reporting.py), preemption handling (preemption.py) and LR
schedules (schedule.py). Checkpoint files are pipeline/checkpoint.py's.

`train`/`Trainer` are imported lazily so that the small parts load without the whole stack."""
from .preemption import PREEMPTED_EXIT_CODE

__all__ = ["PREEMPTED_EXIT_CODE", "NonFiniteLossError", "Trainer", "train"]


def __getattr__(name):
    if name in ("train", "Trainer", "NonFiniteLossError"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
