"""FeatureExtractor: images -> L2-normalised re-ID features with a trained network.

Preprocessing is the evaluation's (pipeline.inference.images.image_batch: RGB, bilinear resize to the
training image size, ImageNet normalisation). The features are the eval-mode global features (after
the BN neck), L2-normalised, so Euclidean distance and cosine similarity rank the same way.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .images import ImageInput, image_batch
from .sources import is_model_uri, load_network

DEFAULT_IMAGE_SIZE = (256, 128)


class Embedder(nn.Module):
    """The network's eval forward followed by L2 normalisation: what inference and ONNX compute."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(images), dim=1)


class FeatureExtractor:
    """`FeatureExtractor(checkpoint, device="cpu")(images) -> [N, D]` L2-normalised features.

    checkpoint: an engine checkpoint file (or a checkpoints/run directory, see resolve_checkpoint), an
    MLflow model URI of a model logged by Tracker.log_model (`runs:/<run_id>/model`,
    `models:/NAME/VERSION`; downloaded from `tracking_uri`, default $MLFLOW_TRACKING_URI or
    sqlite:///mlflow.db), or a local copy of such a model (a directory with an MLmodel file).
    images: one or a list of image paths, PIL images, numpy arrays H x W x 3 or tensors 3 x H x W; or
    a batch array N x H x W x 3 / tensor N x 3 x H x W (pipeline.inference.images, the forms the served
    model's predict takes too). Arrays are uint8 in [0, 255] or float in [0, 1] (not yet
    normalised), any size. Image files go through exactly the evaluation's decoder
    (pipeline.data.images.decode: PIL's pixels, bilinear resize), so a file's features equal those
    `evaluate` computes for it from the shards; PIL images get the same resize, arrays an antialiased
    bilinear one.
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
        """Images -> the normalised float batch [N, 3, H, W] the network (and the ONNX graph) takes
        (pipeline.inference.images.image_batch, which the served model uses too)."""
        return image_batch(images, self.image_size)

    @torch.no_grad()
    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        batch = self.preprocess(images)
        if batch.shape[0] == 0:      # an empty batch array: [0, D], D from one forward of one image
            return self.model(torch.zeros(1, 3, *self.image_size, device=self.device)).float().cpu()[:0]
        out = [self.model(batch[s:s + self.batch_size].to(self.device)).float().cpu()
               for s in range(0, batch.shape[0], self.batch_size)]
        return torch.cat(out)
