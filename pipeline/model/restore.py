"""Rebuilding a trained network from a checkpoint: a model concern that reads the checkpoint format.

`model_from_checkpoint` reads with pipeline.checkpoint (the file format, digests, fallback past corrupt
files) and builds with `build_model`; pipeline.checkpoint never imports the model.
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import CheckpointError, evaluated_state_dict, read_checkpoint
from ..config import ConfigError, ModelConfig, config_from_dict
from .aligned import AlignedReID, build_model


def model_from_checkpoint(source: str | Path, model_cfg: ModelConfig | None = None,
                          num_classes: int | None = None) -> tuple[AlignedReID, dict]:
    """Rebuild the evaluated network from a checkpoint, in eval mode on the CPU.

    `source`: an engine checkpoint file (a dict with `model`, `config`, `num_classes`, `mutual`), a
    checkpoints or run directory (its newest usable checkpoint, see read_checkpoint), or a bare state
    dict file, which needs `model_cfg` and `num_classes`; given for a checkpoint, they override what it
    records. The digest is verified when the file has one. Pretrained weights are not reloaded.
    Returns (model, info): info has `path` (the file read), `num_classes`, `mutual`, `model_config`
    (dict), `image_size` ([H, W] the run trained at, or None) and `epoch` / `global_step` when recorded.
    Raises FileNotFoundError when there is no checkpoint, ValueError when it cannot be used."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no checkpoint at {source}: pass a ckpt-*.pt file from <output_dir>/checkpoints "
                                f"(or its folder, the run folder, or a bare state dict file)")
    try:
        state, path = read_checkpoint(source)
    except CheckpointError as exc:
        raise ValueError(f"{exc}; a checkpoint must be a dict of plain types and tensors as written by "
                         f"the engine (read with weights_only=True)") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    info: dict = {"path": str(path), "image_size": None}
    recorded_mutual = None
    if isinstance(state.get("model"), dict):
        weights = state["model"]
        config = state.get("config") or {}
        if model_cfg is None:
            section = config.get("model")
            if not isinstance(section, dict):
                raise ValueError(f"checkpoint {path} has no config.model section; pass model_cfg explicitly")
            try:
                model_cfg = config_from_dict({"model": section}, source=f"{path} (config)").model
            except ConfigError as exc:
                raise ValueError(f"checkpoint {path}: its model config is not valid here: {exc}") from None
        if num_classes is None:
            num_classes = state.get("num_classes")
        recorded_mutual = state.get("mutual")
        size = (config.get("data") or {}).get("image_size")
        info["image_size"] = [int(size[0]), int(size[1])] if size else None
        info.update({k: state[k] for k in ("epoch", "global_step") if k in state})
    else:
        weights = state
    if model_cfg is None or num_classes is None:
        raise ValueError(f"{path} is a bare state dict (no 'model'/'config'/'num_classes' keys); pass "
                         f"model_cfg and num_classes to rebuild the network")
    weights, is_pair = evaluated_state_dict(weights)
    model_cfg = ModelConfig(**{**model_cfg.__dict__, "pretrained": None})
    model = build_model(model_cfg, int(num_classes))
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    mismatched = [f"{k}: file {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(weights)) if own[k].shape != weights[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"checkpoint {path} does not match model {model_cfg.backbone} with {num_classes} "
                         f"classes: missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches "
                         f"{mismatched[:5]}. Pass the model_cfg / num_classes the network was trained with.")
    model.load_state_dict(weights)
    model.eval()
    info.update({"num_classes": int(num_classes),
                 "mutual": bool(is_pair if recorded_mutual is None else recorded_mutual),
                 "model_config": dict(model_cfg.__dict__)})
    return model, info
