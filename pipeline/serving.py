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

`predict` returns exactly what `pipeline.inference.FeatureExtractor` returns for the same images (it
converts them with the same function, pipeline.inference.images.image_batch, so the PythonModel takes
every form the extractor takes; the signature admits the uint8 batch): antialiased bilinear resize
to the trained `data.image_size`, ImageNet normalisation, the eval-mode global feature after the BN
neck, L2-normalised. The load-time `model_config` may set
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

from pipeline.checkpoint import cpu_fp32, evaluated_network
from pipeline.inference import FeatureExtractor
# The logged model's format is read in pipeline.inference.sources (inference loads logged models without
# importing this module); these names stay importable from here.
from pipeline.inference.sources import (CONFIG, FILES, FORMAT, INFO, MODEL_NAME, WEIGHTS, locate_model,  # noqa: F401
                                        model_section, network_from_files, network_from_model_dir,
                                        network_from_uri)

_PACKAGE_DIR = Path(__file__).resolve().parent
_ENTRY_POINT = _PACKAGE_DIR / "serving_model.py"
_EXAMPLE_DOWNSCALE = 8             # the input example is the trained size / 8: small, and it shows
                                   # that any size is accepted


def eval_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the network that evaluation uses, ready to log: wrappers stripped and the
    first network of a MutualPair (pipeline.checkpoint.evaluated_network), every tensor a CPU copy,
    floating-point ones in fp32 (so the copy is independent of training and of its mixed precision)."""
    return cpu_fp32(evaluated_network(model).state_dict())


def pip_requirements() -> list[str]:
    """What the logged model needs to load: torch pinned to this version (without a local tag such as
    +cpu, which PyPI does not have), the config and image libraries, and tqdm, which `pipeline.data`
    (imported for the shared preprocessing) imports at package import."""
    return [f"torch=={torch.__version__.split('+')[0]}", "pyyaml", "numpy", "pillow", "tqdm"]


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
    model_section(config, "save_pyfunc_model")
    plain = {k: v.detach().to(device="cpu", dtype=torch.float32 if v.is_floating_point() else v.dtype)
             .contiguous().clone() for k, v in weights.items()}
    with tempfile.TemporaryDirectory(prefix="alignedreid-pyfunc-") as tmp:
        files = {name: Path(tmp) / filename for name, filename in FILES.items()}
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
    """uint8 RGB images [N, H, W, 3] (numpy, any H and W) -> float32 L2-normalised features [N, D];
    called directly, any form pipeline.inference.images.image_batch takes.

    Holds nothing until load_context, which rebuilds the network from the weights-only file (MLflow
    creates this object from serving_model.py, never by unpickling)."""

    def __init__(self):
        self.extractor = None

    def load_context(self, context) -> None:
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
        # The one conversion FeatureExtractor uses (pipeline.inference.images.image_batch): uint8
        # [N, H, W, 3] as the signature says, and every other form the extractor takes.
        if isinstance(model_input, np.ndarray) and model_input.ndim == 4 and model_input.shape[0] == 0:
            return np.zeros((0, self.extractor.info["feature_dim"]), dtype=np.float32)
        return self.extractor(model_input).numpy()
