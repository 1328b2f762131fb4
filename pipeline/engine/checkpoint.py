"""Checkpoints that survive faults.

Layout under ``<output_dir>/checkpoints/``::

    ckpt-E0003-S000120.pt          one file per checkpoint (torch.save of plain types + tensors)
    ckpt-E0003-S000120.pt.sha256   its digest, written before the rename that publishes the file
    ds/ckpt-E0003-S000120/         DeepSpeed's own directory (DeepSpeed engine only)
    latest                         the newest good checkpoint's name, replaced last

Every write goes to a temporary name in the same directory and is renamed into place, so a crash or
a full disk never leaves a partial file under a final name and never touches the previous checkpoint.
Loading verifies the digest and the format; a corrupt or partial newest checkpoint is reported and the
previous good one is used instead.
"""
from __future__ import annotations

import hashlib
import io
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write

FORMAT = "alignedreid-ckpt-v1"
_NAME_RE = re.compile(r"^ckpt-E(\d{4,})-S(\d{6,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no usable checkpoint could be read."""


def checkpoint_name(epoch: int, global_step: int) -> str:
    return f"ckpt-E{epoch:04d}-S{global_step:06d}.pt"


def load_checkpoint_file(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read one checkpoint with ``weights_only=True``; verify its digest and format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    digest_file = path.with_name(path.name + ".sha256")
    if verify and digest_file.is_file():
        expected = digest_file.read_text().strip()
        actual = hashlib.sha256(data).hexdigest()
        if expected != actual:
            raise CheckpointError(f"{path}: sha256 mismatch (file {actual[:12]}…, recorded "
                                  f"{expected[:12]}…): the file is corrupt or partial")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling/zip error means the file is unusable
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint")
    return state


class CheckpointManager:
    """Atomic save, rotation (keep the last K), a `latest` pointer, and fallback on corruption."""

    def __init__(self, directory: str | Path, keep_last: int = 3):
        self.dir = Path(directory)
        self.keep_last = keep_last

    # ----------------------------------------------------------------------------------- listing
    def names(self) -> list[str]:
        """Published checkpoint names, oldest first (by global step, then epoch)."""
        if not self.dir.is_dir():
            return []
        found = []
        for entry in self.dir.iterdir():
            m = _NAME_RE.match(entry.name)
            if m:
                found.append((int(m.group(2)), int(m.group(1)), entry.name))
        return [name for *_, name in sorted(found)]

    def latest_name(self) -> str | None:
        pointer = self.dir / "latest"
        if pointer.is_file():
            name = pointer.read_text().strip()
            if _NAME_RE.match(name) and (self.dir / name).is_file():
                return name
        names = self.names()
        return names[-1] if names else None

    def ds_dir(self) -> Path:
        return self.dir / "ds"

    # ----------------------------------------------------------------------------------- saving
    def save(self, state: dict[str, Any], name: str) -> Path:
        """Write `state` as `name` atomically, then move `latest`, then prune old checkpoints.

        Raises CheckpointError (naming the surviving previous checkpoint) when the write fails, e.g.
        on a full disk."""
        self.dir.mkdir(parents=True, exist_ok=True)
        state = dict(state, format=FORMAT)
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        path = self.dir / name
        previous = self.latest_name()
        try:
            atomic_write(path.with_name(name + ".sha256"), hashlib.sha256(data).hexdigest(), fsync=True)
            atomic_write(path, data, fsync=True)
            atomic_write(self.dir / "latest", name, fsync=True)
        except OSError as exc:
            survivor = f"the previous checkpoint {self.dir / previous} is intact" if previous \
                else "no earlier checkpoint exists"
            raise CheckpointError(f"could not write checkpoint {path} ({exc.strerror or exc}); "
                                  f"{survivor}. Free disk space or change output_dir.") from exc
        self.prune()
        return path

    def prune(self) -> None:
        names = self.names()
        for old in names[:-self.keep_last]:
            (self.dir / old).unlink(missing_ok=True)
            (self.dir / (old + ".sha256")).unlink(missing_ok=True)
            shutil.rmtree(self.ds_dir() / old.removesuffix(".pt"), ignore_errors=True)

    # ----------------------------------------------------------------------------------- loading
    def load_latest(self) -> tuple[dict[str, Any], str] | None:
        """Newest usable checkpoint as (state, name), falling back past corrupt ones with a warning.

        None when there is no checkpoint at all; CheckpointError when every one is unusable."""
        names = self.names()
        if not names:
            return None
        latest = self.latest_name()
        order = ([latest] if latest else []) + [n for n in reversed(names) if n != latest]
        errors = []
        for name in order:
            try:
                state = load_checkpoint_file(self.dir / name)
            except CheckpointError as exc:
                warnings.warn(f"skipping unusable checkpoint: {exc}; trying the previous one", stacklevel=2)
                errors.append(str(exc))
                continue
            return state, name
        raise CheckpointError("no usable checkpoint in " + str(self.dir) + ":\n  " + "\n  ".join(errors))
