"""The shipped recipes (one YAML per dataset, the DeepSpeed variant, the demo and the test recipe),
installed with the package; `configs/` in a source checkout is this folder. `--config NAME` (and
pipeline.config.load_config) accept a recipe's name as well as a path."""
from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def names() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def path(name: str) -> Path | None:
    """The recipe called `name` (with or without .yaml), or None."""
    candidate = FOLDER / (name if name.endswith(".yaml") else f"{name}.yaml")
    return candidate if "/" not in name and candidate.is_file() else None
