"""The trained network as an MLflow model that loads anywhere and serves: weights and code, no pickles.

`Tracker.log_model` saves the evaluated network with `save_pyfunc_model`; the result is an MLflow
pyfunc model in the "models from code" form::

    model/
      MLmodel                 pyfunc flavor; signature: uint8 images [-1, -1, -1, 3] -> float32 [-1, D]
      serving_model.py        run by MLflow at load time to get the PythonModel (models from code)
      code/pipeline/...       this package (code_paths), so the model loads where it is not installed
      artifacts/weights.pt    state dict of the evaluated network, fp32 tensors only (torch.save; read
                              back with torch.load(weights_only=True))
      artifacts/config.yaml   the training's resolved config (read with yaml.safe_load)
      artifacts/info.json     format, num_classes, feature_dim, image_size, backbone
      requirements.txt  python_env.yaml  conda.yaml  input_example.json  serving_input_example.json

Why not `mlflow.pytorch` with a pickled module: pickling the live module fails for a DeepSpeed engine
(its process groups cannot be pickled), unpickling runs arbitrary code, and the file breaks when
class layouts change; MLflow 3.17 itself refuses to unpickle a pyfunc model unless
MLFLOW_ALLOW_PICKLE_DESERIALIZATION is set. Here the network is rebuilt by `build_model` from the
recorded config and loaded from a weights-only file, so loading a model runs only this package's code.

Use::

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")      # or models:/NAME/VERSION
    features = model.predict(images)          # uint8 [N, H, W, 3] RGB, any H, W -> float32 [N, D]
    FeatureExtractor(f"runs:/{run_id}/model")  # the same network as a pipeline.inference extractor
    mlflow models serve -m runs:/RUN_ID/model --env-manager local   # POST {"inputs": images} to /invocations

`predict` returns exactly what `pipeline.inference.FeatureExtractor` returns for the same uint8
tensors: antialiased bilinear resize to the trained `data.image_size`, ImageNet normalisation, the
eval-mode global feature after the BN neck, L2-normalised. The load-time `model_config` may set
`device` (default "cpu") and `batch_size` (default 64).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
import yaml
from torch import nn

from pipeline.config import ConfigError, config_from_dict
from pipeline.model import AlignedReID, MutualPair, model_from_checkpoint

FORMAT = "alignedreid-pyfunc-v1"
MODEL_NAME = "model"               # the logged model's name: what runs:/<run_id>/model resolves to
WEIGHTS, CONFIG, INFO = "weights", "config", "info"          # pyfunc artifact names
_FILES = {WEIGHTS: "weights.pt", CONFIG: "config.yaml", INFO: "info.json"}
_PACKAGE_DIR = Path(__file__).resolve().parent
_ENTRY_POINT = _PACKAGE_DIR / "serving_model.py"
_EXAMPLE_DOWNSCALE = 8             # the input example is the trained size / 8: small, and it shows
                                   # that any size is accepted


def eval_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the network that evaluation uses, ready to log: DDP / DeepSpeed (`.module`)
    and torch.compile (`._orig_mod`) wrappers stripped, the first network of a MutualPair, every
    tensor a CPU copy, floating-point ones in fp32 (so the copy is independent of training and of its
    mixed precision)."""
    net = model
    while True:
        if isinstance(net, MutualPair):
            net = net.nets[0]
        elif isinstance(getattr(net, "module", None), nn.Module):
            net = net.module
        elif isinstance(getattr(net, "_orig_mod", None), nn.Module):
            net = net._orig_mod
        else:
            break
    return {k: v.detach().to(device="cpu", dtype=torch.float32 if v.is_floating_point() else v.dtype,
                             copy=True)
            for k, v in net.state_dict().items()}


def pip_requirements() -> list[str]:
    """What the logged model needs to load: torch pinned to this version (without a local tag such as
    +cpu, which PyPI does not have), the config and image libraries, and tqdm, which `pipeline.data`
    (imported for the shared preprocessing) imports at package import."""
    return [f"torch=={torch.__version__.split('+')[0]}", "pyyaml", "numpy", "pillow", "tqdm"]


# --------------------------------------------------------------------------------------------------
# Reading: weights + config -> network
# --------------------------------------------------------------------------------------------------
def _model_section(config: Any, where: str):
    """The ModelConfig and (H, W) the config records; errors name `where`."""
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
    model_cfg, image_size = _model_section(cfg, where)
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
    missing = [name for name in _FILES if not isinstance(listed.get(name), dict)]
    if missing:
        flavors = sorted(((meta or {}).get("flavors") or {}))
        raise ValueError(f"{source}: this MLflow model lacks the {missing} artifact(s) (flavors {flavors}, "
                         f"pyfunc artifacts {sorted(listed)}); it was not logged by "
                         f"pipeline.tracking.Tracker.log_model (models pickled with mlflow.pytorch by "
                         f"earlier versions cannot be read: unpickling runs code)")
    files = {}
    for name in _FILES:
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
    ./mlflow.db)."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    if RunsArtifactRepository.is_runs_uri(uri):
        run_id, path = RunsArtifactRepository.parse_runs_uri(uri)
        run = client.get_run(run_id)
        name, _, rest = (path or "").partition("/")
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
    if ModelsArtifactRepository.is_models_uri(uri):
        base, rest = ModelsArtifactRepository.split_models_uri(uri)
        found = get_model_name_and_version(client, base)
        location = (client.get_logged_model(found[0]).artifact_location if len(found) == 1
                    else client.get_model_version_download_uri(*found))
        return _join(location, rest)
    return uri


def network_from_uri(uri: str, tracking_uri: str | None = None) -> tuple[AlignedReID, dict, tuple[int, int]]:
    """Download a logged model (`runs:/<run_id>/model`, `models:/NAME/VERSION`, `models:/NAME@alias`,
    `models:/<model_id>`, or a plain artifact URI) to a temporary directory and rebuild the network.

    tracking_uri: the store to ask; default tracking.uri's rule ($MLFLOW_TRACKING_URI, else
    sqlite:///mlflow.db). The model registry is $MLFLOW_REGISTRY_URI, else the same store."""
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import resolve_tracking_uri

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


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_progress_bars():
    """MLflow draws a progress bar for every artifact it copies; at the end of a training they are
    noise in the log. The switch is an environment variable, restored afterwards."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def save_pyfunc_model(path: str | Path, weights: dict[str, torch.Tensor], config: dict,
                      num_classes: int) -> dict[str, Any]:
    """Save the network as an MLflow pyfunc model directory at `path` (which must not exist or be empty).

    weights: state dict of the single evaluated network (see eval_state_dict); config: the training's
    resolved config (Config.to_dict()); num_classes: the identity classifier's size. The files are
    checked by rebuilding the network from them before MLflow writes anything, so a model that would
    not load is an error here (naming the mismatch), not at serving time. Returns what info.json
    records: format, num_classes, feature_dim, image_size, backbone."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    path = Path(path)
    if not isinstance(weights, dict) or not weights or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise TypeError("save_pyfunc_model: weights must be a non-empty state dict {name: tensor} of one "
                        "network (pipeline.serving.eval_state_dict(model)), not a module")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"save_pyfunc_model: num_classes is {num_classes!r}; expected an integer >= 1")
    _model_section(config, "save_pyfunc_model")
    plain = {k: v.detach().to(device="cpu", dtype=torch.float32 if v.is_floating_point() else v.dtype)
             .contiguous().clone() for k, v in weights.items()}
    with tempfile.TemporaryDirectory(prefix="alignedreid-pyfunc-") as tmp:
        files = {name: Path(tmp) / filename for name, filename in _FILES.items()}
        torch.save(plain, files[WEIGHTS])
        try:
            files[CONFIG].write_text(yaml.safe_dump(config, sort_keys=False))
        except yaml.YAMLError as exc:
            raise ValueError(f"save_pyfunc_model: the config is not plain YAML data ({exc})") from None
        info = {"format": FORMAT, "num_classes": num_classes}
        files[INFO].write_text(json.dumps(info))
        # Rebuild from the files exactly as load_context will: proves they load, and gives D.
        model, _, image_size = network_from_files(files[WEIGHTS], files[CONFIG], files[INFO],
                                                  source="save_pyfunc_model")
        feature_dim = int(model.feat_dim)
        info.update(feature_dim=feature_dim, image_size=list(image_size), backbone=model.backbone.name)
        files[INFO].write_text(json.dumps(info, indent=2) + "\n")
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, feature_dim))]))
        example = np.zeros((1, max(1, image_size[0] // _EXAMPLE_DOWNSCALE),
                            max(1, image_size[1] // _EXAMPLE_DOWNSCALE), 3), dtype=np.uint8)
        with _no_progress_bars():    # MLflow "downloads" the three local files into the model
            mlflow.pyfunc.save_model(
                path, python_model=str(_ENTRY_POINT),
                artifacts={name: str(file) for name, file in files.items()},
                code_paths=[str(_PACKAGE_DIR)], signature=signature, input_example=example,
                pip_requirements=pip_requirements())
    # Compiled bytecode is neither needed nor wanted in the model (the importer writes it when MLflow
    # runs the entry point): MLflow's own log_model removes it too.
    for cache in list(path.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    return info


# --------------------------------------------------------------------------------------------------
# The PythonModel
# --------------------------------------------------------------------------------------------------
class ReIDEmbeddingModel(mlflow.pyfunc.PythonModel):
    """uint8 RGB images [N, H, W, 3] (numpy, any H and W) -> float32 L2-normalised features [N, D].

    Holds nothing until load_context, which rebuilds the network from the weights-only file (MLflow
    creates this object from serving_model.py, never by unpickling)."""

    def __init__(self):
        self.extractor = None

    def load_context(self, context) -> None:
        from pipeline.inference import FeatureExtractor

        settings = dict(context.model_config or {})
        model, info, image_size = network_from_files(context.artifacts[WEIGHTS], context.artifacts[CONFIG],
                                                     context.artifacts[INFO])
        self.extractor = FeatureExtractor.from_network(model, info, image_size,
                                                       device=settings.get("device", "cpu"),
                                                       batch_size=int(settings.get("batch_size", 64)))

    # The np.ndarray hint tells MLflow that the signature is given, not to be inferred from hints
    # (without a hint it warns at class creation, i.e. whenever this module is imported).
    def predict(self, context, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> np.ndarray:
        if self.extractor is None:
            raise RuntimeError("ReIDEmbeddingModel.predict before load_context: load the model with "
                               "mlflow.pyfunc.load_model")
        images = np.asarray(model_input)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected RGB images as an array [N, H, W, 3], got shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixel values (0..255), got dtype {images.dtype}")
        if images.shape[0] == 0:
            return np.zeros((0, self.extractor.info["feature_dim"]), dtype=np.float32)
        batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        return self.extractor(batch).numpy()
