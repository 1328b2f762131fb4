"""Run tags that say where and with what a training ran: library versions, host, git commit."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment_tags() -> dict[str, str]:
    """torch / CUDA / Python versions, host, and the git commit of this code when it is a checkout."""
    import torch

    tags = {
        "torch.version": torch.__version__,
        "cuda.version": torch.version.cuda or "none",
        "python.version": platform.python_version(),
        "host": platform.node(),
        "mlflow.source.name": sys.argv[0] if sys.argv and sys.argv[0] else "python",
    }
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        tags["git.dirty"] = "unknown" if dirty is None else str(bool(dirty)).lower()
    return tags
