"""Where a trained network comes from: an engine checkpoint, a logged model's files, or an MLflow URI.

`load_network(source)` is what FeatureExtractor calls. A logged model (written by
pipeline.serving.save_pyfunc_model, logged by Tracker.log_model) is read here, so that inference can
load one without importing the serving layer above it: `network_from_files` (weights.pt, config.yaml,
info.json), `network_from_model_dir` (a local copy: the directory with MLmodel), `network_from_uri`
(`runs:/`, `models:/`, or a plain artifact URI, downloaded with MLflow's public client). MLflow is
imported only for URIs.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from pipeline.config import ConfigError, ModelConfig, config_from_dict, resolve_tracking_uri
from pipeline.model import AlignedReID, model_from_checkpoint

FORMAT = "alignedreid-pyfunc-v1"      # info.json "format" of a logged model
MODEL_NAME = "model"               # the logged model's name: what runs:/<run_id>/model resolves to
WEIGHTS, CONFIG, INFO = "weights", "config", "info"          # pyfunc artifact names
FILES = {WEIGHTS: "weights.pt", CONFIG: "config.yaml", INFO: "info.json"}


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:/")      # scheme:/... (2+ letters: not a C:/ path)


def is_model_uri(source: str | Path) -> bool:
    """True for an MLflow URI (runs:/..., models:/..., mlflow-artifacts:/..., s3://...), not a path."""
    return isinstance(source, str) and bool(_URI.match(source))


def load_network(source: str | Path, tracking_uri: str | None = None
                 ) -> tuple[nn.Module, dict, tuple[int, int] | None]:
    """(network in eval mode on the CPU, info, trained image size or None) from `source`: an MLflow
    model URI (downloaded from `tracking_uri`, default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db),
    a local MLflow model directory (with MLmodel), or a checkpoint (a file, a checkpoints directory or a
    run directory: pipeline.model.model_from_checkpoint, read once)."""
    if is_model_uri(source):
        return network_from_uri(str(source), tracking_uri)
    if (Path(source) / "MLmodel").is_file():
        return network_from_model_dir(source)
    model, info = model_from_checkpoint(source)
    size = info["image_size"]
    return model, info, (tuple(size) if size else None)


# --------------------------------------------------------------------------------------------------
# A logged model: weights + config -> network
# --------------------------------------------------------------------------------------------------
def model_section(config: Any, where: str) -> tuple[ModelConfig, tuple[int, int]]:
    """The ModelConfig and (H, W) a logged model's config records; errors name `where`."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{where}: the config has no 'model' section; expected the training's resolved "
                         f"config (Config.to_dict())")
    size = (config.get("data") or {}).get("image_size") if isinstance(config.get("data"), dict) else None
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0
                                                                          for s in size)):
        raise ValueError(f"{where}: the config's data.image_size is {size!r}; expected [height, width]")
    try:
        model_cfg = config_from_dict({"model": config["model"]}, source=f"{where} (config)").model
    except ConfigError as exc:
        raise ValueError(f"{where}: the model config is not valid here: {exc}") from None
    return model_cfg, (int(size[0]), int(size[1]))


def network_from_files(weights: str | Path, config: str | Path, info: str | Path,
                       source: str | None = None) -> tuple[AlignedReID, dict, tuple[int, int]]:
    """Rebuild the network (eval mode, CPU) from the three files of a logged model.

    Returns (model, info, image_size): info is info.json's content plus `path` (= `source`), `mutual`
    (False: only the evaluated network is logged) and `model_config`, like model_from_checkpoint's."""
    where = source or str(Path(weights).parent)
    try:
        meta = json.loads(Path(info).read_text())
        cfg = yaml.safe_load(Path(config).read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{where}: cannot read the model's info/config file: {exc}") from None
    found = meta.get("format") if isinstance(meta, dict) else meta
    if found != FORMAT:
        raise ValueError(f"{where}: {Path(info).name} says format {found!r}; expected {FORMAT!r}")
    model_cfg, image_size = model_section(cfg, where)
    num_classes = meta.get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{where}: {Path(info).name} has num_classes {num_classes!r}; expected an "
                         f"integer >= 1")
    try:
        model, details = model_from_checkpoint(weights, model_cfg, num_classes)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    details.update(meta, path=where, mutual=False, image_size=list(image_size))
    return model, details, image_size


def _artifact_files(model_dir: Path, source: str) -> dict[str, Path]:
    """The weights/config/info files of a saved pyfunc model, from its MLmodel."""
    mlmodel = model_dir / "MLmodel"
    try:
        meta = yaml.safe_load(mlmodel.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{source}: cannot read {mlmodel}: {exc}") from None
    listed = (((meta or {}).get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    missing = [name for name in FILES if not isinstance(listed.get(name), dict)]
    if missing:
        flavors = sorted((meta or {}).get("flavors") or {})
        raise ValueError(f"{source}: this MLflow model lacks the {missing} artifact(s) (flavors {flavors}, "
                         f"pyfunc artifacts {sorted(listed)}); it was not logged by "
                         f"pipeline.tracking.Tracker.log_model (models pickled with mlflow.pytorch by "
                         f"earlier versions cannot be read: unpickling runs code)")
    files = {}
    for name in FILES:
        path = model_dir / listed[name]["path"]
        if not path.is_file():
            raise FileNotFoundError(f"{source}: the model's {name} file {listed[name]['path']} is missing "
                                    f"from {model_dir}")
        files[name] = path
    return files


def network_from_model_dir(model_dir: str | Path, source: str | None = None
                           ) -> tuple[AlignedReID, dict, tuple[int, int]]:
    """Rebuild the network from a local copy of a logged model (the directory with MLmodel)."""
    model_dir = Path(model_dir)
    files = _artifact_files(model_dir, source or str(model_dir))
    return network_from_files(files[WEIGHTS], files[CONFIG], files[INFO], source or str(model_dir))


def _join(location: str, rest: str | None) -> str:
    return f"{location.rstrip('/')}/{rest}" if rest else location


def locate_model(uri: str, client) -> str:
    """The plain artifact URI (file://..., mlflow-artifacts:/..., s3://...) of the model that `uri`
    names, resolved with `client` (an MlflowClient for the store to ask).

    runs:/<run_id>/<name>[/sub] is the logged model called <name> whose source run is <run_id> (the
    newest, as MLflow 3 resolves it), else the run's own artifacts at that path; models:/NAME/VERSION,
    models:/NAME@alias and models:/<model_id> come from the registry / logged model. Done here
    because MLflow 3.17 resolves runs:/ logged models and models:/ URIs through the process-wide
    tracking URI whatever tracking_uri its download functions are given (and so can silently create
    ./mlflow.db). The URIs are parsed here too: MLflow's parsers are private modules."""
    scheme, _, path = uri.partition(":/")
    path = path.lstrip("/")
    if scheme == "runs":
        run_id, _, path = path.partition("/")
        run = client.get_run(run_id)
        name, _, rest = path.partition("/")
        token = None
        while name:
            page = client.search_logged_models([run.info.experiment_id], filter_string=f"name = '{name}'",
                                               page_token=token)
            for model in page:
                if model.source_run_id == run_id:
                    return _join(model.artifact_location, rest)
            if not page.token:
                break
            token = page.token
        return _join(run.info.artifact_uri, path)
    if scheme == "models":
        return _locate_registered(path, client)
    return uri


_STAGES = ("none", "staging", "production", "archived")


def _locate_registered(path: str, client) -> str:
    """models:/<model_id>[/sub], models:/NAME@ALIAS[/sub], models:/NAME/VERSION|latest|STAGE[/sub]."""
    parts = path.split("/")
    first, second = parts[0], (parts[1] if len(parts) > 1 else None)
    if "@" in first:
        name, _, alias = first.partition("@")
        version = client.get_model_version_by_alias(name, alias).version
        return _join(client.get_model_version_download_uri(name, version), "/".join(parts[1:]))
    names_a_version = second is not None and (second.isdigit() or second.lower() in ("latest", *_STAGES))
    if not names_a_version:   # a logged model's id (m-...)
        return _join(client.get_logged_model(first).artifact_location, "/".join(parts[1:]))
    if second.isdigit():
        version = second
    elif second.lower() == "latest":
        versions = client.search_model_versions(f"name = '{first}'")
        if not versions:
            raise FileNotFoundError(f"models:/{path}: the registered model {first!r} has no version")
        version = str(max(int(v.version) for v in versions))
    else:
        found = client.get_latest_versions(first, [second])
        if not found:
            raise FileNotFoundError(f"models:/{path}: no version of {first!r} in stage {second!r}")
        version = found[0].version
    return _join(client.get_model_version_download_uri(first, version), "/".join(parts[2:]))


def network_from_uri(uri: str, tracking_uri: str | None = None) -> tuple[AlignedReID, dict, tuple[int, int]]:
    """Download a logged model (`runs:/<run_id>/model`, `models:/NAME/VERSION`, `models:/NAME@alias`,
    `models:/<model_id>`, or a plain artifact URI) to a temporary directory and rebuild the network.

    tracking_uri: the store to ask; default tracking.uri's rule ($MLFLOW_TRACKING_URI, else
    sqlite:///mlflow.db). The model registry is $MLFLOW_REGISTRY_URI, else the same store."""
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking_uri = resolve_tracking_uri(tracking_uri)
    registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    with tempfile.TemporaryDirectory(prefix="alignedreid-model-") as tmp:
        try:
            location = locate_model(uri, client)
            local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp,
                                                        tracking_uri=tracking_uri)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise FileNotFoundError(f"{uri}: no such model in MLflow at {tracking_uri} "
                                        f"({exc.message})") from None
            raise
        if not (Path(local) / "MLmodel").is_file():
            raise FileNotFoundError(f"{uri}: what MLflow at {tracking_uri} holds there is not an MLflow "
                                    f"model (no MLmodel file); log one with Tracker.log_model")
        return network_from_model_dir(local, source=uri)
