"""Inference: turn images into re-ID features with a trained network, and export the network to ONNX.

    extractor = FeatureExtractor("outputs/run/checkpoints")       # a file, a checkpoints dir or a run dir
    extractor = FeatureExtractor("runs:/<run_id>/model")          # or models:/NAME/VERSION (MLflow)
    feats = extractor(["a.jpg", "b.jpg"])                        # [2, D], L2-normalised
    similarity = feats @ feats.T                                 # cosine similarity

The network comes from an engine checkpoint, or from a model that `Tracker.log_model` logged to
MLflow (an MLflow URI, or a local copy of the model: a directory with an MLmodel file; see
pipeline.serving). MLflow is imported only for those, so this module stays light for checkpoints.

Preprocessing is the evaluation's: RGB, bilinear resize to the training image size, ImageNet
normalisation. The features are the eval-mode global features (after the BN neck),
L2-normalised, so Euclidean distance and cosine similarity rank the same way.

ONNX: the exported graph takes the preprocessed batch `images` [N, 3, H, W] (float32, normalised) and
returns `features` [N, D] (L2-normalised), with a dynamic batch axis. It uses the torch.export-based
exporter (``dynamo=True``, the default since torch 2.9; it needs onnxscript): the older TorchScript
exporter also works for this network and is about 4x faster, but torch 2.13 deprecates it.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.data.images import decode
from pipeline.data.transforms import normalize, resize
from pipeline.fileio import atomic_path
from pipeline.checkpoint import model_from_checkpoint, resolve_checkpoint  # noqa: F401 (resolve_checkpoint: public here too)

ImageInput = str | Path | Image.Image | torch.Tensor | np.ndarray
DEFAULT_IMAGE_SIZE = (256, 128)


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:/")      # scheme:/... (2+ letters: not a C:/ path)


def is_model_uri(source: str | Path) -> bool:
    """True for an MLflow URI (runs:/..., models:/..., mlflow-artifacts:/..., s3://...), not a path."""
    return isinstance(source, str) and bool(_URI.match(source))


def load_network(source: str | Path, tracking_uri: str | None = None
                 ) -> tuple[nn.Module, dict, tuple[int, int] | None]:
    """(network in eval mode on the CPU, info, trained image size or None) from `source`: an MLflow
    model URI (downloaded from `tracking_uri`, default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db),
    a local MLflow model directory (with MLmodel), or a checkpoint (a file, a checkpoints directory or a
    run directory: pipeline.checkpoint.model_from_checkpoint, read once)."""
    if is_model_uri(source):
        from pipeline.serving import network_from_uri
        return network_from_uri(str(source), tracking_uri)
    if (Path(source) / "MLmodel").is_file():
        from pipeline.serving import network_from_model_dir
        return network_from_model_dir(source)
    model, info = model_from_checkpoint(source)
    size = info["image_size"]
    return model, info, (tuple(size) if size else None)


class Embedder(nn.Module):
    """The network's eval forward followed by L2 normalisation: what inference and ONNX compute."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(images), dim=1)


def _to_chw(item: ImageInput, size: tuple[int, int], where: str) -> torch.Tensor:
    """One image -> [3, H, W]: uint8 for files and PIL images, float in [0, 1] for tensors."""
    if isinstance(item, (str, Path)):
        try:
            data = Path(item).read_bytes()
            return torch.from_numpy(decode(data, size).copy()).permute(2, 0, 1)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where}: cannot read image {item}: {exc}") from None
    if isinstance(item, Image.Image):
        im = item.convert("RGB")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"{where}: expected a path, PIL image or tensor, got {type(item).__name__}")
    if item.dim() != 3 or item.shape[0] != 3:
        raise ValueError(f"{where}: a tensor image must be [3, H, W], got {tuple(item.shape)}")
    if item.dtype == torch.uint8:
        x = item.float().div_(255.0)
    elif item.dtype.is_floating_point:
        if float(item.min()) < 0.0 or float(item.max()) > 1.0:
            raise ValueError(f"{where}: float tensors must hold values in [0, 1] (got "
                             f"{float(item.min()):.3g}..{float(item.max()):.3g}); pass uint8 for "
                             f"0..255")
        x = item.float()
    else:
        raise ValueError(f"{where}: tensor dtype {item.dtype}; use uint8 or float in [0, 1]")
    return resize(x[None], size)[0]


class FeatureExtractor:
    """`FeatureExtractor(checkpoint, device="cpu")(images) -> [N, D]` L2-normalised features.

    checkpoint: an engine checkpoint file (or a checkpoints/run directory, see resolve_checkpoint), an
    MLflow model URI of a model logged by Tracker.log_model (`runs:/<run_id>/model`,
    `models:/NAME/VERSION`; downloaded from `tracking_uri`, default $MLFLOW_TRACKING_URI or
    sqlite:///mlflow.db), or a local copy of such a model (a directory with an MLmodel file).
    images: one or a list of image paths, PIL images, or tensors [3, H, W]; or a batch tensor
    [N, 3, H, W]. Tensors are uint8 in [0, 255] or float in [0, 1] (not yet normalised), any size.
    Image files go through exactly the evaluation's decoder (pipeline.data.images.decode: PIL's
    pixels, bilinear resize), so a file's features equal those `evaluate` computes for it from the shards;
    PIL images get the same resize, tensors an antialiased bilinear one.
    image_size: defaults to the size the network was trained at."""

    def __init__(self, checkpoint: str | Path, device: str | torch.device = "cpu",
                 image_size: Sequence[int] | None = None, batch_size: int = 64, *,
                 tracking_uri: str | None = None):
        model, info, recorded = load_network(checkpoint, tracking_uri)
        # the resolved checkpoint file or model directory; an MLflow URI as given
        self.checkpoint = checkpoint if is_model_uri(checkpoint) else Path(info["path"])
        if image_size is None and recorded is None:
            warnings.warn(f"{self.checkpoint} records no data.image_size; using {DEFAULT_IMAGE_SIZE}",
                          stacklevel=2)
        self._setup(model, info, image_size or recorded or DEFAULT_IMAGE_SIZE, device, batch_size)

    @classmethod
    def from_network(cls, model: nn.Module, info: dict, image_size: Sequence[int],
                     device: str | torch.device = "cpu", batch_size: int = 64) -> FeatureExtractor:
        """An extractor around an already built network (eval forward -> [N, D]); pipeline.serving
        uses it so that a served model computes exactly what this class computes."""
        extractor = cls.__new__(cls)
        extractor.checkpoint = info.get("path")
        extractor._setup(model, info, image_size, device, batch_size)
        return extractor

    def _setup(self, model: nn.Module, info: dict, image_size: Sequence[int],
               device: str | torch.device, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}; must be >= 1")
        self.info = info
        self.device = torch.device(device)
        self.model = Embedder(model).to(self.device).eval()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.batch_size = batch_size

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Images -> the normalised float batch [N, 3, H, W] the network (and the ONNX graph) takes."""
        if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
            items = list(torch.as_tensor(images).unbind(0))
        elif isinstance(images, (str, Path, Image.Image, torch.Tensor, np.ndarray)):
            items = [images]
        else:
            items = list(images)
        if not items:
            raise ValueError("no images given")
        return torch.cat([normalize(_to_chw(item, self.image_size, f"image {i}")[None])
                          for i, item in enumerate(items)])

    @torch.no_grad()
    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        batch = self.preprocess(images)
        out = [self.model(batch[s:s + self.batch_size].to(self.device)).float().cpu()
               for s in range(0, batch.shape[0], self.batch_size)]
        return torch.cat(out)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's notes that do not concern this network (no torchvision ops in it; a
    deprecation inside torch.export), so a real warning stays visible."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def export_onnx(checkpoint: str | Path, out: str | Path, image_size: Sequence[int] | None = None,
                opset: int | None = None) -> Path:
    """Write the inference network (preprocessed images -> L2-normalised features, dynamic batch) as
    ONNX to `out`, atomically. image_size defaults to the checkpoint's training size, opset to the
    exporter's default. The weights are embedded, so the file stands alone (the exporter would
    otherwise write them beside it, under the temporary name)."""
    extractor = FeatureExtractor(checkpoint, image_size=image_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, *extractor.image_size)
    with atomic_path(out) as tmp:
        with torch.no_grad(), _quiet_exporter():
            torch.onnx.export(extractor.model, (example,), str(tmp), input_names=["images"],
                              output_names=["features"], opset_version=opset, dynamo=True,
                              dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                              external_data=False, verbose=False)
    return out
