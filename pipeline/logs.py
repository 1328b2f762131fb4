"""Logging, configured once per process by the command-line entry points (pipeline/cli).

    setup_logging()            # rank from the launcher's environment, INFO on rank 0
    log = logging.getLogger(__name__)

Lines go to stderr as ``[rank R] LEVEL logger: message``. The main rank shows this package's INFO
lines (e.g. the pretrained-weights report); the other ranks only warnings, so that N processes do not
repeat every line N times. Other libraries' loggers stay at WARNING. Library code never configures
logging; only entry points call this.
"""
from __future__ import annotations

import logging
import sys

from .distributed import launch_rank


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is at the time of the call (pytest, redirection)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(rank: int | None = None, level: str | int = "INFO") -> None:
    """Send log records to stderr with a rank prefix. `level` applies to this package's loggers on the
    main rank; other ranks log warnings and worse. Idempotent: a second call replaces the first."""
    rank = launch_rank() if rank is None else rank
    level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(level if rank == 0 else max(level, logging.WARNING))
