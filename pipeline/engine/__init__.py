"""Training engine: the loop (DDP or DeepSpeed), checkpoints, LR schedules, preemption handling.

`train`/`Trainer` are imported lazily so that checkpoint utilities load without the whole stack."""
from ..checkpoint import CheckpointError, CheckpointManager, load_checkpoint_file

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" — the job script requeues on this status

__all__ = ["PREEMPTED_EXIT_CODE", "CheckpointError", "CheckpointManager", "NonFiniteLossError", "Trainer",
           "load_checkpoint_file", "train"]


def __getattr__(name):
    if name in ("train", "Trainer", "NonFiniteLossError"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
