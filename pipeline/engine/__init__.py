"""Training engine: the loop (DDP or DeepSpeed), checkpoints, LR schedules, preemption handling."""
from .checkpoint import CheckpointError, CheckpointManager, load_checkpoint_file
from .trainer import PREEMPTED_EXIT_CODE, NonFiniteLossError, Trainer, train

__all__ = ["PREEMPTED_EXIT_CODE", "CheckpointError", "CheckpointManager", "NonFiniteLossError", "Trainer",
           "load_checkpoint_file", "train"]
