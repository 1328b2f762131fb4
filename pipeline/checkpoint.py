"""Checkpoints: the one module that reads and writes them, and the only one that calls `torch.load`.

Layout under ``<output_dir>/checkpoints/``::

    ckpt-E0003-S000120.pt          one file per checkpoint (torch.save of plain types + tensors)
    ckpt-E0003-S000120.pt.sha256   its digest, written before the rename that publishes the file
    ds/ckpt-E0003-S000120/         DeepSpeed's own directory (DeepSpeed engine only)
    latest                         the newest good checkpoint's name, replaced last

Every write goes to a temporary name in the same directory and is renamed into place, so a crash or
a full disk never leaves a partial file under a final name and never touches the previous checkpoint.
Loading verifies the digest and the format; a corrupt or partial newest checkpoint is reported and the
previous good one is used instead, for a resuming training and for evaluation and inference alike.

Contents (`format` "alignedreid-ckpt-v1"; plain types and tensors, so weights-only loading works):
`model` (fp32 state dict of the training module: one AlignedReID or a MutualPair), the backend's
`optimizer` (full, under both engines) / `scaler` (DDP), the training state's counters, epoch cuts,
world size changes, `rng` and `mlflow_run_id` (pipeline.engine.state), `config` (resolved config dict),
`num_classes`, `mutual`, `world_size`, `epoch_steps`, `engine`.

Reading, from the most to the least specific::

    load_weights(path)                 any weights-only torch file (digest checked when it has one)
    load_checkpoint_file(path)         one engine checkpoint file (digest and format checked)
    CheckpointManager(dir).load_latest()  newest usable checkpoint of a directory, falling back
    read_checkpoint(source)            a file, a checkpoints directory or a run directory

Rebuilding a network from a checkpoint is the model's concern: pipeline.model.model_from_checkpoint
(pipeline/model/restore.py) reads the file with read_checkpoint. This module never imports the model.

"The evaluated network" is the first network of a mutual pair, without DDP / DeepSpeed / compile
wrappers: `evaluated_network(module)` for a live module, `evaluated_state_dict(weights)` for a state
dict. Nothing else in the package knows that rule.
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
from torch import nn

from .fileio import atomic_write

FORMAT = "alignedreid-ckpt-v1"
_NAME_RE = re.compile(r"^ckpt-E(\d{4,})-S(\d{6,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no usable checkpoint could be read."""


def checkpoint_name(epoch: int, global_step: int) -> str:
    return f"ckpt-E{epoch:04d}-S{global_step:06d}.pt"


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------
def load_weights(path: str | Path, *, verify: bool = True) -> Any:
    """A torch file read with ``weights_only=True`` (plain types and tensors; no code runs) on the CPU.

    With `verify`, a ``<file>.sha256`` beside it (engine checkpoints have one) must match. Raises
    CheckpointError naming the file when it is missing, corrupt or holds pickled objects."""
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
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling/zip error means the file is unusable
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def load_checkpoint_file(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read one engine checkpoint; verify its digest and format."""
    state = load_weights(path, verify=verify)
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
        """The `latest` pointer's name when it names a file here, else the newest published name."""
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


def _checkpoint_folder(source: Path) -> Path | None:
    """The checkpoints folder meant by a checkpoints directory or a run directory (None: neither)."""
    for folder in (source, source / "checkpoints"):
        if CheckpointManager(folder).names() or (folder / "latest").is_file():
            return folder
    return None


def _not_found(source: Path) -> FileNotFoundError:
    return FileNotFoundError(f"no checkpoint at {source}: pass a ckpt-*.pt file, a checkpoints directory "
                             f"or a run directory containing checkpoints/")


def resolve_checkpoint(source: str | Path) -> Path:
    """A checkpoint file from a file path, a checkpoints directory or a run directory: the directory's
    `latest`, or its newest checkpoint when `latest` is missing or names no file (as the manager does;
    read_checkpoint also falls back past corrupt files)."""
    source = Path(source)
    if source.is_file():
        return source
    folder = _checkpoint_folder(source)
    name = CheckpointManager(folder).latest_name() if folder is not None else None
    if name is None:
        raise _not_found(source)
    return folder / name


def read_checkpoint(source: str | Path) -> tuple[Any, Path]:
    """(contents, file) of a checkpoint file, or of the newest usable checkpoint of a checkpoints or run
    directory (past corrupt ones, with a warning). A file need not be an engine checkpoint: a bare
    state dict is returned as it is."""
    source = Path(source)
    if source.is_file():
        return load_weights(source), source
    folder = _checkpoint_folder(source)
    found = CheckpointManager(folder).load_latest() if folder is not None else None
    if found is None:
        raise _not_found(source)
    return found[0], folder / found[1]


# --------------------------------------------------------------------------------------------------
# The evaluated network
# --------------------------------------------------------------------------------------------------
def evaluated_network(model: nn.Module) -> nn.Module:
    """The network evaluation, export and serving use: DDP / DeepSpeed (`.module`) and torch.compile
    (`._orig_mod`) wrappers stripped, and of a mutual pair (`.nets`) the first network."""
    net = model
    while True:
        nets = getattr(net, "nets", None)
        if isinstance(nets, nn.ModuleList) and len(nets):
            net = nets[0]
        elif isinstance(getattr(net, "module", None), nn.Module):
            net = net.module
        elif isinstance(getattr(net, "_orig_mod", None), nn.Module):
            net = net._orig_mod
        else:
            return net


def evaluated_state_dict(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """The evaluated network's part of a training module's state dict: DDP's `module.` prefix
    stripped, of a mutual pair (`nets.0.*`, `nets.1.*`) the first network. Also whether it was a pair."""
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    if any(k.startswith("nets.0.") for k in weights):
        return {k.removeprefix("nets.0."): v for k, v in weights.items() if k.startswith("nets.0.")}, True
    return weights, False


def cpu_fp32(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent CPU copies, floating-point tensors in float32 (what checkpoints and models hold)."""
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True)
            for k, v in weights.items()}
